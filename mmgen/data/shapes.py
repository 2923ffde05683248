"""Procedural captioned shapes: a small, closed text-to-image world for GenEval-style compositional evaluation.

A scene is a 64x64 RGB image (the size is configurable) holding 1-3 flat objects on a near-black background.
Each object has a shape, one of 8 well-separated colors, a size (small / large: the width of its bounding box,
12 / 18 px at 64 px) and a cell of a 3x3 grid. Objects sit in distinct cells with at least 3 px of background
between them, so an 8x-downsampling tokenizer (an 8x8 token grid) still sees them as separate blobs.

Caption templates, one per category (GenEval's categories, reduced to a closed vocabulary)::

    single_object   "a large red circle"  /  "a small blue star in the top left"
    two_object      "a red circle above a blue square"        (left of / right of / above / below)
    counting        "two green triangles"  /  "three white stars"
    three_object    "a red circle, a blue square and a yellow star"

Every template parses back (`mmgen.eval.compositional.parse_prompt`) and every stated relation holds for
the object centroids in the image.

Compositional split (after the held-out attribute pairs of "CLEVR-CoGenT", Johnson et al., 2017):
`HELDOUT_PAIRS` fixes 8 of the 32 (color, shape) pairs, one per color and two per shape. Training scenes
never contain a held-out pair; every held-out scene contains at least one. Each held-out color and shape is
still seen in training with other partners, so a model that draws a "red star" on a held-out prompt has
composed a color and a shape it never saw together. One pair per color is the fewest that tests every color,
hence 1/4 of the pairs rather than fewer.

Every item is a pure function of (seed, split, index): `ShapesDataset` seeds one `random.Random` per index,
so any index is produced on its own, in any process, without generating the ones before it.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageDraw

# Colors at least ~100 apart in RGB (the closest pairs: red/orange, orange/yellow) and far from the
# background, so a noisy or blurred generated image can still be classified per pixel.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35),
    "orange": (245, 135, 15),
    "yellow": (245, 235, 40),
    "green": (40, 180, 60),
    "cyan": (40, 215, 225),
    "blue": (40, 90, 235),
    "purple": (170, 60, 220),
    "white": (245, 245, 245),
}
BACKGROUND: tuple[int, int, int] = (30, 30, 30)  # not a named color: objects are "what is not near-black"
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
PLURALS: dict[str, str] = {s: s + "s" for s in SHAPES}
# Bounding-box width in pixels at 64 px, scaled with the image size. Large objects still leave 3 px to the
# next cell; small ones leave room for a few pixels of jitter.
SIZES: dict[str, int] = {"small": 12, "large": 18}
REFERENCE_SIZE = 64
GRID = 3
CELL_NAMES: dict[tuple[int, int], str] = {
    (0, 0): "top left", (0, 1): "top middle", (0, 2): "top right",
    (1, 0): "middle left", (1, 1): "center", (1, 2): "middle right",
    (2, 0): "bottom left", (2, 1): "bottom middle", (2, 2): "bottom right",
}
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
NUMBERS: dict[int, str] = {2: "two", 3: "three"}
CATEGORIES: tuple[str, ...] = ("single_object", "two_object", "counting", "three_object")
SPLITS: tuple[str, ...] = ("train", "heldout")
MIN_GAP = 3.0  # px at 64 px between neighbouring objects' bounding boxes, jitter included

# A Latin-square-like choice: each color once, each shape twice.
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({
    ("red", "star"), ("orange", "circle"), ("yellow", "square"), ("green", "triangle"),
    ("cyan", "star"), ("blue", "circle"), ("purple", "square"), ("white", "triangle"),
})
ALL_PAIRS: tuple[tuple[str, str], ...] = tuple((c, s) for c in COLORS for s in SHAPES)
TRAIN_PAIRS: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p not in HELDOUT_PAIRS)
_HELDOUT_LIST: tuple[tuple[str, str], ...] = tuple(p for p in ALL_PAIRS if p in HELDOUT_PAIRS)


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    color: str
    size: str
    cell: tuple[int, int]  # (row, col) on the 3x3 grid, row 0 at the top
    # Sub-cell jitter of the center, as a fraction of the cell side; bounded so objects never come closer
    # than MIN_GAP (see `_max_jitter`).
    offset: tuple[float, float] = (0.0, 0.0)  # (dx, dy)


@dataclass(frozen=True)
class Scene:
    objects: tuple[ObjectSpec, ...]
    caption: str
    category: str


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")


def _check_category(category: str | None) -> None:
    if category is not None and category not in CATEGORIES:
        raise ValueError(f"category must be None or one of {CATEGORIES}, got {category!r}")


def _article(word: str) -> str:
    return f"an {word}" if word[0] in "aeiou" else f"a {word}"


def _max_jitter(size: str) -> float:
    """Largest center offset (fraction of a cell) that keeps MIN_GAP to a neighbour jittered the same way."""
    cell = REFERENCE_SIZE / GRID
    return max(0.0, ((cell - SIZES[size]) / 2 - MIN_GAP / 2) / cell)


def _make_object(rng: random.Random, pair: tuple[str, str], cell: tuple[int, int]) -> ObjectSpec:
    size = rng.choice(tuple(SIZES))
    j = _max_jitter(size)
    return ObjectSpec(pair[1], pair[0], size, cell, (rng.uniform(-j, j), rng.uniform(-j, j)))


def cell_relation_holds(rel: str, a: tuple[int, int], b: tuple[int, int]) -> bool:
    """Does cell a = (row, col) stand in `rel` to cell b? Distinct rows/cols keep it true for centroids."""
    return {"left of": a[1] < b[1], "right of": a[1] > b[1], "above": a[0] < b[0], "below": a[0] > b[0]}[rel]


def relation_holds(rel: str, a_xy: tuple[float, float], b_xy: tuple[float, float]) -> bool:
    """Does point a = (x, y) stand in `rel` to point b? Image y grows downwards."""
    if rel not in RELATIONS:
        raise ValueError(f"rel must be one of {RELATIONS}, got {rel!r}")
    (ax, ay), (bx, by) = a_xy, b_xy
    return {"left of": ax < bx, "right of": ax > bx, "above": ay < by, "below": ay > by}[rel]


def _object_phrase(pair: tuple[str, str]) -> str:
    return f"{_article(pair[0])} {pair[1]}"


def sample_scene(rng: random.Random, split: str = "train", category: str | None = None) -> Scene:
    """Draw one scene of `split` ("train" or "heldout"); `category=None` draws one uniformly."""
    _check_split(split)
    _check_category(category)
    if category is None:
        category = rng.choice(CATEGORIES)
    cells = list(CELL_NAMES)
    # `first` always draws from the split's own pairs, so a held-out scene has at least one held-out object;
    # the others come from every pair the split allows (held-out scenes may hold several held-out pairs).
    own = _HELDOUT_LIST if split == "heldout" else TRAIN_PAIRS
    allowed = ALL_PAIRS if split == "heldout" else TRAIN_PAIRS
    first = rng.choice(own)

    if category == "single_object":
        obj = _make_object(rng, first, rng.choice(cells))
        caption = f"{_article(obj.size)} {obj.color} {obj.shape}"
        if rng.random() < 0.5:
            caption += f" in the {CELL_NAMES[obj.cell]}"
        return Scene((obj,), caption, category)

    if category == "counting":
        n = rng.choice(tuple(NUMBERS))
        objs = tuple(_make_object(rng, first, c) for c in rng.sample(cells, n))
        return Scene(objs, f"{NUMBERS[n]} {first[0]} {PLURALS[first[1]]}", category)

    # Distinct pairs, so every object in the caption names exactly one object in the image.
    n = 2 if category == "two_object" else 3
    pairs = [first] + rng.sample([p for p in allowed if p != first], n - 1)
    rng.shuffle(pairs)  # the held-out pair may be subject or object of the relation
    if category == "two_object":
        rel = rng.choice(RELATIONS)
        ca, cb = rng.choice([(a, b) for a in cells for b in cells if cell_relation_holds(rel, a, b)])
        objs = (_make_object(rng, pairs[0], ca), _make_object(rng, pairs[1], cb))
        return Scene(objs, f"{_object_phrase(pairs[0])} {rel} {_object_phrase(pairs[1])}", category)
    objs = tuple(_make_object(rng, p, c) for p, c in zip(pairs, rng.sample(cells, 3)))
    phrases = [_object_phrase(p) for p in pairs]
    return Scene(objs, f"{phrases[0]}, {phrases[1]} and {phrases[2]}", category)


def object_center(obj: ObjectSpec, image_size: int = REFERENCE_SIZE) -> tuple[float, float]:
    """Center (x, y) of the object's bounding box, in pixels."""
    cell = image_size / GRID
    return ((obj.cell[1] + 0.5 + obj.offset[0]) * cell, (obj.cell[0] + 0.5 + obj.offset[1]) * cell)


