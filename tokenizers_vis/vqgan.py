"""Convolutional VQGAN (Esser et al., 2021, "Taming Transformers for High-Resolution Image Synthesis") with the
ViT-VQGAN codebook (Yu et al., 2022, arXiv 2110.04627): factorized, l2-normalized codes.

The encoder and decoder follow the taming lineage: residual blocks of GroupNorm + SiLU + 3x3 conv, a stride-2
conv between `channel_mult` levels (so (1, 2, 2, 4) downsamples 8x), and a middle of ResBlock, optional
single-head self-attention, ResBlock. ViT-VQGAN swaps these CNNs for ViTs; at 64x64 on a CPU a small CNN
is the practical choice, and the codebook improvements carry over unchanged.

Images are float (B, 3, H, W) in [-1, 1]; ids are long (B, h, w) with h = H / f, w = W / f, f the
downsampling factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from tokenizers_vis.quantize import FactorizedQuantizer, GridCodesMixin
from tokenizers_vis.shared import SharedComponentMixin


def group_norm(c: int) -> nn.GroupNorm:
    # 32 groups as in taming, fewer for thin layers: the most groups <= 32 that divide c with >= 4 channels each
    groups = max([g for g in range(1, 33) if c % g == 0 and c // g >= 4] or [1])
    return nn.GroupNorm(groups, c, eps=1e-6)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.block = nn.Sequential(group_norm(cin), nn.SiLU(), nn.Conv2d(cin, cout, 3, padding=1),
                                   group_norm(cout), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1))
        self.skip = nn.Conv2d(cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x):
        return self.skip(x) + self.block(x)


class AttnBlock(nn.Module):
    """Single-head self-attention over the h*w positions, residual (taming's mid-block attention)."""

    def __init__(self, c: int):
        super().__init__()
        self.norm = group_norm(c)
        self.qkv = nn.Conv2d(c, 3 * c, 1)
        self.out = nn.Conv2d(c, c, 1)

    def forward(self, x):
        B, C, H, W = x.shape
        q, k, v = self.qkv(self.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=-1)  # (B, HW, C) each
        y = F.scaled_dot_product_attention(q, k, v)  # (B, HW, C)
        return x + self.out(y.transpose(1, 2).reshape(B, C, H, W))


def _middle(c: int, attention: bool) -> list[nn.Module]:
    # Identity keeps the Sequential indices, hence the state-dict keys, the same with or without attention
    return [ResBlock(c, c), AttnBlock(c) if attention else nn.Identity(), ResBlock(c, c)]


class Encoder(nn.Module):
    def __init__(self, in_ch: int, base: int, mult: tuple[int, ...], n_res: int, out_ch: int, attention: bool):
        super().__init__()
        c = base * mult[0]
        layers = [nn.Conv2d(in_ch, c, 3, padding=1)]
        for i, m in enumerate(mult):
            for _ in range(n_res):
                layers.append(ResBlock(c, base * m))
                c = base * m
            if i < len(mult) - 1:
                layers.append(nn.Conv2d(c, c, 3, stride=2, padding=1))
        layers += _middle(c, attention) + [group_norm(c), nn.SiLU(), nn.Conv2d(c, out_ch, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x)


class Decoder(nn.Module):
    def __init__(self, out_ch: int, base: int, mult: tuple[int, ...], n_res: int, in_ch: int, attention: bool):
        super().__init__()
        c = base * mult[-1]
        layers = [nn.Conv2d(in_ch, c, 3, padding=1)] + _middle(c, attention)
        for i, m in reversed(list(enumerate(mult))):
            for _ in range(n_res + 1):  # one more than the encoder, as in taming
                layers.append(ResBlock(c, base * m))
                c = base * m
            if i > 0:
                layers += [nn.Upsample(scale_factor=2.0, mode="nearest"), nn.Conv2d(c, c, 3, padding=1)]
        layers += [group_norm(c), nn.SiLU()]
        self.net = nn.Sequential(*layers)
        self.conv_out = nn.Conv2d(c, out_ch, 3, padding=1)  # kept apart: its weight is `last_layer`

    def forward(self, z):
        return self.conv_out(self.net(z))


@dataclass
class VQGANOutput:
    recon: torch.Tensor  # (B, 3, H, W) float, not clamped (the losses see the raw output)
    ids: torch.Tensor  # (B, h, w) long
    quant_loss: torch.Tensor  # () codebook + beta * commitment
    perplexity: torch.Tensor  # () of this batch's code histogram
    usage: torch.Tensor  # () fraction of codes hit in this batch


class VQGAN(SharedComponentMixin, GridCodesMixin, ModelMixin, ConfigMixin):
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
        # JSON turns the tuple into a list; store the tuple so a reloaded config equals the original
        self.register_to_config(channel_mult=mult)
        self.encoder = Encoder(in_channels, base_channels, mult, num_res_blocks, embed_dim, mid_attention)
        self.quantizer = FactorizedQuantizer(num_codes, embed_dim, code_dim, beta, l2_norm, restart_threshold,
                                             restart_interval, ema_decay)
        self.decoder = Decoder(in_channels, base_channels, mult, num_res_blocks, embed_dim, mid_attention)

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.config.channel_mult) - 1)

    @property
    def vocab_size(self) -> int:
        return self.config.num_codes

    @property
    def grid_size(self) -> tuple[int, int]:
        """(h, w) token grid for a config.image_size square image."""
        s = self.config.image_size // self.downsample_factor
        return (s, s)

    @property
    def last_layer(self) -> torch.Tensor:
        """Weight of the decoder's output conv, where the adaptive GAN weight compares gradient norms."""
        return self.decoder.conv_out.weight

    def _check_images(self, images) -> None:
        c, f = self.config.in_channels, self.downsample_factor
        if not torch.is_tensor(images) or images.dim() != 4 or images.shape[1] != c or not images.is_floating_point():
            got = f"{tuple(images.shape)} {images.dtype}" if torch.is_tensor(images) else type(images).__name__
            raise ValueError(f"images must be a float tensor (B, {c}, H, W) in [-1, 1], got {got}")
        if images.shape[2] % f or images.shape[3] % f:
            raise ValueError(f"images height and width must be multiples of the downsampling factor {f}, "
                             f"got {tuple(images.shape[2:])}")
        # catches [0, 255] input; [0, 1] input cannot be told apart from a dark [-1, 1] image
        if images.numel() and images.detach().abs().max() > 1 + 1e-3:
            raise ValueError(f"images must lie in [-1, 1], got values in "
                             f"[{float(images.min()):.3g}, {float(images.max()):.3g}]")

    def quantize(self, images: torch.Tensor):
        """Images -> the quantizer's full output (z_q, ids, loss, perplexity, usage)."""
        self._check_images(images)
        return self.quantizer(self.encoder(images))

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) in [-1, 1] -> ids (B, H/f, W/f) long. Never touches codebook state."""
        self._check_images(images)
        return self.quantizer.ids_from_map(self.encoder(images))

    def decode(self, ids: torch.Tensor) -> torch.Tensor:
        """Ids (B, h, w) -> images (B, 3, h*f, w*f) clamped to [-1, 1]."""
        return self.decoder(self.quantizer.lookup(ids)).clamp(-1, 1)

    def forward(self, images: torch.Tensor) -> VQGANOutput:
        q = self.quantize(images)
        return VQGANOutput(self.decoder(q.z_q), q.ids, q.loss, q.perplexity, q.usage)
