"""VAR's multi-scale VQVAE (Tian et al., 2024, "Visual Autoregressive Modeling", arXiv 2404.02905) in the layout
of its released `vae_ch160v4096z32.pth`, behind the visual-tokenizer protocol, so `mmgen convert var` can load
those weights and the VAR pipeline can decode what the released transformer samples.

The encoder/decoder are the taming / latent-diffusion VQ-f16 networks (Esser et al., 2021): GroupNorm(32) +
SiLU residual blocks, `num_res_blocks` per level in the encoder and one more in the decoder, single-head
self-attention after every block of the lowest-resolution level and in the middle, stride-2 convs padded on
the right and bottom only. `quant_conv` / `post_quant_conv` sit between them and the quantizer.

The quantizer is VAR's residual one with a plain (not normalized) codebook of `vocab_size` x `z_channels`: at
scale k the residual is area-downsampled to s_k x s_k (not at the last scale, which is the grid), each cell takes
its Euclidean-nearest code, the code map is upsampled bicubically to the grid, passed through a phi conv mixed by
`phi_ratio` (h <- (1 - r) h + r conv(h)) and added to f_hat. `num_phis` phis are shared over the K scales: scale k
uses the phi whose tick is nearest to k / (K - 1) (ticks evenly spaced, inset by 1/(3n) for n = 4 and by 1/(2n)
otherwise, as VAR places them). Tokens are every scale's ids, raster order, concatenated coarse to fine.

Parameter names follow the released state dict (encoder.down.0.block.0.norm1.weight, ...); the phis are
`quantize.phis.<i>` (`mmgen.convert.var` maps VAR's three phi layouts onto them).

Letters: B batch, C channels, Cv = z_channels, G grid side (= patch_nums[-1]), K scales, L = sum s_k^2, V vocab.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from tokenizers_vis.shared import SharedComponentMixin


def _norm(c: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, c, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(cin), nn.Conv2d(cin, cout, 3, padding=1)
        self.norm2, self.conv2 = _norm(cout), nn.Conv2d(cout, cout, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        return self.nin_shortcut(x) + self.conv2(F.silu(self.norm2(h)))


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions, q, k, v from one 1x1 conv."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.qkv, self.proj_out = _norm(c), nn.Conv2d(c, 3 * c, 1), nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).reshape(B, 3, C, H * W).transpose(2, 3).unbind(1)  # (B, HW, C) each
        h = F.scaled_dot_product_attention(q, k, v)  # scale C^-1/2
        return x + self.proj_out(h.transpose(1, 2).reshape(B, C, H, W))


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # right and bottom only, as taming pads


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


def _level(blocks: list[nn.Module], attn: list[nn.Module]) -> nn.Module:
    level = nn.Module()
    level.block, level.attn = nn.ModuleList(blocks), nn.ModuleList(attn)
    return level


def _middle(c: int, attention: bool) -> nn.Module:
    mid = nn.Module()
    mid.block_1, mid.attn_1, mid.block_2 = ResnetBlock(c, c), AttnBlock(c) if attention else nn.Identity(), \
        ResnetBlock(c, c)
    return mid


class Encoder(nn.Module):
    def __init__(self, in_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 using_sa: bool, using_mid_sa: bool):
        super().__init__()
        self.conv_in = nn.Conv2d(in_channels, ch, 3, padding=1)
        self.down = nn.ModuleList()
        c, last = ch, len(ch_mult) - 1
        for i, m in enumerate(ch_mult):
            blocks, attn = [], []
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(c, ch * m))
                c = ch * m
                if i == last and using_sa:
                    attn.append(AttnBlock(c))
            level = _level(blocks, attn)
            if i != last:
                level.downsample = Downsample(c)
            self.down.append(level)
        self.mid = _middle(c, using_mid_sa)
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.down:
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, out_channels: int, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int,
                 using_sa: bool, using_mid_sa: bool):
        super().__init__()
        c, last = ch * ch_mult[-1], len(ch_mult) - 1
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _middle(c, using_mid_sa)
        levels = []
        for i in reversed(range(len(ch_mult))):  # built coarse to fine, stored by level index like the encoder
            blocks, attn = [], []
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(c, ch * ch_mult[i]))
                c = ch * ch_mult[i]
                if i == last and using_sa:
                    attn.append(AttnBlock(c))
            level = _level(blocks, attn)
            if i != 0:
                level.upsample = Upsample(c)
            levels.insert(0, level)
        self.up = nn.ModuleList(levels)
        self.norm_out, self.conv_out = _norm(c), nn.Conv2d(c, out_channels, 3, padding=1)

    def forward(self, z):
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(self.conv_in(z))))
        for level in reversed(self.up):
            for j, block in enumerate(level.block):
                h = block(h)
                if len(level.attn):
                    h = level.attn[j](h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Phi(nn.Conv2d):
    """VAR's `quant_resi`: h <- (1 - ratio) h + ratio conv3x3(h), repairing the blur of the bicubic upsampling."""

    def __init__(self, c: int, ratio: float):
        super().__init__(c, c, 3, padding=1)
        self.ratio = ratio

    def forward(self, h_BCGG):
        return h_BCGG * (1 - self.ratio) + super().forward(h_BCGG) * self.ratio