def object_width(obj: ObjectSpec, image_size: int = REFERENCE_SIZE) -> float:
    return SIZES[obj.size] * image_size / REFERENCE_SIZE


def shape_outline(shape: str, cx: float, cy: float, d: float) -> list[tuple[float, float]] | None:
    """Polygon of `shape` whose bounding box is d wide and centered at (cx, cy); None for the circle."""
    if shape == "circle":
        return None
    if shape == "square":
        h = d / 2
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":  # equilateral, apex up
        h = d * math.sqrt(3) / 2
        return [(cx, cy - h / 2), (cx + d / 2, cy + h / 2), (cx - d / 2, cy + h / 2)]
    if shape == "star":  # five points, apex up; inner radius 0.45 keeps the arms thick enough for 8x tokens
        r_out = d / (2 * math.sin(2 * math.pi / 5))
        top, bottom = -r_out, r_out * math.cos(math.pi / 5)
        oy = cy - (top + bottom) / 2
        pts = []
        for k in range(10):
            r = r_out if k % 2 == 0 else 0.45 * r_out
            a = -math.pi / 2 + k * math.pi / 5
            pts.append((cx + r * math.cos(a), oy + r * math.sin(a)))
        return pts
    raise ValueError(f"shape must be one of {SHAPES}, got {shape!r}")


