"""A user's own images, in the field's two layouts:

- `ImageCaptionFolder`: a folder plus `captions.jsonl` holding one {"file": ..., "caption": ...} per line;
- `ImageClassFolder`: ImageNet's (torchvision `ImageFolder`'s) `root/train/<class>/*.JPEG|png`, one directory per
  class, labels numbered in the sorted order of the class directories.

Items match `ShapesDataset`: {"image": float tensor (3, S, S) in [-1, 1], "caption": str} (+ "label" for class
folders, whose caption is the class name). Images are converted to RGB, resized so the shorter side is S, and
center-cropped to S x S (the usual preprocessing). The index is read and every listed file checked at
construction, so a typo fails before training starts.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from mmgen.data.shapes import to_tensor


def resize_center_crop(image: Image.Image, size: int) -> Image.Image:
    """Resize so the shorter side is `size` (bicubic, antialiased by PIL), then crop the center size x size."""
    scale = size / min(image.size)
    w, h = max(size, round(image.width * scale)), max(size, round(image.height * scale))
    image = image.resize((w, h), Image.Resampling.BICUBIC)
    left, top = (w - size) // 2, (h - size) // 2
    return image.crop((left, top, left + size, top + size))


class ImageCaptionFolder(torch.utils.data.Dataset):
    def __init__(self, root: str | Path, image_size: int = 64, captions_file: str = "captions.jsonl"):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root {str(self.root)!r} is not a directory")
        index = self.root / captions_file
        if not index.is_file():
            raise FileNotFoundError(f"captions file {str(index)!r} does not exist")
        self.image_size = image_size
        self.items: list[tuple[Path, str]] = []
        for n, line in enumerate(index.read_text(encoding="utf-8").splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{index}, line {n}: not valid JSON ({e.msg})") from None
            if not (isinstance(rec, dict) and isinstance(rec.get("file"), str)
                    and isinstance(rec.get("caption"), str)):
                raise ValueError(f"{index}, line {n}: expected an object with string fields 'file' and "
                                 f"'caption', got {line.strip()[:200]!r}")
            path = self.root / rec["file"]
            if not path.is_file():
                raise FileNotFoundError(f"{index}, line {n}: image {str(path)!r} does not exist")
            self.items.append((path, rec["caption"]))
        if not self.items:
            raise ValueError(f"captions file {str(index)!r} lists no images")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def captions(self) -> list[str]:
        return [c for _, c in self.items]

    def __getitem__(self, i: int) -> dict:
        path, caption = self.items[i]
        with Image.open(path) as img:
            img = resize_center_crop(img.convert("RGB"), self.image_size)
        return {"image": to_tensor(img), "caption": caption}


IMAGE_SUFFIXES = (".jpeg", ".jpg", ".png", ".webp", ".bmp")


class ImageClassFolder(torch.utils.data.Dataset):
    """`root/<split>/<class>/<image>` (or `root/<class>/<image>` when `root` has no `<split>` directory)."""

    def __init__(self, root: str | Path, image_size: int = 64, split: str = "train"):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
        root = Path(root)
        if not root.is_dir():
            raise FileNotFoundError(f"root {str(root)!r} is not a directory")
        if not (root / split).is_dir() and (root / "train").is_dir():
            raise FileNotFoundError(f"{str(root)!r} has no {split!r} split directory")
        self.root = root / split if (root / split).is_dir() else root
        self.image_size = image_size
        class_dirs = sorted(d for d in self.root.iterdir() if d.is_dir())
        if not class_dirs:
            raise ValueError(f"{str(self.root)!r} has no class directories (expected <class>/<image> files, "
                             f"e.g. {self.root}/n01440764/x.JPEG)")
        self.classes = tuple(d.name for d in class_dirs)
        self.items: list[tuple[Path, int]] = []
        for label, d in enumerate(class_dirs):
            files = sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in IMAGE_SUFFIXES)
            if not files:
                raise ValueError(f"class directory {str(d)!r} holds no images ({', '.join(IMAGE_SUFFIXES)})")
            self.items += [(f, label) for f in files]

    def __len__(self) -> int:
        return len(self.items)

    @property
    def labels(self) -> list[int]:
        return [c for _, c in self.items]

    @property
    def captions(self) -> list[str]:
        """Each image's class name as its caption (`_` read as a space), for caption-conditioned training."""
        names = [n.replace("_", " ") for n in self.classes]
        return [names[c] for _, c in self.items]

    def __getitem__(self, i: int) -> dict:
        path, label = self.items[i]
        with Image.open(path) as img:
            img = resize_center_crop(img.convert("RGB"), self.image_size)
        return {"image": to_tensor(img), "caption": self.classes[label].replace("_", " "), "label": label}