def phi_schedule(num_scales: int, num_phis: int) -> tuple[int, ...]:
    """Which of the `num_phis` shared phis each scale uses: the one whose tick is nearest to k / (K - 1), the
    first on a tie. numpy's linspace and argmin, so ties fall exactly as in the released code."""
    n = num_phis
    inset = 1 / 3 / n if n == 4 else 1 / 2 / n
    ticks = np.linspace(inset, 1 - inset, n)
    return tuple(int(np.argmin(np.abs(ticks - k / (num_scales - 1)))) for k in range(num_scales))


class VARQuantizer(nn.Module):
    def __init__(self, vocab_size: int, z_channels: int, num_phis: int, phi_ratio: float):
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, z_channels)
        self.phis = nn.ModuleList(Phi(z_channels, phi_ratio) for _ in range(num_phis))


def _check_patch_nums(patch_nums) -> tuple[int, ...]:
    pn = tuple(patch_nums)
    if (len(pn) < 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0 for s in pn)
            or any(a >= b for a, b in zip(pn, pn[1:]))):
        raise ValueError(f"patch_nums must be at least 2 strictly increasing positive ints, got {patch_nums!r}")
    return pn


class VARVQVAE(SharedComponentMixin, ModelMixin, ConfigMixin):
    """The released VAR VQVAE (defaults: `vae_ch160v4096z32.pth`, 256 px, 10 scales)."""

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        ch: int = 160,
        ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4),
        num_res_blocks: int = 2,
        z_channels: int = 32,
        vocab_size: int = 4096,
        quant_conv_kernel: int = 3,
        num_phis: int = 4,
        phi_ratio: float = 0.5,
        patch_nums: tuple[int, ...] = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16),
        using_sa: bool = True,
        using_mid_sa: bool = True,
    ):
        super().__init__()
        mult = tuple(ch_mult)
        if not mult or not all(isinstance(m, int) and m > 0 for m in mult):
            raise ValueError(f"ch_mult must be a non-empty sequence of positive ints, got {ch_mult!r}")
        if not isinstance(ch, int) or ch < 32 or ch % 32:
            raise ValueError(f"ch must be a positive multiple of 32 (GroupNorm's 32 groups), got {ch!r}")
        if not isinstance(num_phis, int) or num_phis < 1:
            raise ValueError(f"num_phis must be a positive int, got {num_phis!r}")
        if not isinstance(quant_conv_kernel, int) or quant_conv_kernel % 2 == 0:
            raise ValueError(f"quant_conv_kernel must be an odd int, got {quant_conv_kernel!r}")
        pn = _check_patch_nums(patch_nums)
        self.register_to_config(ch_mult=mult, patch_nums=pn)  # tuples, also after a JSON round trip
        self.encoder = Encoder(in_channels, ch, mult, num_res_blocks, z_channels, using_sa, using_mid_sa)
        self.decoder = Decoder(in_channels, ch, mult, num_res_blocks, z_channels, using_sa, using_mid_sa)
        self.quantize = VARQuantizer(vocab_size, z_channels, num_phis, phi_ratio)
        pad = quant_conv_kernel // 2
        self.quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_kernel, padding=pad)
        self.post_quant_conv = nn.Conv2d(z_channels, z_channels, quant_conv_kernel, padding=pad)
        self.phi_of_scale = phi_schedule(len(pn), num_phis)

    # ---- visual tokenizer protocol (tokenizers_vis.protocol) ----
    kind = "scale_codes"

    @property
    def scales(self) -> tuple[int, ...]:
        return tuple(self.config.patch_nums)

    @property
    def feature_dim(self) -> int:
        return self.config.z_channels

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def image_size(self) -> int:
        return self.scales[-1] * self.downsample_factor

    @property
    def num_tokens(self) -> int:
        return sum(s * s for s in self.scales)

    @property
    def token_shape(self) -> tuple[int]:
        return (self.num_tokens,)

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantize.embedding.weight

    def split_scales(self, ids_BL: torch.Tensor) -> list[torch.Tensor]:
        """(B, L) concatenated ids -> [(B, s_k, s_k)] per scale."""
        sizes = [s * s for s in self.scales]
        if ids_BL.dim() != 2 or ids_BL.shape[1] != sum(sizes):
            raise ValueError(f"scale codes must have shape (B, {sum(sizes)}), got {tuple(ids_BL.shape)}")
        return [t.reshape(-1, s, s) for t, s in zip(ids_BL.split(sizes, 1), self.scales)]

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return torch.cat([ids.flatten(1) for ids in self.encode(images)], 1)

    def decode_tokens(self, ids_BL: torch.Tensor) -> torch.Tensor:
        ids_list = self.split_scales(ids_BL)
        if ids_BL.numel() and (int(ids_BL.min()) < 0 or int(ids_BL.max()) >= self.vocab_size):
            raise ValueError(f"scale codes must lie in [0, {self.vocab_size}), got values in "
                             f"[{int(ids_BL.min())}, {int(ids_BL.max())}]")
        f_hat = None
        for k, ids in enumerate(ids_list):
            f_hat, _ = self.next_input(f_hat, ids, k)
        return self.fhat_to_img(f_hat)

    # ---- VAR's quantizer steps ----
    def _scale_map(self, h_BCss: torch.Tensor, k: int) -> torch.Tensor:
        """Scale k's code map (B, Cv, s_k, s_k) as its contribution to f_hat (B, Cv, G, G)."""
        G = self.scales[-1]
        if k != len(self.scales) - 1:
            h_BCss = F.interpolate(h_BCss, size=(G, G), mode="bicubic")
        return self.quantize.phis[self.phi_of_scale[k]](h_BCss)

    def next_input(self, f_hat_BCGG: torch.Tensor | None, ids_Bss: torch.Tensor, k: int):
        """One sampling step (VAR's `get_next_autoregressive_input`): add scale k's codes (k 0-based) to f_hat
        (None: zeros) and return (f_hat, the next scale's input as (B, s_{k+1}^2, Cv)), or (f_hat, None) after
        the last scale. Ids are not range-checked here (no host sync in the sampling loop)."""
        s, G = self.scales[k], self.scales[-1]
        h = self.quantize.embedding(ids_Bss.long().reshape(-1, s * s)).transpose(1, 2).reshape(-1, self.feature_dim,
                                                                                                s, s)
        if f_hat_BCGG is None:
            f_hat_BCGG = h.new_zeros(h.shape[0], self.feature_dim, G, G)
        f_hat_BCGG = f_hat_BCGG + self._scale_map(h, k)
        if k == len(self.scales) - 1:
            return f_hat_BCGG, None
        nxt = self.scales[k + 1]
        return f_hat_BCGG, F.interpolate(f_hat_BCGG, size=(nxt, nxt), mode="area").flatten(2).transpose(1, 2)

    def next_scale_inputs(self, ids_list: Sequence[torch.Tensor]) -> torch.Tensor:
        """Teacher-forced transformer inputs (B, L - s_1^2, Cv): f_hat after scales 1..k, area-downsampled to
        scale k + 1, for k = 1..K-1, concatenated."""
        f_hat, inputs = None, []
        for k, ids in enumerate(ids_list[:-1]):
            f_hat, x_BlC = self.next_input(f_hat, ids, k)
            inputs.append(x_BlC)
        return torch.cat(inputs, 1)

    def fhat_to_img(self, f_hat_BCGG: torch.Tensor) -> torch.Tensor:
        """f_hat -> images (B, 3, H, W) clamped to [-1, 1]."""
        return self.decoder(self.post_quant_conv(f_hat_BCGG)).clamp(-1, 1)

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Images (B, 3, H, W) in [-1, 1] -> ids per scale [(B, s_k, s_k) long], Euclidean-nearest codes of the
        residual, coarse to fine."""
        size = self.image_size
        if not torch.is_tensor(images) or images.dim() != 4 or tuple(images.shape[1:]) != (
                self.config.in_channels, size, size):
            got = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a float tensor (B, {self.config.in_channels}, {size}, {size}) in "
                             f"[-1, 1], got {got}")
        f_rest = self.quant_conv(self.encoder(images))
        codes_VC = self.quantize.embedding.weight
        ids_list, K = [], len(self.scales)
        for k, s in enumerate(self.scales):
            z = f_rest if k == K - 1 else F.interpolate(f_rest, size=(s, s), mode="area")
            z_NC = z.permute(0, 2, 3, 1).reshape(-1, self.feature_dim)
            dist_NV = z_NC.square().sum(1, keepdim=True) + codes_VC.square().sum(1) - 2 * z_NC @ codes_VC.T
            ids = dist_NV.argmin(1).view(-1, s, s)
            f_rest = f_rest - self._scale_map(self.quantize.embedding(ids).permute(0, 3, 1, 2), k)
            ids_list.append(ids)
        return ids_list
