"""Datasets: procedural captioned shapes, and an image folder with captions.jsonl."""

from mmgen.data.folder import ImageCaptionFolder
from mmgen.data.shapes import ShapesDataset, heldout_prompts, train_prompts

__all__ = ["ImageCaptionFolder", "ShapesDataset", "heldout_prompts", "train_prompts"]
