"""Real labelled images written out as an ImageNet-style class folder (`<out>/train/<class>/<n>.png`, `val` for
the test split), the layout class-conditional training reads (`ImageClassFolder`, `data.name=imagefolder`):
Fashion-MNIST's ten classes (Xiao et al. 2017) or the Twemoji categories ("smileys_emotion", "animals_nature",
...). `scripts/make_imagefolder.py` is the command line."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
from PIL import Image

from mmgen.atomic import atomic_dir

SOURCES = ("fashion_mnist", "emoji")


def class_dir_name(name: str) -> str:
    """A class name as a directory name: lower case, runs of other characters as one "_" ("Food & Drink" ->
    "food_drink", "ankle boot" -> "ankle_boot"); the folder reader shows "_" as a space again."""
    return re.sub(r"[^a-z0-9-]+", "_", name.lower()).strip("_")


def _fashion_mnist(split: str):
    from mmgen.data.fashion_mnist import CLASSES, load_split

    images, labels = load_split("train" if split == "train" else "test")
    return [class_dir_name(c) for c in CLASSES], labels, lambda i: Image.fromarray(images[i], mode="L")


def _emoji(split: str):
    from mmgen.data.emoji import default_root, load_entries

    root = default_root()
    entries = load_entries(root, split=split)
    names = sorted({class_dir_name(e.category) for e in entries})
    labels = np.array([names.index(class_dir_name(e.category)) for e in entries])

    def load(i):
        with Image.open(root / "img" / "twitter" / "64" / entries[i].image) as img:
            rgba = img.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")

    return names, labels, load


def write_class_folder(source: str, out: str | Path, split: str = "train", per_class: int | None = None,
                       seed: int = 0) -> dict[str, int]:
    """Write `source`'s `split` ("train" or "test") under `out/train` or `out/val`, one directory per class with
    at most `per_class` images each (a seeded random choice; None: all), atomically. Returns images per class."""
    if source not in SOURCES:
        raise ValueError(f"source must be one of {', '.join(SOURCES)}; got {source!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test'; got {split!r}")
    if per_class is not None and (isinstance(per_class, bool) or not isinstance(per_class, int) or per_class < 1):
        raise ValueError(f"per_class must be None or an integer >= 1; got {per_class!r}")
    names, labels, load = (_fashion_mnist if source == "fashion_mnist" else _emoji)(split)
    rng = np.random.default_rng(seed)
    counts = {}
    with atomic_dir(Path(out) / ("train" if split == "train" else "val")) as tmp:
        for c, name in enumerate(names):
            idx = np.flatnonzero(labels == c)
            if per_class is not None and len(idx) > per_class:
                idx = np.sort(rng.choice(idx, per_class, replace=False))
            (Path(tmp) / name).mkdir()
            for i in idx.tolist():
                load(i).save(Path(tmp) / name / f"{i:05d}.png")
            counts[name] = len(idx)
    return counts