SUPERSAMPLE = 4


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, d: float, fill,
               supersample: int = SUPERSAMPLE) -> None:
    """Draw `shape` (bounding box d wide, centered at (cx, cy), output pixels) on a canvas `supersample`x larger."""
    s = supersample
    # PIL floors vertex coordinates and fills both end pixels, which on average grows a shape by half a pixel
    # on every side: draw it one canvas pixel narrower so its coverage matches the true outline.
    cx, cy, d = cx * s, cy * s, d * s - 1
    poly = shape_outline(shape, cx, cy, d)
    if poly is None:
        draw.ellipse([cx - d / 2, cy - d / 2, cx + d / 2, cy + d / 2], fill=fill)
    else:
        draw.polygon(poly, fill=fill)


def render(scene: Scene, image_size: int = REFERENCE_SIZE) -> Image.Image:
    """RGB image of `scene`; drawn at 4x and box-downsampled, so edges are anti-aliased by area coverage."""
    if not isinstance(image_size, int) or image_size < 32:
        raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
    big = Image.new("RGB", (image_size * SUPERSAMPLE, image_size * SUPERSAMPLE), BACKGROUND)
    draw = ImageDraw.Draw(big)
    for obj in scene.objects:
        if obj.color not in COLORS:
            raise ValueError(f"color must be one of {tuple(COLORS)}, got {obj.color!r}")
        cx, cy = object_center(obj, image_size)
        draw_shape(draw, obj.shape, cx, cy, object_width(obj, image_size), COLORS[obj.color])
    return big.resize((image_size, image_size), Image.Resampling.BOX)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """PIL RGB image -> float32 tensor (3, H, W) in [-1, 1]."""
    arr = torch.from_numpy(np.asarray(image.convert("RGB"), dtype=np.uint8).copy())
    return arr.permute(2, 0, 1).float() / 127.5 - 1.0


