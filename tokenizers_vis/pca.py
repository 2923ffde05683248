"""PCA-ordered 1-D tokenizer, after Semanticist ("'Principal Components' Enable A New Language of Images",
Wen et al., ICCV 2025): K causal tokens whose prefixes each reconstruct the image, earlier tokens explaining more.

Tokenize: a small ViT reads the image patches and K learned query tokens. Patches attend to patches only
(bidirectional); query i attends to every patch and to queries <= i, so token i is a function of the image and
queries <= i (a 1-D causal order, as in SEED's causal Q-Former). Each query output is projected to a 16-d unit
vector and quantized by the project's l2-normalized factorized codebook (`FactorizedQuantizer`): Semanticist's
tokens are continuous 16-d normalized vectors; here they are discrete so the next-token paradigm models them as
it models SEED's codes, on a (1, K) grid.

Nested dropout (Rippel et al., 2014, as Semanticist uses it): in training every image keeps a random prefix of
k ~ U{1..K} tokens and the rest are replaced by one learned null token before the decoder. Every prefix must
then reconstruct on its own, and what the first tokens cannot carry falls to later ones, which explain less and
less of the variance (the PCA-like order). `decode_prefix(ids, k)` reads the first k codes only.

Codebook warm-up (not in Semanticist, whose tokens stay continuous): training starts on the continuous unit
token vectors (`forward(quantize=False)`), then goes through the codebook; quantized from the first step, every
image got the same codes in tiny runs (docs/architecture.md).

Decoder: rectified flow (`tokenizers_vis.flow`), as the paper argues: a decoder trained with MSE is best served
by putting the low-frequency spectrum (blur, mean colours) into the first tokens ("semantic-spectrum
coupling"); a generative decoder draws missing detail itself, so tokens carry what the image is. A small
transformer over 8 x 8 pixel patches, the K token vectors as an in-context prefix and the time as one more
token (U-ViT, Bao et al., 2023), predicts the clean patches; the sampler integrates the velocity they imply,
(x_t - x0_hat) / t (x-prediction, JiT: Li & He, 2025), since a pixel patch wider than the network cannot carry
the noise a velocity target holds. Training times are logit-normal around `time_mean` > 0, shifted toward
noise, where only the tokens say what the image is. Decoding costs `sample_steps` decoder passes per image; a
fixed noise (`noise_seed`) makes it deterministic.

Letters: B batch, K = num_tokens, k <= K a prefix, P image patches, C = dim, D = code_dim, E = 3 * patch^2
(one patch's pixels).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from tokenizers_vis.flow import TimestepEmbedder, interpolate, logit_normal_t, sample_flow
from tokenizers_vis.quantize import FactorizedQuantizer
from tokenizers_vis.seed import Block, CausalCodesMixin, causal_mask
from tokenizers_vis.shared import SharedComponentMixin


def patchify(images_B3HW: torch.Tensor, p: int) -> torch.Tensor:
    """(B, 3, H, W) -> (B, P, E), patches in raster order."""
    B, c, H, W = images_B3HW.shape
    x = images_B3HW.reshape(B, c, H // p, p, W // p, p).permute(0, 2, 4, 3, 5, 1)  # (B, h, w, p, p, 3)
    return x.reshape(B, (H // p) * (W // p), p * p * c)


def unpatchify(x_BPE: torch.Tensor, p: int) -> torch.Tensor:
    """(B, P, E) -> (B, 3, H, W), the inverse of `patchify`."""
    B, P, _ = x_BPE.shape
    g = int(round(P ** 0.5))
    return x_BPE.reshape(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * p, g * p)


def encoder_mask(num_patches: int, num_tokens: int, device=None) -> torch.Tensor:
    """(1, 1, P + K, P + K) bool over [patches; queries], True = may attend: patches see patches only, query i
    sees every patch and queries <= i."""
    P, K = num_patches, num_tokens
    mask = torch.zeros(P + K, P + K, dtype=torch.bool, device=device)
    mask[:, :P] = True
    mask[P:, P:] = causal_mask(K, device)[0, 0]
    return mask[None, None]


class CausalTokenEncoder(nn.Module):
    """Image patches + K learned queries -> (B, K, C) token features, token i a function of queries <= i."""

    def __init__(self, num_patches: int, patch_dim: int, num_tokens: int, dim: int, heads: int, layers: int):
        super().__init__()
        self.patch_embed = nn.Linear(patch_dim, dim)
        self.pos = nn.Parameter(torch.randn(num_patches, dim) * 0.02)
        self.queries = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, cross=False) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)

    def forward(self, patches_BPE: torch.Tensor) -> torch.Tensor:
        B, P, _ = patches_BPE.shape
        x = torch.cat([self.patch_embed(patches_BPE) + self.pos, self.queries.expand(B, -1, -1)], 1)
        mask = encoder_mask(P, len(self.queries), x.device)
        for block in self.blocks:
            x = block(x, mask)
        return self.norm(x[:, P:])  # (B, K, C)


class FlowDecoder(nn.Module):
    """x0_hat = FlowDecoder(x_t, t, tokens): the clean image patches predicted from the noisy ones (B, P, E) at times
    t (B,) given the K token vectors (B, K, C), over the sequence [time; tokens; patches] with full attention.
    `velocity` turns that into the rectified-flow velocity the sampler integrates (see the module docstring)."""

    # guards the division at t = 0 only: the sampler's last evaluation is at t = 1 / steps, and an Euler step from
    # there lands exactly on x0_hat
    t_min = 1e-4

    def __init__(self, num_patches: int, patch_dim: int, num_tokens: int, dim: int, heads: int, layers: int):
        super().__init__()
        self.time_embed = TimestepEmbedder(dim)
        self.token_pos = nn.Parameter(torch.randn(num_tokens, dim) * 0.02)
        self.patch_embed = nn.Linear(patch_dim, dim)
        self.patch_pos = nn.Parameter(torch.randn(num_patches, dim) * 0.02)
        self.blocks = nn.ModuleList(Block(dim, heads, cross=False) for _ in range(layers))
        self.norm = nn.LayerNorm(dim)
        self.out = nn.Linear(dim, patch_dim)

    def forward(self, x_BPE: torch.Tensor, t_B: torch.Tensor, tokens_BKC: torch.Tensor) -> torch.Tensor:
        h = torch.cat([self.time_embed(t_B)[:, None], tokens_BKC + self.token_pos,
                       self.patch_embed(x_BPE) + self.patch_pos], 1)
        for block in self.blocks:
            h = block(h)
        return self.out(self.norm(h[:, -x_BPE.shape[1]:]))  # (B, P, E)

    def velocity(self, x_BPE: torch.Tensor, t_B: torch.Tensor, tokens_BKC: torch.Tensor) -> torch.Tensor:
        """v = (x_t - x0_hat) / t, which equals noise - x0 when x0_hat = x0 (x_t = (1 - t) x0 + t noise)."""
        t = t_B.clamp_min(self.t_min).to(x_BPE.dtype)[:, None, None]
        return (x_BPE - self(x_BPE, t_B, tokens_BKC)) / t


@dataclass
class PCAOutput:
    flow_loss: torch.Tensor  # () x0 MSE of the flow decoder, each image conditioned on its prefix
    quant_loss: torch.Tensor  # () codebook + beta * commitment
    ids: torch.Tensor  # (B, 1, K) long
    prefix_lengths: torch.Tensor  # (B,) the prefix each image was decoded from
    perplexity: torch.Tensor  # () of this batch's code histogram
    usage: torch.Tensor  # () fraction of codes hit in this batch


class PCATokenizer(SharedComponentMixin, CausalCodesMixin, ModelMixin, ConfigMixin):
    """Images (B, 3, image_size, image_size) in [-1, 1] <-> K causal, PCA-ordered codes, stated as the token grid
    (1, K) so it drops in where SEED's codes go."""

    @register_to_config
    def __init__(
        self,
        image_size: int = 64,
        patch_size: int = 8,
        num_tokens: int = 32,
        dim: int = 128,
        heads: int = 4,
        encoder_layers: int = 4,
        decoder_layers: int = 4,
        num_codes: int = 1024,
        code_dim: int = 16,
        beta: float = 0.25,
        restart_threshold: float = 0.03,
        ema_decay: float = 0.95,
        sample_steps: int = 25,
        noise_seed: int = 0,
        time_mean: float = 1.0,
    ):
        super().__init__()
        for name, v in dict(image_size=image_size, patch_size=patch_size, num_tokens=num_tokens, dim=dim,
                            heads=heads, encoder_layers=encoder_layers, decoder_layers=decoder_layers,
                            code_dim=code_dim, sample_steps=sample_steps).items():
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        if image_size % patch_size:
            raise ValueError(f"image_size must be a multiple of patch_size ({patch_size}), got {image_size}")
        if dim % heads:
            raise ValueError(f"dim must be a multiple of heads ({heads}), got {dim}")
        if isinstance(noise_seed, bool) or not isinstance(noise_seed, int) or noise_seed < 0:
            raise ValueError(f"noise_seed must be an int >= 0, got {noise_seed!r}")
        if isinstance(time_mean, bool) or not isinstance(time_mean, (int, float)) or not abs(time_mean) <= 10:
            raise ValueError(f"time_mean must be a number in [-10, 10] (logit-normal mean), got {time_mean!r}")
        P, E = (image_size // patch_size) ** 2, 3 * patch_size ** 2
        self.encoder = CausalTokenEncoder(P, E, num_tokens, dim, heads, encoder_layers)
        self.quantizer = FactorizedQuantizer(num_codes, dim, code_dim, beta, True, restart_threshold, 1, ema_decay)
        self.null_token = nn.Parameter(torch.randn(dim) * 0.02)  # stands in for every dropped token
        self.decoder = FlowDecoder(P, E, num_tokens, dim, heads, decoder_layers)

    # ---- what the generators read ------------------------------------------------------------------------

    @property
    def num_tokens(self) -> int:
        return self.config.num_tokens

    # ---- tokenize ----------------------------------------------------------------------------------------

    def token_features(self, images: torch.Tensor) -> torch.Tensor:
        """Images -> the encoder's token features as the quantizer's code map (B, C, 1, K)."""
        self._check_images(images)
        return self.encoder(patchify(images, self.config.patch_size)).transpose(1, 2).unsqueeze(2)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> ids (B, 1, K) long. Never touches codebook state."""
        return self.quantizer.ids_from_map(self.token_features(images))

    # ---- de-tokenize -------------------------------------------------------------------------------------

    def condition(self, z_BKC: torch.Tensor, prefix_lengths: torch.Tensor) -> torch.Tensor:
        """Token vectors (B, n <= K, C) -> the decoder's (B, K, C): token i where i < prefix_lengths[b], else the
        null token (nested dropout; absent tokens are null too)."""
        B, n, C = z_BKC.shape
        z = F.pad(z_BKC, (0, 0, 0, self.num_tokens - n))
        keep = torch.arange(self.num_tokens, device=z.device) < prefix_lengths.to(z.device)[:, None]  # (B, K)
        return torch.where(keep[..., None], z, self.null_token.to(z.dtype))

    def _noise(self, batch: int, generator: torch.Generator | None, device) -> torch.Tensor:
        """(B, P, E) starting noise. Without a generator every image starts from the noise of `noise_seed`, so a
        decode is a function of its own ids only (not of the batch it sits in, nor of the global RNG)."""
        P, E = (self.config.image_size // self.config.patch_size) ** 2, 3 * self.config.patch_size ** 2
        if generator is None:
            one = torch.randn(P, E, generator=torch.Generator().manual_seed(self.config.noise_seed))
            return one.expand(batch, P, E).to(device, self.dtype)
        return torch.randn(batch, P, E, generator=generator, device=generator.device).to(device, self.dtype)

    @torch.no_grad()
    def decode_prefix(self, ids: torch.Tensor, k: int, num_steps: int | None = None,
                      generator: torch.Generator | None = None) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] from the first k tokens of ids (B, n) or (B, 1, n), n >= k; later tokens
        are not read (the null token stands in for them). `num_steps` Euler steps (default the config's
        `sample_steps`), each one decoder pass; noise from `generator` (default: the fixed `noise_seed`)."""
        ids = self._ids_B1n(ids)
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= ids.shape[2]:
            raise ValueError(f"k must be an int in [1, {ids.shape[2]}] (the tokens given), got {k!r}")
        steps = self.config.sample_steps if num_steps is None else num_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_steps must be a positive int, got {num_steps!r}")
        z = self.quantizer.lookup(ids[..., :k]).squeeze(2).transpose(1, 2)  # (B, k, C)
        B = len(z)
        cond = self.condition(z, torch.full((B,), k, device=z.device))
        x, _ = sample_flow(lambda x_t, t: self.decoder.velocity(x_t, t, cond), self._noise(B, generator, z.device),
                           steps)
        return unpatchify(x, self.config.patch_size).clamp(-1, 1)

    def decode(self, ids: torch.Tensor, num_steps: int | None = None,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Ids (B, 1, K) or (B, K) -> images (B, 3, H, W) clamped to [-1, 1]."""
        ids = self._ids_B1n(ids)
        if ids.shape[2] != self.num_tokens:
            raise ValueError(f"decode needs all {self.num_tokens} tokens, got {ids.shape[2]}; "
                             f"use decode_prefix(ids, k) for a prefix")
        return self.decode_prefix(ids, self.num_tokens, num_steps, generator)

    # ---- training ----------------------------------------------------------------------------------------

    def forward(self, images: torch.Tensor, prefix_lengths: torch.Tensor | None = None,
                generator: torch.Generator | None = None, quantize: bool = True) -> PCAOutput:
        """The training losses. `prefix_lengths` (B,) decodes image b from its first prefix_lengths[b] tokens
        (`random_prefix_lengths(B, K, full_prob=0)` in training: nested dropout); None keeps all K. `generator`
        draws the flow times and noise (default: the global RNG). `quantize=False` hands the decoder the
        continuous unit token vectors (Semanticist's tokens) instead of their codes, with no VQ loss and no
        codebook update: the warm-up that keeps the codes from collapsing (see `scripts/train_tokenizer.py`)."""
        codes = self.token_features(images)
        B, K = len(images), self.num_tokens
        if prefix_lengths is None:
            prefix_lengths = torch.full((B,), K, dtype=torch.long)
        elif prefix_lengths.shape != (B,) or int(prefix_lengths.min()) < 1 or int(prefix_lengths.max()) > K:
            raise ValueError(f"prefix_lengths must be (B,) = ({B},) ints in [1, {K}], got {prefix_lengths.tolist()}")
        if quantize:
            q = self.quantizer(codes)
            z_BKC, quant_loss, ids, perplexity, usage = q.z_q.squeeze(2).transpose(1, 2), q.loss, q.ids, \
                q.perplexity, q.usage
        else:
            z_B1KD = self.quantizer.project(codes)
            # a zero that touches the codebook, so data-parallel training sees a gradient for every parameter
            z_BKC, quant_loss = self.quantizer.proj_out(z_B1KD[:, 0]), 0 * self.quantizer.embedding.weight.sum()
            with torch.no_grad():
                ids = self.quantizer.nearest(z_B1KD.reshape(-1, z_B1KD.shape[-1]), self.quantizer.codebook)
                counts = torch.bincount(ids, minlength=self.vocab_size).float()
                p = counts / counts.sum()
                perplexity, usage = torch.exp(-(p * p.clamp_min(1e-12).log()).sum()), (counts > 0).float().mean()
            ids = ids.view(B, 1, K)
        cond = self.condition(z_BKC, prefix_lengths)
        x0 = patchify(images, self.config.patch_size)
        dev = generator.device if generator is not None else x0.device
        t = logit_normal_t(B, generator, x0.device, mean=self.config.time_mean)
        noise = torch.randn(x0.shape, generator=generator, device=dev).to(x0.device, x0.dtype)
        x_t, _ = interpolate(x0, noise, t)
        flow_loss = F.mse_loss(self.decoder(x_t, t, cond), x0)
        return PCAOutput(flow_loss, quant_loss, ids, prefix_lengths, perplexity, usage)
