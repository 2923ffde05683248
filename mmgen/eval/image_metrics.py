"""Reconstruction metrics for tokenizers: PSNR and SSIM (torchmetrics), codebook usage and perplexity."""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _to01(x: torch.Tensor) -> torch.Tensor:
    return ((x.float() + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean per-image PSNR in dB of images in [-1, 1], (B, 3, H, W)."""
    a, b = _to01(a), _to01(b)
    return peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return structural_similarity_index_measure(_to01(a), _to01(b), data_range=1.0)


def codebook_usage(ids: torch.Tensor, num_codes: int) -> dict:
    counts = torch.bincount(ids.flatten().long(), minlength=num_codes).float()
    p = counts / counts.sum()
    return {"codebook_usage": float((counts > 0).float().mean()),
            "codebook_perplexity": float(torch.exp(-(p * p.clamp_min(1e-12).log()).sum()))}