def _index_rng(seed: int, split: str, index: int) -> random.Random:
    # A string seed is hashed with SHA-512 by `random`, independent of PYTHONHASHSEED and of other indices.
    return random.Random(f"mmgen-shapes/{seed}/{split}/{index}")


class ShapesDataset(torch.utils.data.Dataset):
    """`size` scenes of one split; item i is {"image": (3, H, W) float in [-1, 1], "caption": str}."""

    def __init__(self, split: str = "train", size: int = 10000, seed: int = 0, image_size: int = 64,
                 categories: tuple[str, ...] | list[str] | None = None):
        _check_split(split)
        if not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size!r}")
        if not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        if not isinstance(image_size, int) or image_size < 32:
            raise ValueError(f"image_size must be an integer >= 32, got {image_size!r}")
        if categories is not None:
            if isinstance(categories, str) or not categories:
                raise ValueError(f"categories must be None or a non-empty list drawn from {CATEGORIES}, "
                                 f"got {categories!r}")
            for c in categories:
                if c not in CATEGORIES:
                    raise ValueError(f"categories must be drawn from {CATEGORIES}, got {c!r}")
        self.split, self.size, self.seed, self.image_size = split, size, seed, image_size
        self.categories = tuple(categories) if categories is not None else None
        self._scenes: dict[int, Scene] = {}

    def __len__(self) -> int:
        return self.size

    def scene(self, i: int) -> Scene:
        if not isinstance(i, (int, np.integer)) or not 0 <= i < self.size:
            raise IndexError(f"index {i!r} out of range for a dataset of {self.size} items")
        i = int(i)
        if i not in self._scenes:
            rng = _index_rng(self.seed, self.split, i)
            category = rng.choice(self.categories) if self.categories else None
            self._scenes[i] = sample_scene(rng, self.split, category)
        return self._scenes[i]

    @property
    def captions(self) -> list[str]:
        """All captions, without rendering any image."""
        return [self.scene(i).caption for i in range(self.size)]

    def __getitem__(self, i: int) -> dict:
        scene = self.scene(i)
        return {"image": to_tensor(render(scene, self.image_size)), "caption": scene.caption}


def prompt_scenes(split: str, n: int, seed: int = 0, category: str | None = None) -> list[Scene]:
    """The n scenes whose captions are `heldout_prompts` / `train_prompts` (ground truth for those prompts)."""
    _check_split(split)
    _check_category(category)
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be an integer >= 0, got {n!r}")
    # A stream of its own, so evaluation prompts do not replay the training items of the same seed.
    rng = random.Random(f"mmgen-shapes-prompts/{seed}/{split}/{category}")
    return [sample_scene(rng, split, category) for _ in range(n)]


def _prompts(split: str, n: int, seed: int, category: str | None) -> list[str]:
    return [scene.caption for scene in prompt_scenes(split, n, seed, category)]


def heldout_prompts(n: int, seed: int = 0, category: str | None = None) -> list[str]:
    """n captions of held-out scenes (each names at least one held-out (color, shape) pair)."""
    return _prompts("heldout", n, seed, category)


def train_prompts(n: int, seed: int = 0, category: str | None = None) -> list[str]:
    """n captions drawn like the training split (no held-out pair)."""
    return _prompts("train", n, seed, category)


def all_caption_words() -> list[str]:
    """The closed vocabulary of every template, punctuation included (trains the word-level text tokenizer)."""
    words = {"a", "an", "in", "the", "and", ","}
    words |= set(COLORS) | set(SHAPES) | set(PLURALS.values()) | set(SIZES) | set(NUMBERS.values())
    words |= {w for name in CELL_NAMES.values() for w in name.split()}
    words |= {w for rel in RELATIONS for w in rel.split()}
    return sorted(words)
