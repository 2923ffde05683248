"""A small Fashion-MNIST classifier, trained here, that scores class accuracy of generated images.

Class accuracy ("does the image show the class the prompt asked for?") is the class-conditional counterpart of
the Inception Score's classifier and of CAS (Ravuri and Vinyals, 2019); no pretrained Fashion-MNIST network is
available offline, so `scripts/train_classifier.py` trains this one on the real training split and the
weights ship in `mmgen/eval/weights/fashion-classifier/` (`load_default()`).

Input: (B, 3, S, S) images in [-1, 1] as `mmgen.data.FashionMNIST` gives them (S = `image_size`, 64 by
default), or PIL images. The network averages the channels to gray (the data set is gray; a generated image
is judged by its luminance only) and pools 2x first: 64 px Fashion-MNIST items are 28 px images upsampled, so
32 px keeps what the classes differ in at a quarter of the cost. Then three conv-BN-ReLU stages (VGG-like,
max-pool after each) and global average pooling into a linear layer.
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config
from PIL import Image

from mmgen.data.fashion_mnist import CLASSES
from mmgen.data.shapes import to_tensor

DEFAULT_WEIGHTS = Path(__file__).parent / "weights" / "fashion-classifier"


def _stage(c_in: int, c_out: int) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, 3, padding=1, bias=False), nn.BatchNorm2d(c_out), nn.ReLU(),
                         nn.MaxPool2d(2))


class FashionClassifier(ModelMixin, ConfigMixin):
    @register_to_config
    def __init__(self, image_size: int = 64, widths: tuple[int, ...] = (32, 64, 128), num_classes: int = 10,
                 dropout: float = 0.2):
        super().__init__()
        if not widths:
            raise ValueError("widths must name at least one stage width, got an empty list")
        side = image_size // 2 ** (len(widths) + 1)  # the 2x input pool, then one max-pool per stage
        if side < 1 or image_size % 2 ** (len(widths) + 1):
            raise ValueError(f"image_size must be a multiple of {2 ** (len(widths) + 1)} for {len(widths)} "
                             f"stages, got {image_size!r}")
        if num_classes < 2:
            raise ValueError(f"num_classes must be >= 2, got {num_classes!r}")
        chans = (1, *widths)
        self.stages = nn.Sequential(*[_stage(a, b) for a, b in zip(chans[:-1], chans[1:])])
        self.drop = nn.Dropout(dropout)
        self.head = nn.Linear(widths[-1] * side * side, num_classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3 or 1, S, S) in [-1, 1] -> logits (B, num_classes)."""
        s = self.config.image_size
        if images.ndim != 4 or images.shape[1] not in (1, 3) or tuple(images.shape[-2:]) != (s, s):
            raise ValueError(f"images must have shape (B, 3, {s}, {s}) or (B, 1, {s}, {s}), "
                             f"got {tuple(images.shape)}")
        x = F.avg_pool2d(images.mean(dim=1, keepdim=True), 2)  # (B, 1, S/2, S/2)
        x = self.stages(x)
        return self.head(self.drop(x.flatten(1)))

    @torch.no_grad()
    def predict(self, images: torch.Tensor | list[Image.Image], batch_size: int = 256) -> torch.LongTensor:
        """Class index per image (see `CLASSES`), in eval mode; the model's train/eval state is restored."""
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("images must hold at least one image, got an empty list")
            images = torch.stack([to_tensor(im) for im in images])
        was_training = self.training
        self.eval()
        try:
            out = [self(images[i:i + batch_size].to(self.device, self.dtype)).argmax(-1)
                   for i in range(0, len(images), batch_size)]
        finally:
            self.train(was_training)
        return torch.cat(out).cpu()


def load_default(device: str | torch.device = "cpu") -> FashionClassifier:
    """The shipped classifier (trained by `scripts/train_classifier.py`; README lists its test accuracy)."""
    if not (DEFAULT_WEIGHTS / "config.json").is_file():
        raise FileNotFoundError(f"classifier weights missing at {str(DEFAULT_WEIGHTS)!r}; train them with "
                                f"`python scripts/train_classifier.py --out {DEFAULT_WEIGHTS}`")
    return FashionClassifier.from_pretrained(DEFAULT_WEIGHTS).to(device).eval()


__all__ = ["CLASSES", "DEFAULT_WEIGHTS", "FashionClassifier", "load_default"]
