"""Procedural captioned shapes: a tiny, fully controllable text-to-image world for compositional evaluation.

Scenes are 64x64 RGB (configurable) with 1-3 objects on a 3x3 grid over a dark background. Each object has a
shape, one of 8 well-separated colors, a size, and a cell. Captions come from three GenEval-like templates:

    single_object   "a large red circle" / "a small blue star at the top left"
    two_object      "a red circle above a blue square"          (left of / right of / above / below)
    counting        "two green triangles" / "three white stars"

Compositional split: a fixed set of (color, shape) pairs, one per color and two per shape, never appears in
the training split; every held-out scene contains at least one of them. A model that scores well on held-out
prompts has composed a color and a shape it never saw together.

Everything is a pure function of (seed, split, index), so any item can be produced on its own.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (40, 90, 235),
    "yellow": (240, 220, 40),
    "purple": (150, 50, 200),
    "orange": (245, 140, 20),
    "cyan": (40, 215, 225),
    "white": (245, 245, 245),
}
BACKGROUND = (30, 30, 30)
SHAPES = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
SIZES = {"small": 12, "large": 18}  # object diameter in pixels at 64 px; scaled with image size
CELL_NAMES = {
    (0, 0): "top left", (0, 1): "top", (0, 2): "top right",
    (1, 0): "left", (1, 1): "center", (1, 2): "right",
    (2, 0): "bottom left", (2, 1): "bottom", (2, 2): "bottom right",
}
RELATIONS = ("left of", "right of", "above", "below")
NUMBERS = {2: "two", 3: "three"}
CATEGORIES = ("single_object", "two_object", "counting")
SPLITS = ("train", "heldout")

HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("red", "star"), ("green", "square"), ("blue", "triangle"), ("yellow", "circle"),
    ("purple", "square"), ("orange", "star"), ("cyan", "circle"), ("white", "triangle"),
})
TRAIN_PAIRS = tuple((c, s) for c in COLORS for s in SHAPES if (c, s) not in HELDOUT_PAIRS)
HELDOUT_PAIR_LIST = tuple(sorted(HELDOUT_PAIRS))


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str
    size: str
    cell: tuple[int, int]  # (row, col) on the 3x3 grid
    offset: tuple[float, float] = (0.0, 0.0)  # sub-cell jitter in pixels at 64 px


@dataclass(frozen=True)
class Scene:
    objects: tuple[ObjectSpec, ...]
    caption: str
    category: str


def relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float], margin: float = 0.0) -> bool:
    """Does point a (x, y) stand in `rel` to point b? Image y grows downwards."""
    (ax, ay), (bx, by) = a, b
    return {"left of": ax < bx - margin, "right of": ax > bx + margin,
            "above": ay < by - margin, "below": ay > by + margin}[rel]


def _a(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _pairs(split: str):
    return HELDOUT_PAIR_LIST if split == "heldout" else TRAIN_PAIRS


def _jitter(rng: random.Random) -> tuple[float, float]:
    return (rng.uniform(-1.0, 1.0), rng.uniform(-1.0, 1.0))


def sample_scene(rng: random.Random, split: str = "train", category: str | None = None) -> Scene:
    _check_split(split)
    if category is None:
        category = rng.choices(CATEGORIES, weights=(0.4, 0.4, 0.2))[0]
    if category not in CATEGORIES:
        raise ValueError(f"category must be one of {CATEGORIES}, got {category!r}")
    cells = list(CELL_NAMES)

    if category == "single_object":
        color, shape = rng.choice(_pairs(split))
        size = rng.choice(tuple(SIZES))
        cell = rng.choice(cells)
        obj = ObjectSpec(shape, color, size, cell, _jitter(rng))
        caption = f"{_a(size)} {color} {shape}"
        if rng.random() < 0.5:
            caption += f" at the {CELL_NAMES[cell]}"
        return Scene((obj,), caption, category)

    if category == "two_object":
        first = rng.choice(_pairs(split))
        second = rng.choice(TRAIN_PAIRS + (HELDOUT_PAIR_LIST if split == "heldout" else ()))
        if second == first:
            second = rng.choice([p for p in TRAIN_PAIRS if p != first])
        if rng.random() < 0.5:
            first, second = second, first  # the held-out pair may be subject or object
        rel = rng.choice(RELATIONS)
        while True:
            ca, cb = rng.sample(cells, 2)
            if relation_holds(rel, (ca[1], ca[0]), (cb[1], cb[0])):
                break
        objs = (ObjectSpec(first[1], first[0], rng.choice(tuple(SIZES)), ca, _jitter(rng)),
                ObjectSpec(second[1], second[0], rng.choice(tuple(SIZES)), cb, _jitter(rng)))
        caption = f"{_a(first[0])} {first[1]} {rel} {_a(second[0])} {second[1]}"
        return Scene(objs, caption, category)

    color, shape = rng.choice(_pairs(split))
    n = rng.choice(tuple(NUMBERS))
    objs = tuple(ObjectSpec(shape, color, rng.choice(tuple(SIZES)), c, _jitter(rng)) for c in rng.sample(cells, n))
    return Scene(objs, f"{NUMBERS[n]} {color} {PLURALS[shape]}", category)


def _polygon(shape: str, cx: float, cy: float, r: float):
    if shape == "square":
        h = r * 0.9
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return [(cx, cy - r), (cx + r * 0.95, cy + r * 0.8), (cx - r * 0.95, cy + r * 0.8)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else r * 0.45
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + rad * math.cos(a), cy + rad * math.sin(a) + r * 0.1))
        return pts
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


def object_center(obj: ObjectSpec, image_size: int = 64) -> tuple[float, float]:
    cell = image_size / 3
    s = image_size / 64
    return ((obj.cell[1] + 0.5) * cell + obj.offset[0] * s, (obj.cell[0] + 0.5) * cell + obj.offset[1] * s)


def render(scene: Scene, image_size: int = 64) -> Image.Image:
    """Draw at 4x and downsample, for anti-aliased edges."""
    ss = 4
    big = Image.new("RGB", (image_size * ss, image_size * ss), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for obj in scene.objects:
        cx, cy = object_center(obj, image_size)
        cx, cy = cx * ss, cy * ss
        r = SIZES[obj.size] / 2 * image_size / 64 * ss
        if obj.shape == "circle":
            draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=COLORS[obj.color])
        else:
            draw.polygon(_polygon(obj.shape, cx, cy, r), fill=COLORS[obj.color])
    return big.resize((image_size, image_size), Image.Resampling.BOX)


def _rng(seed: int, split: str, index: int) -> random.Random:
    return random.Random(f"{seed}/{split}/{index}")


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB -> float tensor (3, H, W) in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()
    return arr / 127.5 - 1.0


class ShapesDataset(torch.utils.data.Dataset):
    def __init__(self, split: str = "train", size: int = 10000, seed: int = 0, image_size: int = 64,
                 categories: tuple[str, ...] | None = None):
        _check_split(split)
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size!r}")
        if image_size < 32:
            raise ValueError(f"image_size must be >= 32, got {image_size}")
        for c in categories or ():
            if c not in CATEGORIES:
                raise ValueError(f"categories must be drawn from {CATEGORIES}, got {c!r}")
        self.split, self.size, self.seed, self.image_size = split, size, seed, image_size
        self.categories = tuple(categories) if categories else None
        self._scenes: list[Scene | None] = [None] * size

    def __len__(self) -> int:
        return self.size

    def scene(self, i: int) -> Scene:
        if not 0 <= i < self.size:
            raise IndexError(f"index {i} out of range for {self.size} items")
        if self._scenes[i] is None:
            rng = _rng(self.seed, self.split, i)
            cat = rng.choice(self.categories) if self.categories else None
            self._scenes[i] = sample_scene(rng, self.split, cat)
        return self._scenes[i]

    @property
    def captions(self) -> list[str]:
        return [self.scene(i).caption for i in range(self.size)]

    def __getitem__(self, i: int) -> dict:
        scene = self.scene(i)
        return {"image": to_tensor(render(scene, self.image_size)), "caption": scene.caption}


def _prompts(split: str, n: int, seed: int, category: str | None) -> list[str]:
    rng = random.Random(f"prompts/{seed}/{split}/{category}")
    return [sample_scene(rng, split, category).caption for _ in range(n)]


def heldout_prompts(n: int, seed: int = 0, category: str | None = None) -> list[str]:
    return _prompts("heldout", n, seed, category)


def train_prompts(n: int, seed: int = 0, category: str | None = None) -> list[str]:
    return _prompts("train", n, seed, category)


def all_caption_words() -> list[str]:
    """The closed vocabulary of every template (trains the text tokenizer)."""
    words = {"a", "an", "at", "the", "of"} | set(COLORS) | set(SHAPES) | set(PLURALS.values()) | set(SIZES)
    words |= {w for name in CELL_NAMES.values() for w in name.split()}
    words |= {w for rel in RELATIONS for w in rel.split()} | set(NUMBERS.values())
    return sorted(words)
