"""Vector quantization with the ViT-VQGAN codebook improvements (Yu et al., 2022, "Vector-quantized Image
Modeling with Improved VQGAN").

* Factorized codes: encoder features (embed_dim) are projected to a low-dimensional lookup space (code_dim,
  8 by default) for the nearest-code search, then projected back up.
* l2-normalized codes: projected latents and codebook vectors are unit-normalized, so Euclidean distance is
  cosine distance; this keeps all codes in play.
* VQ-VAE loss (van den Oord et al., 2017): codebook term + beta * commitment (beta = 0.25), straight-through
  gradient from the quantized output to the encoder.
* Usage is tracked as an EMA of per-code hits; codes whose EMA falls below a threshold are restarted from
  current latents (the dead-code restart of Jukebox / Zeghidour et al.); "below threshold" means an EMA
  share under restart_threshold / num_codes.

`quantize_map` works on any (B, C, h, w) feature map so a residual multi-scale quantizer can share the codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F


@dataclass
class QuantizerOutput:
    z_q: torch.Tensor  # (B, C, h, w) quantized features, straight-through
    ids: torch.Tensor  # (B, h, w) long
    loss: torch.Tensor  # codebook + beta * commitment
    perplexity: torch.Tensor  # exp(entropy) of this batch's code histogram
    usage: torch.Tensor  # fraction of codes used in this batch


class FactorizedQuantizer(nn.Module):
    def __init__(self, num_codes: int = 512, embed_dim: int = 64, code_dim: int = 8, beta: float = 0.25,
                 l2_norm: bool = True, restart_threshold: float = 0.03, ema_decay: float = 0.95):
        super().__init__()
        if num_codes < 2 or code_dim < 1:
            raise ValueError(f"num_codes must be >= 2 and code_dim >= 1, got {num_codes}, {code_dim}")
        self.num_codes, self.code_dim, self.beta, self.l2_norm = num_codes, code_dim, beta, l2_norm
        self.restart_threshold, self.ema_decay = restart_threshold, ema_decay
        self.proj_in = nn.Linear(embed_dim, code_dim)
        self.proj_out = nn.Linear(code_dim, embed_dim)
        self.embedding = nn.Embedding(num_codes, code_dim)
        nn.init.normal_(self.embedding.weight)
        # starts at 0, so the first training batch restarts every code from real latents (a data init)
        self.register_buffer("usage_ema", torch.zeros(num_codes))

    def _norm(self, x):
        return F.normalize(x, dim=-1) if self.l2_norm else x

    @property
    def codebook(self) -> torch.Tensor:
        """(num_codes, code_dim) lookup vectors as used for the nearest-code search."""
        return self._norm(self.embedding.weight)

    def nearest(self, z_NC: torch.Tensor) -> torch.Tensor:
        """Ids of the nearest codes for lookup-space vectors (N, code_dim)."""
        cb = self.codebook
        d = z_NC.pow(2).sum(-1, keepdim=True) - 2 * z_NC @ cb.t() + cb.pow(2).sum(-1)
        return d.argmin(-1)

    def lookup(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> features (B, embed_dim, h, w)."""
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.num_codes):
            raise ValueError(f"ids must lie in [0, {self.num_codes}), got range [{int(ids.min())}, {int(ids.max())}]")
        return self.proj_out(self.codebook[ids]).permute(0, 3, 1, 2)

    def quantize_map(self, z_BChw: torch.Tensor) -> QuantizerOutput:
        B, C, h, w = z_BChw.shape
        z = self._norm(self.proj_in(z_BChw.permute(0, 2, 3, 1).reshape(-1, C)))  # (N, code_dim)
        ids = self.nearest(z.detach())
        q = self.codebook[ids]
        loss = F.mse_loss(q, z.detach()) + self.beta * F.mse_loss(z, q.detach())
        q = z + (q - z).detach()  # straight-through
        z_q = self.proj_out(q).view(B, h, w, C).permute(0, 3, 1, 2)
        counts = torch.bincount(ids, minlength=self.num_codes).float()
        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs.clamp_min(1e-10))).sum())
        if self.training:
            self._track_and_restart(probs, z.detach())
        return QuantizerOutput(z_q, ids.view(B, h, w), loss, perplexity, (counts > 0).float().mean())

    forward = quantize_map

    @torch.no_grad()
    def _track_and_restart(self, probs: torch.Tensor, z_NC: torch.Tensor) -> None:
        self.usage_ema.mul_(self.ema_decay).add_(probs, alpha=1 - self.ema_decay)
        dead = self.usage_ema < self.restart_threshold / self.num_codes
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        pick = torch.randint(0, z_NC.shape[0], (n_dead,), device=z_NC.device)
        new = z_NC[pick] + 0.01 * torch.randn(n_dead, self.code_dim, device=z_NC.device)
        self.embedding.weight.data[dead] = new
        self.usage_ema[dead] = 1.0 / self.num_codes
