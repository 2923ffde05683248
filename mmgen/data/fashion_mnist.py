"""Fashion-MNIST (Xiao, Rasul and Vollgraf, 2017) as a captioned, class-conditional image set.

70,000 grayscale 28x28 images of 10 clothing classes (60,000 train / 10,000 test), read straight from the idx
files that the Debian package `dataset-fashion-mnist` installs (`bash scripts/install_data.sh`), so nothing
is downloaded at run time. Items match `ShapesDataset`: {"image": float (3, S, S) in [-1, 1], "caption": str}
plus {"label": int}. The gray value is copied into the three channels (the tokenizers take RGB) and the
28 px image is resized bilinearly to S (`to_tensor`, batched, so a training loop can convert a whole batch
the way `__getitem__` converts one item). The images keep their own polarity: a light garment on black.

Captions: "a photo of a sneaker" / "a photo of an ankle boot" (`caption_mode="caption"`, CLIP's zero-shot
template), or the bare class name (`caption_mode="class"`) for class-conditional training.
"""

from __future__ import annotations

import gzip
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_ROOT = Path("/usr/share/datasets/fashion-mnist")
# Label order of the data set's README; hyphenated names stay one caption word per class for a human reader.
CLASSES: tuple[str, ...] = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker",
                            "bag", "ankle boot")
SPLITS: dict[str, str] = {"train": "train", "test": "t10k"}  # split -> idx file prefix
CAPTION_MODES: tuple[str, ...] = ("caption", "class")
INSTALL_HINT = "install it with `bash scripts/install_data.sh` (Debian package dataset-fashion-mnist)"


def caption_for(label: int, caption_mode: str = "caption") -> str:
    """The caption of class `label`: "a photo of an ankle boot", or the class name in "class" mode."""
    if caption_mode not in CAPTION_MODES:
        raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
    name = CLASSES[label]
    if caption_mode == "class":
        return name
    return f"a photo of {'an' if name[0] in 'aeiou' else 'a'} {name}"


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An idx file (LeCun's MNIST format: magic 0x0000080<ndim>, big-endian int32 sizes, then uint8 data)."""
    with gzip.open(path, "rb") as f:
        raw = f.read()
    magic = int.from_bytes(raw[:4], "big")
    if magic != 0x800 + ndim:
        raise ValueError(f"{path}: not a {ndim}-d uint8 idx file (magic {magic:#x})")
    dims = [int.from_bytes(raw[4 + 4 * k:8 + 4 * k], "big") for k in range(ndim)]
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ValueError(f"{path}: header promises {dims} values, file holds {data.size}")
    return data.reshape(dims)


@lru_cache(maxsize=4)
def load_split(split: str = "train", root: str | Path = DEFAULT_ROOT) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 (N, 28, 28), labels int64 (N,)) of `split`; cached, so several datasets share one copy."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
    root = Path(root)
    images_path = root / f"{SPLITS[split]}-images-idx3-ubyte.gz"
    labels_path = root / f"{SPLITS[split]}-labels-idx1-ubyte.gz"
    for p in (images_path, labels_path):
        if not p.is_file():
            raise FileNotFoundError(f"Fashion-MNIST file {str(p)!r} is missing; {INSTALL_HINT}")
    images, labels = _read_idx(images_path, 3), _read_idx(labels_path, 1).astype(np.int64)
    if len(images) != len(labels):
        raise ValueError(f"{root}: {len(images)} images but {len(labels)} labels in split {split!r}")
    return images, labels


def to_tensor(gray: np.ndarray | torch.Tensor, image_size: int = 64) -> torch.Tensor:
    """uint8 gray images (..., 28, 28) -> float32 RGB (..., 3, S, S) in [-1, 1] (bilinear resize)."""
    x = gray.float() if isinstance(gray, torch.Tensor) else torch.from_numpy(np.array(gray, dtype=np.float32))
    lead = x.shape[:-2]
    x = x.reshape(-1, 1, *x.shape[-2:])
    if x.shape[-1] != image_size:
        # Bilinear keeps values inside [0, 255] (bicubic overshoots); antialias matters only when shrinking.
        x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    x = x / 127.5 - 1.0
    return x.expand(-1, 3, -1, -1).reshape(*lead, 3, image_size, image_size).contiguous()


class FashionMNIST(torch.utils.data.Dataset):
    """One split of Fashion-MNIST; `size` picks a seeded random subset (in index order), None keeps all."""

    def __init__(self, split: str = "train", image_size: int = 64, caption_mode: str = "caption",
                 size: int | None = None, seed: int = 0, root: str | Path = DEFAULT_ROOT):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {tuple(SPLITS)}, got {split!r}")
        if caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
        images, labels = load_split(split, str(root))
        if size is not None:
            if not isinstance(size, int) or not 1 <= size <= len(images):
                raise ValueError(f"size must be None or an integer in [1, {len(images)}] for split {split!r}, "
                                 f"got {size!r}")
            keep = np.sort(np.random.default_rng(seed).choice(len(images), size, replace=False))
            images, labels = images[keep], labels[keep]
        self.split, self.image_size, self.caption_mode, self.seed = split, image_size, caption_mode, seed
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def classes(self) -> tuple[str, ...]:
        """The class names, label order (class-conditional training reads `labels` and `classes`)."""
        return CLASSES

    @property
    def captions(self) -> list[str]:
        """All captions, without converting any image."""
        names = [caption_for(k, self.caption_mode) for k in range(len(CLASSES))]
        return [names[k] for k in self.labels.tolist()]

    def __getitem__(self, i: int) -> dict:
        if not isinstance(i, (int, np.integer)) or not -len(self) <= i < len(self):
            raise IndexError(f"index {i!r} out of range for a dataset of {len(self)} items")
        label = int(self.labels[i])
        return {"image": to_tensor(self.images[i], self.image_size), "caption": caption_for(label, self.caption_mode),
                "label": label}
