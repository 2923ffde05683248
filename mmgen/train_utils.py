"""Small pieces shared by the training scripts; the loops themselves stay in `scripts/`.

The data order is a pure function of (seed, step), so a resumed run sees exactly the batches it would have
seen had it never stopped, with no sampler state to save.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch


def batch_indices(step: int, global_batch: int, dataset_size: int, seed: int, rank: int = 0, world: int = 1):
    """This rank's share of the global batch at `step`: epoch-wise permutations without replacement."""
    if global_batch > dataset_size:
        raise ValueError(f"batch_size {global_batch} exceeds the dataset size {dataset_size}")
    per_epoch = dataset_size // global_batch
    epoch, k = divmod(step, per_epoch)
    perm = torch.randperm(dataset_size, generator=torch.Generator().manual_seed(seed * 100003 + epoch))
    return perm[k * global_batch:(k + 1) * global_batch][rank::world].tolist()


def cosine_lr(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


@dataclass
class DataConfig:
    name: str = "shapes"  # shapes | folder
    size: int = 20000
    seed: int = 0
    image_size: int = 64
    root: str | None = None  # folder dataset: directory with captions.jsonl


def make_dataset(cfg: DataConfig, split: str = "train"):
    from mmgen.data import ImageCaptionFolder, ShapesDataset

    if cfg.name == "shapes":
        return ShapesDataset(split=split, size=cfg.size, seed=cfg.seed, image_size=cfg.image_size)
    if cfg.name == "folder":
        if not cfg.root:
            raise ValueError("data.root must name a directory with captions.jsonl when data.name is 'folder'")
        return ImageCaptionFolder(cfg.root, image_size=cfg.image_size)
    raise ValueError(f"data.name must be 'shapes' or 'folder', got {cfg.name!r}")


class JsonlLogger:
    """Appends one JSON object per logged step to `<run_dir>/log.jsonl` (main process only)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / "log.jsonl"
        self.enabled = enabled

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")


def run_text_tokenizer(data: DataConfig, captions: list[str], out: Path, is_main_process: bool = True):
    """The run's word-level caption tokenizer under `out/text_tokenizer`: trained once on the captions (plus every
    word the shapes generator can emit, since held-out prompts may use words the training captions lack), then
    reloaded, so a resumed run keeps its ids."""
    from transformers import PreTrainedTokenizerFast

    from mmgen.text import train_text_tokenizer

    tok_dir = Path(out) / "text_tokenizer"
    if (tok_dir / "tokenizer.json").is_file():
        return PreTrainedTokenizerFast.from_pretrained(tok_dir)
    extra = []
    if data.name == "shapes":
        from mmgen.data.shapes import all_caption_words
        extra = all_caption_words()
    tokenizer = train_text_tokenizer(captions, extra)
    if is_main_process:
        tokenizer.save_pretrained(tok_dir)
    return tokenizer


def write_json_atomic(path: str | Path, obj) -> None:
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    os.replace(tmp, path)
