"""Datasets: procedural captioned shapes (with a compositional held-out split), Fashion-MNIST, Twemoji, country
flags, named icons, an image folder + captions and an ImageNet-style class folder. Every item is
{"image": float (3, S, S) in [-1, 1], "caption": str, ...}."""

import torch

from mmgen.data.emoji import Twemoji
from mmgen.data.fashion_mnist import CLASSES as FASHION_CLASSES
from mmgen.data.fashion_mnist import FashionMNIST
from mmgen.data.flags import Flags
from mmgen.data.folder import ImageCaptionFolder, ImageClassFolder
from mmgen.data.icons import Icons
from mmgen.data.shapes import (CATEGORIES, COLORS, HELDOUT_PAIRS, SHAPES, SIZES, ObjectSpec, Scene,
                               ShapesDataset, all_caption_words, heldout_prompts, render, sample_scene,
                               train_prompts)


class ConcatCaptions(torch.utils.data.ConcatDataset):
    """`ConcatDataset` that keeps the `.captions` list the training scripts read without loading images."""

    @property
    def captions(self) -> list[str]:
        return [c for d in self.datasets for c in d.captions]


__all__ = [
    "CATEGORIES", "COLORS", "FASHION_CLASSES", "HELDOUT_PAIRS", "SHAPES", "SIZES", "ConcatCaptions", "FashionMNIST",
    "Flags", "Icons", "ImageCaptionFolder", "ImageClassFolder", "ObjectSpec", "Scene", "ShapesDataset", "Twemoji",
    "all_caption_words",
    "heldout_prompts", "render", "sample_scene", "train_prompts",
]
