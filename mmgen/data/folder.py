"""A user's own images: a folder plus `captions.jsonl` with one {"file": ..., "caption": ...} per line."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from PIL import Image

from mmgen.data.shapes import to_tensor


class ImageCaptionFolder(torch.utils.data.Dataset):
    def __init__(self, root: str | Path, image_size: int = 64, captions_file: str = "captions.jsonl"):
        self.root = Path(root)
        if not self.root.is_dir():
            raise FileNotFoundError(f"root {str(self.root)!r} is not a directory")
        index = self.root / captions_file
        if not index.is_file():
            raise FileNotFoundError(f"captions file {str(index)!r} does not exist")
        self.image_size = image_size
        self.items: list[tuple[Path, str]] = []
        for n, line in enumerate(index.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
                file, caption = rec["file"], rec["caption"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise ValueError(f"{index}:{n}: expected a JSON object with 'file' and 'caption'") from None
            path = self.root / file
            if not path.is_file():
                raise FileNotFoundError(f"{index}:{n}: image {str(path)!r} does not exist")
            self.items.append((path, str(caption)))
        if not self.items:
            raise ValueError(f"captions file {str(index)!r} lists no images")

    def __len__(self) -> int:
        return len(self.items)

    @property
    def captions(self) -> list[str]:
        return [c for _, c in self.items]

    def __getitem__(self, i: int) -> dict:
        path, caption = self.items[i]
        img = Image.open(path).convert("RGB")
        s = self.image_size
        scale = s / min(img.size)  # shortest side to s, then center crop
        w, h = max(s, round(img.width * scale)), max(s, round(img.height * scale))
        img = img.resize((w, h), Image.Resampling.BICUBIC)
        left, top = (w - s) // 2, (h - s) // 2
        return {"image": to_tensor(img.crop((left, top, left + s, top + s))), "caption": caption}
