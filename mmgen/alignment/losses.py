"""Alignment losses on decoder hidden states.

* ``arra`` (Xie et al., ARRA, arXiv 2503.07334): the hidden state after block `layer` at every image-token
  position (the positions that carry the hybrid <HYBNEXT> role: next-token prediction and global semantic
  distillation) goes through a 2-layer GELU MLP and is aligned by cosine to the target's global feature;
  L_align = 1 - mean cos. L = L_AR + weight * L_align, weight 1 and layer 1 by default (the released code).
* ``repa`` (REPA-style): the same projected hidden states, position by position, against the target's patch
  features resampled (bilinear) to the token grid; 1 - mean cos.
* ``ola`` (OLA-style embedding distillation): the image positions' mean hidden state predicts the target's
  global embedding: L1 plus an InfoNCE term that tells the batch's samples apart.

The projector (`AlignmentHead`) exists only in training; the pipeline never holds it, so sampling is
unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

ALIGNMENT_TYPES = ("none", "arra", "repa", "ola")


@dataclass
class AlignmentConfig:
    type: str = "none"
    encoder: str = "efficientnet_lite0"
    layer: int = 1  # hidden state after this many blocks
    weight: float = 1.0
    proj_dim: int = 512
    temperature: float = 0.1  # OLA contrastive
    cache: bool = True  # precompute target features for the dataset once

    def validate(self, n_layers: int) -> None:
        if self.type not in ALIGNMENT_TYPES:
            raise ValueError(f"alignment.type must be one of {', '.join(ALIGNMENT_TYPES)}; got {self.type!r}")
        if self.type == "none":
            return
        if not isinstance(self.layer, int) or not 1 <= self.layer <= n_layers:
            raise ValueError(f"alignment.layer must be an integer in [1, {n_layers}] (blocks of the decoder); "
                             f"got {self.layer!r}")
        if not self.weight > 0:
            raise ValueError(f"alignment.weight must be > 0, got {self.weight}")
        base = self.encoder.partition(":")[0]
        if base not in ("efficientnet_lite0", "open_clip", "tokenizer"):
            raise ValueError(f"alignment.encoder must be one of efficientnet_lite0, open_clip[:MODEL@CKPT], "
                             f"tokenizer; got {self.encoder!r}")


class AlignmentHead(nn.Module):
    def __init__(self, config: AlignmentConfig, hidden_dim: int, target_dim: int):
        super().__init__()
        self.config = config
        self.proj = nn.Sequential(nn.Linear(hidden_dim, config.proj_dim), nn.GELU(),
                                  nn.Linear(config.proj_dim, target_dim))

    def forward(self, hidden_BNC: torch.Tensor, target_global_BD: torch.Tensor | None = None,
                target_patches_BND: torch.Tensor | None = None) -> torch.Tensor:
        """hidden_BNC: hidden states at the N image-token positions; returns the alignment loss."""
        t = self.config.type
        if t == "arra":
            z = self.proj(hidden_BNC)
            return 1 - F.cosine_similarity(z, target_global_BD[:, None, :].to(z.dtype), dim=-1).mean()
        if t == "repa":
            z = self.proj(hidden_BNC)
            if target_patches_BND.shape[1] != z.shape[1]:
                raise ValueError(f"target has {target_patches_BND.shape[1]} patches for {z.shape[1]} image tokens; "
                                 f"resample it to the token grid first (resample_patches)")
            return 1 - F.cosine_similarity(z, target_patches_BND.to(z.dtype), dim=-1).mean()
        if t == "ola":
            z = self.proj(hidden_BNC.mean(1))
            target = target_global_BD.to(z.dtype)
            l1 = (z - target).abs().mean()
            logits = F.normalize(z, dim=-1) @ F.normalize(target, dim=-1).t() / self.config.temperature
            return l1 + F.cross_entropy(logits, torch.arange(len(z), device=z.device))
        raise ValueError(f"alignment.type {t!r} has no loss")


def resample_patches(patches_BND: torch.Tensor, grid_in: tuple[int, int], grid_out: tuple[int, int]):
    """Patch features on grid_in -> grid_out (bilinear), (B, h*w, D)."""
    B, N, D = patches_BND.shape
    x = patches_BND.transpose(1, 2).reshape(B, D, *grid_in)
    if tuple(grid_in) != tuple(grid_out):
        x = F.interpolate(x, size=grid_out, mode="bilinear", align_corners=False)
    return x.flatten(2).transpose(1, 2)
