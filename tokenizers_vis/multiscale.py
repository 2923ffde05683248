"""Multi-scale residual VQ tokenizer of VAR ("Visual Autoregressive Modeling: Scalable Image Generation via
Next-Scale Prediction", Tian et al., 2024, arXiv 2404.02905), on the VQGAN encoder/decoder and the
factorized, l2-normalized ViT-VQGAN codebook (Yu et al., 2022) of `tokenizers_vis.vqgan`.

One encoder map f (B, C, G, G) is quantized coarse to fine with ONE shared codebook. At scale k the residual
f - f_hat is area-downsampled to s_k x s_k, each cell takes its nearest code, and the code map is upsampled
bicubically back to G x G, passed through phi_k (VAR's `quant_resi`: h <- (1 - r) h + r conv(h), which repairs
the blur of the upsampling) and added to f_hat. The decoder sees f_hat; the token sequence is every scale's
ids, raster order, coarse to fine.

Letters: B batch, C = embed_dim, G the finest grid side (= scales[-1]), s_k the side of scale k, K the number
of scales, N = num_tokens = sum s_k^2, D = code_dim.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from tokenizers_vis.quantize import FactorizedQuantizer
from tokenizers_vis.vqgan import Decoder, Encoder
from tokenizers_vis.shared import SharedComponentMixin


@dataclass
class MultiScaleOutput:
    recon: torch.Tensor  # (B, 3, H, W) float, not clamped
    ids: torch.Tensor  # (B, N) long: every scale's ids in raster order, concatenated coarse to fine
    quant_loss: torch.Tensor  # () VAR's codebook + beta * commitment, averaged over scales
    perplexity: torch.Tensor  # () of this batch's code histogram over all scales
    usage: torch.Tensor  # () fraction of codes hit in this batch


class Phi(nn.Conv2d):
    """VAR's `quant_resi`: a residual conv that mixes a share `ratio` of conv(h) into the upsampled code map."""

    def __init__(self, channels: int, kernel: int, ratio: float):
        super().__init__(channels, channels, kernel, padding=kernel // 2)
        self.ratio = ratio

    def forward(self, h_BCGG: torch.Tensor) -> torch.Tensor:
        return (1 - self.ratio) * h_BCGG + self.ratio * super().forward(h_BCGG)


def area_downsample(x_BCHW: torch.Tensor, side: int) -> torch.Tensor:
    """Area (box-average) resize to side x side; the identity, exactly, at the map's own size."""
    if tuple(x_BCHW.shape[-2:]) == (side, side):
        return x_BCHW
    return F.interpolate(x_BCHW, size=(side, side), mode="area")


class MultiScaleVQGAN(SharedComponentMixin, ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2, 2, 4),
        num_res_blocks: int = 1,
        embed_dim: int = 64,
        num_codes: int = 512,
        code_dim: int = 8,
        beta: float = 0.25,
        l2_norm: bool = True,
        restart_threshold: float = 0.03,
        restart_interval: int = 1,
        ema_decay: float = 0.95,
        mid_attention: bool = True,
        image_size: int = 64,
        scales: tuple[int, ...] = (1, 2, 3, 4, 6, 8),
        phi_kernel: int = 3,
        phi_ratio: float = 0.5,
    ):
        super().__init__()
        mult = tuple(channel_mult)
        if not mult or not all(isinstance(m, int) and m > 0 for m in mult):
            raise ValueError(f"channel_mult must be a non-empty sequence of positive ints, got {channel_mult!r}")
        for name, v in dict(in_channels=in_channels, base_channels=base_channels, num_res_blocks=num_res_blocks,
                            image_size=image_size).items():
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        f = 2 ** (len(mult) - 1)
        if image_size % f:
            raise ValueError(f"image_size must be a multiple of the downsampling factor {f} "
                             f"(2 ** (len(channel_mult) - 1)), got {image_size}")
        side = image_size // f
        sc = tuple(scales)
        if (not sc or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in sc)
                or any(a >= b for a, b in zip(sc, sc[1:])) or sc[-1] != side):
            raise ValueError(f"scales must be strictly increasing positive ints ending at the encoder grid side "
                             f"{side} (image_size / downsampling factor), got {scales!r}")
        if not isinstance(phi_kernel, int) or phi_kernel < 1 or phi_kernel % 2 == 0:
            raise ValueError(f"phi_kernel must be an odd positive int (the conv keeps the map size), "
                             f"got {phi_kernel!r}")
        if not 0 <= phi_ratio <= 1:
            raise ValueError(f"phi_ratio must be in [0, 1], got {phi_ratio}")
        # JSON turns tuples into lists; store tuples so a reloaded config equals the original
        self.register_to_config(channel_mult=mult, scales=sc)
        self.encoder = Encoder(in_channels, base_channels, mult, num_res_blocks, embed_dim, mid_attention)
        self.quantizer = FactorizedQuantizer(num_codes, embed_dim, code_dim, beta, l2_norm, restart_threshold,
                                             restart_interval, ema_decay)
        self.phis = nn.ModuleList(Phi(embed_dim, phi_kernel, phi_ratio) for _ in sc)
        self.decoder = Decoder(in_channels, base_channels, mult, num_res_blocks, embed_dim, mid_attention)

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(self.config.scales)

    @property
    def num_tokens(self) -> int:
        return sum(s * s for s in self.scales)

    @property
    def feature_dim(self) -> int:
        return self.config.embed_dim

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    @property
    def vocab_size(self) -> int:
        return self.config.num_codes

    # ---- visual tokenizer protocol (tokenizers_vis.protocol): every scale's ids, flattened, coarse to fine ----
    kind = "scale_codes"

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def token_shape(self) -> tuple[int]:
        return (self.num_tokens,)

    def split_scales(self, ids_BL: torch.Tensor) -> list[torch.Tensor]:
        """(B, L) concatenated ids -> [(B, s_k, s_k)] per scale."""
        sizes = [s * s for s in self.scales]
        if ids_BL.dim() != 2 or ids_BL.shape[1] != sum(sizes):
            raise ValueError(f"scale codes must have shape (B, {sum(sizes)}), got {tuple(ids_BL.shape)}")
        return [t.reshape(-1, s, s) for t, s in zip(ids_BL.split(sizes, 1), self.scales)]

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([ids.flatten(1) for ids in self.encode(images)], 1)

    def decode_tokens(self, ids_BL: torch.Tensor) -> torch.Tensor:
        return self.decode(self.split_scales(ids_BL))

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) of the finest scale, the encoder's grid."""
        return (self.scales[-1], self.scales[-1])

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv, where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def _check_images(self, images) -> None:
        c, size = self.config.in_channels, self.config.image_size
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != c or not images.is_floating_point():
            got = f"{tuple(images.shape)} {images.dtype}" if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a float tensor (B, {c}, H, W) in [-1, 1], got {got}")
        # the scale schedule ends at the grid of image_size, so other sizes have no token layout
        if tuple(images.shape[2:]) != (size, size):
            raise ValueError(f"images must be {size}x{size} (image_size, which fixes the scale schedule), "
                             f"got {tuple(images.shape[2:])}")
        if images.numel() and images.detach().abs().max() > 1 + 1e-3:
            raise ValueError(f"images must lie in [-1, 1], got values in "
                             f"[{float(images.min()):.3g}, {float(images.max()):.3g}]")

    def _check_ids(self, ids_list: Sequence[torch.Tensor]) -> None:
        """ids_list must hold one id map (B, s_k, s_k) per scale, integer, in [0, num_codes)."""
        n = len(self.scales)
        if not isinstance(ids_list, (list, tuple)) or len(ids_list) != n:
            got = len(ids_list) if isinstance(ids_list, (list, tuple)) else type(ids_list).__name__
            raise ValueError(f"ids_list must be a list of {n} id maps, one per scale {self.scales}, got {got}")
        B = ids_list[0].shape[0] if torch.is_tensor(ids_list[0]) else None
        for k, (ids, s) in enumerate(zip(ids_list, self.scales)):
            if (not torch.is_tensor(ids) or ids.dtype.is_floating_point or ids.dtype.is_complex
                    or ids.dtype == torch.bool):
                got = getattr(ids, "dtype", type(ids).__name__)
                raise ValueError(f"ids_list[{k}] must be an integer tensor, got {got}")
            if tuple(ids.shape) != (B, s, s):
                raise ValueError(f"ids_list[{k}] must have shape (B, {s}, {s}) with B = {B}, got {tuple(ids.shape)}")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.vocab_size):
                raise ValueError(f"ids_list[{k}] must lie in [0, {self.vocab_size}), "
                                 f"got values in [{int(ids.min())}, {int(ids.max())}]")

    def _scale_map(self, ids_Bss: torch.Tensor, k: int, codes_KD: torch.Tensor) -> torch.Tensor:
        """Scale k's contribution to f_hat: phi_k(bicubic-upsampled code map), (B, C, G, G)."""
        h = self.quantizer.proj_out(codes_KD[ids_Bss]).permute(0, 3, 1, 2)  # (B, C, s_k, s_k)
        G = self.scales[-1]
        if k < len(self.scales) - 1:
            h = F.interpolate(h, size=(G, G), mode="bicubic")
        return self.phis[k](h)

    def _residual_quantize(self, f_BCGG: torch.Tensor):
        """Ids per scale, the cumulative f_hat after every scale, and the lookup-space latents (detached)."""
        q = self.quantizer
        codes_KD = q._codes()
        f_rest = f_BCGG.detach()
        f_hat = torch.zeros_like(f_BCGG)
        ids_list, f_hats, latents = [], [], []
        for k, s in enumerate(self.scales):
            with torch.no_grad():
                z_ND = q.project(area_downsample(f_rest, s)).reshape(-1, q.code_dim)
                ids = q.nearest(z_ND, codes_KD.detach()).view(-1, s, s)
            h = self._scale_map(ids, k, codes_KD)
            f_hat = f_hat + h
            f_rest = f_rest - h.detach()
            ids_list.append(ids)
            f_hats.append(f_hat)
            latents.append(z_ND)
        return ids_list, f_hats, latents

    def forward(self, images: torch.Tensor) -> MultiScaleOutput:
        self._check_images(images)
        f = self.encoder(images)
        ids_list, f_hats, latents = self._residual_quantize(f)
        # VAR's loss on every cumulative f_hat: the codebook, proj_out and phis move toward f, and (x beta)
        # the encoder commits to f_hat
        loss = sum(F.mse_loss(fh, f.detach()) + self.quantizer.beta * F.mse_loss(fh.detach(), f) for fh in f_hats)
        loss = loss / len(f_hats)
        z_q = f + (f_hats[-1] - f).detach()  # straight-through: decoder sees f_hat, encoder gets its gradient
        ids_N = torch.cat([ids.flatten(1) for ids in ids_list], 1)  # (B, N)
        counts_K = torch.bincount(ids_N.flatten(), minlength=self.vocab_size).float()
        probs_K = counts_K / counts_K.sum()
        perplexity = torch.exp(-(probs_K * probs_K.clamp_min(1e-12).log()).sum())
        if self.training:
            # dead codes restart from residual latents of any scale: every scale draws from the one codebook
            z_BnD = torch.cat([z.view(images.shape[0], -1, z.shape[-1]) for z in latents], 1)  # per image
            self.quantizer._track_and_restart(counts_K.clone(), z_BnD)
        return MultiScaleOutput(self.decoder(z_q), ids_N, loss, perplexity, (counts_K > 0).float().mean())

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> ids per scale [(B, s_k, s_k) long]. Never touches codebook state."""
        self._check_images(images)
        return self._residual_quantize(self.encoder(images))[0]

    def ids_to_features(self, ids_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """ids per scale -> f_hat (B, C, G, G), the sum of the phi'd upsampled code maps (the decoder input)."""
        self._check_ids(ids_list)
        codes_KD = self.quantizer._codes()
        f_hat = torch.zeros(ids_list[0].shape[0], self.feature_dim, *self.grid_size,
                            dtype=codes_KD.dtype, device=codes_KD.device)
        for k, ids in enumerate(ids_list):
            f_hat = f_hat + self._scale_map(ids.to(codes_KD.device).long(), k, codes_KD)
        return f_hat

    def decode(self, ids_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """ids per scale -> images (B, 3, H, W) clamped to [-1, 1]."""
        return self.decoder(self.ids_to_features(ids_list)).clamp(-1, 1)

    def next_input(self, f_hat_BCGG: torch.Tensor, ids_Bss: torch.Tensor, k: int):
        """One sampling step of VAR's teacher input: add scale k's codes (k 0-based) to f_hat and return
        (f_hat_new, the input of scale k + 1 as (B, s_{k+1}^2, C)), or (f_hat_new, None) after the last scale.
        f_hat starts as zeros (B, C, G, G). Ids are not range-checked here (no host sync in the sampling loop)."""
        K = len(self.scales)
        if not 0 <= k < K:
            raise ValueError(f"k must be a scale index in [0, {K}), got {k}")
        s = self.scales[k]
        if ids_Bss.dim() != 3 or tuple(ids_Bss.shape[1:]) != (s, s):
            raise ValueError(f"ids of scale {k} must have shape (B, {s}, {s}), got {tuple(ids_Bss.shape)}")
        f_hat_BCGG = f_hat_BCGG + self._scale_map(ids_Bss.long(), k, self.quantizer._codes())
        if k == K - 1:
            return f_hat_BCGG, None
        nxt = area_downsample(f_hat_BCGG, self.scales[k + 1])  # (B, C, s_{k+1}, s_{k+1})
        return f_hat_BCGG, nxt.flatten(2).transpose(1, 2)

    def next_scale_inputs(self, ids_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forced transformer inputs (B, N - s_1^2, C): for k = 1..K-1 the cumulative f_hat after
        scales 1..k, area-downsampled to s_{k+1} x s_{k+1}, raster order, concatenated."""
        self._check_ids(ids_list)
        codes_KD = self.quantizer._codes()
        f_hat = torch.zeros(ids_list[0].shape[0], self.feature_dim, *self.grid_size,
                            dtype=codes_KD.dtype, device=codes_KD.device)
        inputs = []
        for k, ids in enumerate(ids_list[:-1]):
            f_hat, x_BlC = self.next_input(f_hat, ids.to(codes_KD.device), k)
            inputs.append(x_BlC)
        if not inputs:
            return f_hat.new_zeros(f_hat.shape[0], 0, self.feature_dim)
        return torch.cat(inputs, 1)
