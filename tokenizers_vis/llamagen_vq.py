"""LlamaGen's VQ image tokenizer (Sun et al. 2024, arXiv 2406.06525): the taming-transformers VQGAN
encoder/decoder (Esser et al. 2021) with an l2-normalised codebook (ViT-VQGAN, Yu et al. 2022), under
LlamaGen's own parameter names so its released files (`vq_ds16_c2i.pt`, `vq_ds8_c2i.pt`) load as they are.

Encoder: conv_in, per level `num_res_blocks` ResNet blocks (self-attention after each at the lowest level) and a
stride-2 conv (padded right/bottom) between levels, then ResNet-attention-ResNet, GroupNorm(32)-swish-conv_out,
a 1x1 `quant_conv` to the codebook width. Decoder: the mirror with `num_res_blocks + 1` blocks per level and
nearest-upsample-conv. The codebook lookup and `get_codebook_entry` both use l2-normalised vectors. The training
buffer `codebook_used` is not part of this model.

Implements the visual-tokenizer protocol (`tokenizers_vis.protocol`): images (B, 3, H, W) in [-1, 1] <-> codes
(B, h, w).
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from tokenizers_vis.shared import SharedComponentMixin


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int):
        super().__init__()
        self.norm1, self.conv1 = _norm(c_in), nn.Conv2d(c_in, c_out, 3, padding=1)
        self.norm2, self.conv2 = _norm(c_out), nn.Conv2d(c_out, c_out, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(c_in, c_out, 1) if c_in != c_out else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.norm = _norm(c)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(c, c, 1) for _ in range(4))

    def forward(self, x_BCHW):
        B, C, H, W = x_BCHW.shape
        h = self.norm(x_BCHW)
        q = self.q(h).flatten(2).transpose(1, 2)  # (B, HW, C)
        k, v = self.k(h).flatten(2), self.v(h).flatten(2)  # (B, C, HW)
        attn = (torch.bmm(q, k) * C ** -0.5).softmax(-1)  # (B, HW query, HW key)
        out = torch.bmm(v, attn.transpose(1, 2)).view(B, C, H, W)
        return x_BCHW + self.proj_out(out)


class Downsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, stride=2)

    def forward(self, x):
        return self.conv(F.pad(x, (0, 1, 0, 1)))


class Upsample(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.conv = nn.Conv2d(c, c, 3, padding=1)

    def forward(self, x):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


def _level(blocks: int, c_in: int, c_out: int, attn: bool) -> tuple[nn.Module, int]:
    level = nn.Module()
    level.res = nn.ModuleList()
    level.attn = nn.ModuleList()
    for _ in range(blocks):
        level.res.append(ResnetBlock(c_in, c_out))
        c_in = c_out
        if attn:
            level.attn.append(AttnBlock(c_out))
    return level, c_out


def _run_level(level: nn.Module, h):
    for i, res in enumerate(level.res):
        h = res(h)
        if len(level.attn):
            h = level.attn[i](h)
    return h


def _mid(c: int) -> nn.ModuleList:
    return nn.ModuleList([ResnetBlock(c, c), AttnBlock(c), ResnetBlock(c, c)])


class Encoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int):
        super().__init__()
        self.conv_in = nn.Conv2d(3, ch, 3, padding=1)
        self.conv_blocks = nn.ModuleList()
        c = ch
        for i, mult in enumerate(ch_mult):
            last = i == len(ch_mult) - 1
            level, c = _level(num_res_blocks, c, ch * mult, attn=last)
            if not last:
                level.downsample = Downsample(c)
            self.conv_blocks.append(level)
        self.mid = _mid(c)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, z_channels, 3, padding=1)

    def forward(self, x):
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "downsample"):
                h = level.downsample(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, ch: int, ch_mult: tuple[int, ...], num_res_blocks: int, z_channels: int):
        super().__init__()
        c = ch * ch_mult[-1]
        self.conv_in = nn.Conv2d(z_channels, c, 3, padding=1)
        self.mid = _mid(c)
        self.conv_blocks = nn.ModuleList()
        for i in reversed(range(len(ch_mult))):
            level, c = _level(num_res_blocks + 1, c, ch * ch_mult[i], attn=i == len(ch_mult) - 1)
            if i != 0:
                level.upsample = Upsample(c)
            self.conv_blocks.append(level)
        self.norm_out = _norm(c)
        self.conv_out = nn.Conv2d(c, 3, 3, padding=1)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = _run_level(level, h)
            if hasattr(level, "upsample"):
                h = level.upsample(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Quantizer(nn.Module):
    def __init__(self, codebook_size: int, dim: int):
        super().__init__()
        self.embedding = nn.Embedding(codebook_size, dim)

    @property
    def codebook(self) -> torch.Tensor:
        return F.normalize(self.embedding.weight, p=2, dim=-1)

    def indices(self, z_BDhw: torch.Tensor) -> torch.Tensor:
        """Nearest l2-normalised codebook entry of each l2-normalised vector, (B, h, w)."""
        z = F.normalize(z_BDhw.permute(0, 2, 3, 1), p=2, dim=-1)
        e = self.codebook
        d = z.pow(2).sum(-1, keepdim=True) + e.pow(2).sum(-1) - 2 * z @ e.t()
        return d.argmin(-1)

    def lookup(self, ids_Bhw: torch.Tensor) -> torch.Tensor:
        return self.codebook[ids_Bhw].permute(0, 3, 1, 2)  # (B, D, h, w)


class LlamaGenVQ(SharedComponentMixin, ModelMixin, ConfigMixin):
    """LlamaGen's VQ tokenizer; `image_size` is the pixel side it is used at (grid: image_size / 2^(levels - 1))."""

    kind = "codes"

    @register_to_config
    def __init__(self, codebook_size: int = 16384, codebook_embed_dim: int = 8, z_channels: int = 256,
                 ch: int = 128, ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4), num_res_blocks: int = 2,
                 image_size: int = 256):
        super().__init__()
        ch_mult = tuple(ch_mult)
        if image_size % 2 ** (len(ch_mult) - 1):
            raise ValueError(f"image_size ({image_size}) must be a multiple of the downsampling factor "
                             f"{2 ** (len(ch_mult) - 1)}")
        self.encoder = Encoder(ch, ch_mult, num_res_blocks, z_channels)
        self.decoder = Decoder(ch, ch_mult, num_res_blocks, z_channels)
        self.quantize = Quantizer(codebook_size, codebook_embed_dim)
        self.quant_conv = nn.Conv2d(z_channels, codebook_embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(codebook_embed_dim, z_channels, 1)

    # the visual-tokenizer protocol
    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.config.ch_mult) - 1)

    @property
    def token_shape(self) -> tuple[int, int]:
        side = self.config.image_size // self.downsample
        return side, side

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @property
    def codebook(self) -> torch.Tensor:
        return self.quantize.codebook

    def encode_tokens(self, images: torch.Tensor) -> torch.Tensor:
        return self.quantize.indices(self.quant_conv(self.encoder(images)))

    def decode_tokens(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, 3, H, W) clamped to [-1, 1] (LlamaGen's sample scripts clamp the pixels
        of its `decode_code` the same way)."""
        if ids.dim() != 3:
            raise ValueError(f"codes must have shape (B, h, w), got {tuple(ids.shape)}")
        return self.decoder(self.post_quant_conv(self.quantize.lookup(ids))).clamp(-1, 1)
