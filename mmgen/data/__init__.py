"""Datasets: procedural captioned shapes (with a compositional held-out split), and an image folder + captions."""

from mmgen.data.folder import ImageCaptionFolder
from mmgen.data.shapes import (CATEGORIES, COLORS, HELDOUT_PAIRS, SHAPES, SIZES, ObjectSpec, Scene,
                               ShapesDataset, all_caption_words, heldout_prompts, render, sample_scene,
                               train_prompts)

__all__ = [
    "CATEGORIES", "COLORS", "HELDOUT_PAIRS", "SHAPES", "SIZES", "ImageCaptionFolder", "ObjectSpec", "Scene",
    "ShapesDataset", "all_caption_words", "heldout_prompts", "render", "sample_scene", "train_prompts",
]
