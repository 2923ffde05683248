"""FD-ENL0: Frechet distance between Gaussian fits of pooled EfficientNet-Lite0 features (1280-d, ImageNet
weights, offline). Not FID: the feature network differs, so numbers are comparable only with each other.
The distance itself is torchmetrics' `FrechetInceptionDistance` with this feature extractor."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn
from torchmetrics.image.fid import FrechetInceptionDistance


class ENL0Features(nn.Module):
    """uint8 images (B, 3, H, W) in [0, 255] -> (B, 1280) pooled EfficientNet-Lite0 features."""

    num_features = 1280

    def __init__(self, resize_to: int = 128):
        super().__init__()
        from tokenizers_vis.features import EfficientNetLite0Features
        self.net = EfficientNetLite0Features(resize_to=resize_to, taps=(0,))

    @torch.no_grad()
    def forward(self, x):
        return self.net(x.float() / 127.5 - 1)[1].double()


def _to_uint8(images) -> torch.Tensor:
    if torch.is_tensor(images):
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return torch.stack([torch.from_numpy(np.array(im.convert("RGB"))).permute(2, 0, 1) for im in images])


def fd_enl0(real, fake, batch_size: int = 256, device="cpu") -> float:
    """FD-ENL0 between two image sets (PIL lists or tensors in [-1, 1])."""
    metric = FrechetInceptionDistance(feature=ENL0Features(), normalize=False).to(device)
    for images, is_real in ((real, True), (fake, False)):
        x = _to_uint8(images)
        for i in range(0, len(x), batch_size):
            metric.update(x[i:i + batch_size].to(device), real=is_real)
    return float(metric.compute())
