"""Tokenizer reconstruction metrics: PSNR and SSIM (Wang et al., 2004) through torchmetrics, and codebook usage
and perplexity (the code-utilization numbers reported by ViT-VQGAN, Yu et al., 2022).

Images are float (B, 3, H, W) in [-1, 1]; both metrics are computed on [0, 1] with data_range 1.
"""

from __future__ import annotations

import torch
from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure


def _pair01(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    if a.shape != b.shape or a.dim() != 4:
        raise ValueError(f"a and b must be image batches (B, C, H, W) of the same shape, got {tuple(a.shape)} "
                         f"and {tuple(b.shape)}")
    return ((a.detach().float() + 1) / 2).clamp(0, 1), ((b.detach().float() + 1) / 2).clamp(0, 1)


def psnr(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of per-image PSNR in dB (inf for an identical pair)."""
    a, b = _pair01(a, b)
    return peak_signal_noise_ratio(a, b, data_range=1.0, reduction="none", dim=(1, 2, 3)).mean()


def ssim(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of per-image SSIM (Gaussian window 11, sigma 1.5)."""
    a, b = _pair01(a, b)
    return structural_similarity_index_measure(a, b, data_range=1.0, reduction="elementwise_mean")


def codebook_usage(ids: torch.Tensor, num_codes: int) -> dict[str, float]:
    """Fraction of the num_codes codes that occur in ids, and the perplexity exp(H) of their histogram."""
    if ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise ValueError(f"ids must be an integer tensor, got {ids.dtype}")
    if ids.numel() == 0 or int(ids.min()) < 0 or int(ids.max()) >= num_codes:
        got = f"[{int(ids.min())}, {int(ids.max())}]" if ids.numel() else "no ids"
        raise ValueError(f"ids must be a non-empty tensor of values in [0, num_codes={num_codes}), got {got}")
    counts = torch.bincount(ids.flatten().long(), minlength=num_codes).double()
    p = counts / counts.sum()
    return {"codebook_usage": float((counts > 0).double().mean()),
            "codebook_perplexity": float(torch.exp(-(p * p.clamp_min(1e-300).log()).sum()))}
