"""Convolutional VQGAN (Esser et al., 2021, "Taming Transformers") with the ViT-VQGAN codebook (Yu et al., 2022).

Encoder/decoder: residual blocks with GroupNorm + SiLU, stride-2 downsampling per `channel_mult` step after
the first (so (1, 2, 2, 4) downsamples 8x), one self-attention block in the middle. The quantizer is the
factorized, l2-normalized `FactorizedQuantizer`. Images are float (B, 3, H, W) in [-1, 1].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from tokenizers_vis.quantize import FactorizedQuantizer


def _norm(c):
    return nn.GroupNorm(min(32, c // 4) if c >= 8 else 1, c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin, cout):
        super().__init__()
        self.block = nn.Sequential(_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                   _norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.block(x)


class AttnBlock(nn.Module):
    def __init__(self, c):
        super().__init__()
        self.norm = _norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # (B, HW, C) each
        y = F.scaled_dot_product_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1)).squeeze(1)
        return x + self.out(y.transpose(1, 2).reshape(B, C, H, W))


class Encoder(nn.Module):
    def __init__(self, in_ch, base, mult, n_res, out_ch):
        super().__init__()
        layers = [nn.Conv2d(in_ch, base * mult[0], 3, padding=1)]
        c = base * mult[0]
        for i, m in enumerate(mult):
            for _ in range(n_res):
                layers.append(ResBlock(c, base * m))
                c = base * m
            if i < len(mult) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers += [ResBlock(c, c), AttnBlock(c), ResBlock(c, c), _norm(c), nn.SiLU(), nn.Conv2d(c, out_ch, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, out_ch, base, mult, n_res, in_ch):
        super().__init__()
        c = base * mult[-1]
        layers = [nn.Conv2d(in_ch, c, 3, padding=1), ResBlock(c, c), AttnBlock(c), ResBlock(c, c)]
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(n_res + 1):
                layers.append(ResBlock(c, base * m))
                c = base * m
            if i > 0:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [_norm(c), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(c, out_ch, 3, padding=1)

    def forward(self, z):
        return self.conv_out(self.net(z))


@dataclass
class VQGANOutput:
    recon: torch.Tensor  # (B, 3, H, W)
    ids: torch.Tensor  # (B, h, w)
    quant_loss: torch.Tensor
    perplexity: torch.Tensor
    usage: torch.Tensor


class VQGAN(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        base_channels: int = 64,
        channel_mult: tuple[int, ...] = (1, 2, 2, 4),
        num_res_blocks: int = 1,
        embed_dim: int = 64,
        num_codes: int = 512,
        code_dim: int = 8,
        beta: float = 0.25,
        l2_norm: bool = True,
        restart_threshold: float = 0.03,
        image_size: int = 64,
    ):
        super().__init__()
        mult = tuple(channel_mult)
        self.encoder = Encoder(in_channels, base_channels, mult, num_res_blocks, embed_dim)
        self.quantizer = FactorizedQuantizer(num_codes, embed_dim, code_dim, beta, l2_norm, restart_threshold)
        self.decoder = Decoder(in_channels, base_channels, mult, num_res_blocks, embed_dim)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    @property
    def vocab_size(self) -> int:
        return self.config.num_codes

    @property
    def grid_size(self) -> tuple[int, int]:
        s = self.config.image_size // self.downsample_factor
        return (s, s)

    @property
    def last_layer(self) -> torch.Tensor:
        return self.decoder.conv_out.weight

    def _check_images(self, images):
        f = self.downsample_factor
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != self.config.in_channels:
            shape = tuple(images.shape) if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a float tensor (B, {self.config.in_channels}, H, W) in [-1, 1], "
                             f"got {shape}")
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"images height and width must be multiples of {f}, got {tuple(images.shape[2:])}")

    def quantize(self, images):
        self._check_images(images)
        return self.quantizer(self.encoder(images))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> codes (B, H/f, W/f)."""
        return self.quantize(images).ids

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Codes (B, h, w) -> images (B, 3, h*f, w*f) in [-1, 1]."""
        if ids.dim() != 3:
            raise ValueError(f"ids must have shape (B, h, w), got {tuple(ids.shape)}")
        return self.decoder(self.quantizer.lookup(ids)).clamp(-1, 1)

    def forward(self, images: torch.Tensor) -> VQGANOutput:
        q = self.quantize(images)
        return VQGANOutput(self.decoder(q.z_q), q.ids, q.loss, q.perplexity, q.usage)
