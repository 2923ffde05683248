"""Vector quantization with the ViT-VQGAN codebook (Yu et al., 2022, "Vector-quantized Image Modeling with
Improved VQGAN", arXiv 2110.04627) on top of VQ-VAE (van den Oord et al., 2017).

* Factorized codes: encoder features (embed_dim) are linearly projected to a low-dimensional lookup space
  (code_dim, 8 by default) for the nearest-code search, and the chosen code is projected back up.
* l2-normalized codes: projected latents and codebook vectors are unit vectors, so the Euclidean nearest code
  is the cosine nearest code. The codebook is initialized from a normal distribution (uniform directions).
* VQ-VAE loss: ||sg[z] - e||^2 + beta * ||z - sg[e]||^2 (beta = 0.25) and a straight-through gradient.
* Dead-code restart (Dhariwal et al., 2020, Jukebox; Zeghidour et al., 2021, SoundStream): every
  `restart_interval` training steps, codes whose EMA hit count is below `restart_threshold` times the mean
  count are re-seeded from randomly chosen current latents. The EMA starts at zero, so the first training
  step re-seeds every code the first batch did not hit (a random normal codebook is mostly far from the
  latents of a fresh encoder). Without restarts the codebook collapses: on the shapes data a small VQGAN
  used 1 of 512 codes after 75 steps, against ~280 (perplexity ~60) after 100 steps with them.

Letters: B batch, C = embed_dim, D = code_dim, K = num_codes, h, w the latent grid, N = B * h * w.
`quantize_map` takes any (B, C, h, w) map, so a residual multi-scale quantizer (VAR, Tian et al., 2024) can
share this codebook across scales.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # (B, C, h, w) quantized features; value = lookup(ids), gradient = straight-through
    ids: torch.Tensor  # (B, h, w) long
    loss: torch.Tensor  # () codebook + beta * commitment
    perplexity: torch.Tensor  # () exp(entropy) of this batch's code histogram, in [1, K]
    usage: torch.Tensor  # () fraction of the K codes hit in this batch
    z: torch.Tensor  # (B, h, w, D) the features in lookup space before quantization, differentiable (ETT reads them)


def _positive(name: str, value, integer: bool = False) -> None:
    if (integer and (not isinstance(value, int) or isinstance(value, bool))) or not value > 0:
        kind = "a positive int" if integer else "> 0"
        raise ValueError(f"{name} must be {kind}, got {value!r}")


class FactorizedQuantizer(nn.Module):
    def __init__(
        self,
        num_codes: int = 512,
        embed_dim: int = 64,
        code_dim: int = 8,
        beta: float = 0.25,
        l2_norm: bool = True,
        restart_threshold: float = 0.03,
        restart_interval: int = 1,
        ema_decay: float = 0.95,
    ):
        super().__init__()
        _positive("embed_dim", embed_dim, integer=True)
        _positive("code_dim", code_dim, integer=True)
        _positive("restart_interval", restart_interval, integer=True)
        if not isinstance(num_codes, int) or num_codes < 2:
            raise ValueError(f"num_codes must be an int >= 2, got {num_codes!r}")
        if beta < 0:
            raise ValueError(f"beta must be >= 0, got {beta}")
        if not 0 <= restart_threshold < 1:
            raise ValueError(f"restart_threshold must be in [0, 1) (a fraction of the mean code count; 0 turns "
                             f"restarts off), got {restart_threshold}")
        if not 0 < ema_decay < 1:
            raise ValueError(f"ema_decay must be in (0, 1), got {ema_decay}")
        self.num_codes, self.embed_dim, self.code_dim = num_codes, embed_dim, code_dim
        self.beta, self.l2_norm = beta, l2_norm
        self.restart_threshold, self.restart_interval, self.ema_decay = restart_threshold, restart_interval, ema_decay
        self.proj_in = nn.Linear(embed_dim, code_dim)
        self.proj_out = nn.Linear(code_dim, embed_dim)
        self.embedding = nn.Embedding(num_codes, code_dim)
        nn.init.normal_(self.embedding.weight)  # ViT-VQGAN: normal init; after l2 norm, uniform on the sphere
        self.register_buffer("usage_ema", torch.zeros(num_codes))  # (K,) EMA of per-batch hit counts
        self.train_steps = 0  # training forwards seen; only paces restarts, so it is not saved

    def _normalize(self, x: torch.Tensor) -> torch.Tensor:
        return F.normalize(x, dim=-1) if self.l2_norm else x

    def _codes(self) -> torch.Tensor:
        return self._normalize(self.embedding.weight)  # (K, D), differentiable

    @property
    def codebook(self) -> torch.Tensor:
        """(K, D) lookup-space code vectors (unit norm when l2_norm), detached: for analysis and clustering."""
        return self._codes().detach()

    def project(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """Features (B, C, h, w) -> lookup-space latents (B, h, w, D), unit norm when l2_norm."""
        if z_BChw.dim() != 4 or z_BChw.shape[1] != self.embed_dim:
            raise ValueError(f"z must be a feature map (B, {self.embed_dim}, h, w), got {tuple(z_BChw.shape)}")
        return self._normalize(self.proj_in(z_BChw.permute(0, 2, 3, 1)))

    def nearest(self, z_ND: torch.Tensor, codes_KD: torch.Tensor) -> torch.Tensor:
        """Ids (N,) of the nearest codes. ||z||^2 is the same for every code, so it is dropped from the
        distance; ties go to the lowest id (argmin), which keeps the ids deterministic."""
        d_NK = codes_KD.pow(2).sum(-1) - 2 * z_ND @ codes_KD.t()
        return d_NK.argmin(-1)

    @torch.no_grad()
    def ids_from_map(self, z_BChw: torch.Tensor) -> torch.Tensor:
        """The cheap path: features (B, C, h, w) -> ids (B, h, w); no loss, no usage tracking, no restart."""
        z = self.project(z_BChw)  # (B, h, w, D)
        return self.nearest(z.reshape(-1, self.code_dim), self._codes()).view(z.shape[:3])

    def code_vectors(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (...) -> their lookup-space code vectors (..., D), differentiable in the codebook (ETT's input)."""
        return self._codes()[ids.long()]

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, h, w) -> quantized features (B, C, h, w)."""
        if not torch.is_tensor(ids) or ids.dtype.is_floating_point or ids.dtype.is_complex or ids.dtype == torch.bool:
            raise ValueError(f"ids must be an integer tensor, got {getattr(ids, 'dtype', type(ids).__name__)}")
        if ids.dim() != 3:
            raise ValueError(f"ids must have shape (B, h, w), got {tuple(ids.shape)}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_codes):
            lo, hi = int(ids.min()), int(ids.max())
            raise ValueError(f"ids must lie in [0, {self.num_codes}), got values in [{lo}, {hi}]")
        return self.proj_out(self._codes()[ids.long()]).permute(0, 3, 1, 2)

    def quantize_map(self, z_BChw: torch.Tensor) -> QuantizerOutput:
        """Quantize a feature map (B, C, h, w). In training mode this also updates usage and restarts dead codes."""
        B, _, h, w = z_BChw.shape
        z_ND = self.project(z_BChw).reshape(-1, self.code_dim)
        codes_KD = self._codes()
        ids_N = self.nearest(z_ND.detach(), codes_KD.detach())
        q_ND = codes_KD[ids_N]
        # codebook term moves the codes, commitment term (x beta) keeps the encoder close to its code
        loss = F.mse_loss(q_ND, z_ND.detach()) + self.beta * F.mse_loss(z_ND, q_ND.detach())
        q_ND = z_ND + (q_ND - z_ND).detach()  # straight-through: forward = code, backward = identity to z
        z_q = self.proj_out(q_ND).view(B, h, w, self.embed_dim).permute(0, 3, 1, 2)  # (B, C, h, w)

        counts_K = torch.bincount(ids_N, minlength=self.num_codes).float()
        probs_K = counts_K / counts_K.sum()
        perplexity = torch.exp(-(probs_K * probs_K.clamp_min(1e-12).log()).sum())
        if self.training:
            self._track_and_restart(counts_K.clone(), z_ND.detach().view(B, h * w, self.code_dim))
        return QuantizerOutput(z_q, ids_N.view(B, h, w), loss, perplexity, (counts_K > 0).float().mean(),
                               z_ND.view(B, h, w, self.code_dim))

    forward = quantize_map

    @torch.no_grad()
    def _track_and_restart(self, counts_K: torch.Tensor, z_BnD: torch.Tensor) -> None:
        """Under data parallelism each process sees its share of the batch: the hit counts are summed over the
        processes and restart candidates drawn from the whole gathered batch by rank 0 (then broadcast), so
        the codebook stays identical on every rank and equals a single process on the global batch."""
        world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
        if world > 1:
            dist.all_reduce(counts_K)
        self.usage_ema.mul_(self.ema_decay).add_(counts_K, alpha=1 - self.ema_decay)
        step, self.train_steps = self.train_steps, self.train_steps + 1
        if self.restart_threshold == 0 or step % self.restart_interval:
            return
        mean = self.usage_ema.mean()
        dead = self.usage_ema < self.restart_threshold * mean  # (K,) bool
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        if world > 1:  # rank r holds images r, r + world, ... of the global batch (mmgen.training.data.batch_indices)
            parts = [torch.empty_like(z_BnD) for _ in range(world)]
            dist.all_gather(parts, z_BnD.contiguous())
            z_BnD = torch.stack(parts, 1).flatten(0, 1)
        z_ND = z_BnD.reshape(-1, self.code_dim)
        pick = torch.randint(0, z_ND.shape[0], (n_dead,), device=z_ND.device)
        # small jitter so two codes re-seeded from the same latent do not stay identical
        new = self._normalize(z_ND[pick] + 0.01 * torch.randn(n_dead, self.code_dim, device=z_ND.device))
        if world > 1:
            dist.broadcast(new, src=0)
        self.embedding.weight.data[dead] = new.to(self.embedding.weight.dtype)
        self.usage_ema[dead] = mean  # a grace period of ~log(threshold)/log(decay) steps before the next restart


class GridCodesMixin:
    """The visual tokenizer protocol (tokenizers_vis.protocol) for a tokenizer whose `encode` gives codes on its
    `grid_size` from `self.quantizer` and whose `decode` takes them back (VQGAN; SEED's N causal codes as a (1, N)
    grid). The class supplies `config.image_size`, `grid_size`, `vocab_size`, `encode` and `decode`."""

    kind = "codes"

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def token_shape(self) -> tuple[int, int]:
        return self.grid_size

    @property
    def codebook(self) -> torch.Tensor:
        """(V, D) the vectors the codes index (lookup space), e.g. for the watermark's clusters."""
        return self.quantizer.codebook

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode(images)

    def decode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        return self.decode(ids)
