"""A user's own images: a folder plus `captions.jsonl` holding one {"file": ..., "caption": ...} per line.

Items match `ShapesDataset`: {"image": float tensor (3, S, S) in [-1, 1], "caption": str}. Images are converted
to RGB, resized so the shorter side is S, and center-cropped to S x S (the usual text-to-image preprocessing).
The index is read and every listed file checked at construction, so a typo fails before training starts.
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
