"""GenEval-style compositional evaluation on the procedural shapes world (`mmgen.data.shapes`).

GenEval (Ghosh et al., 2023) scores a text-to-image model by detecting the objects in each generated image
and checking them against the prompt: object presence, count, color, position. Here the world is closed, so
a small hand-written detector replaces the pretrained one:

1. Pixel colors. A pixel p is compared with each palette color c along the segment from the background b to c:
   alpha = (p - b).(c - b) / |c - b|^2 and the distance from p to that line. The pixel takes the color with
   the smallest distance and is foreground when alpha >= 0.5. Measuring along the segment, instead of the
   nearest palette color, keeps anti-aliased or blurred edges with their own color: half-covered yellow is
   close to orange in RGB but lies exactly on the background-yellow segment.
2. Connected components (8-neighbour flood fill) per color; components smaller than ~1/3 of the smallest
   object are noise and dropped.
3. Shape and size by analysis by synthesis. Blur preserves the mass and centroid of an object's soft
   coverage (the alpha above, summed around the component), so for each candidate shape the width follows
   from the mass and the position from the centroid. Each candidate is drawn exactly as `render` draws it,
   blurred by a few amounts (generated images are softer than renders), and the smallest squared error wins.
   The width of the winner gives the size (small 12 / large 18 px at 64 px); the centroid gives the cell.

`score` returns a boolean per check the prompt implies and `correct` (all of them). The caption describes the
whole scene, so `count` is the exact number of detected objects; `color` asks for each prompted object with
its color on its shape (attribute binding); `relation` compares centroids of the matched objects.
"""

from __future__ import annotations

import math
import re
from collections import Counter, deque
from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

from mmgen.data.shapes import (BACKGROUND, CATEGORIES, CELL_NAMES, COLORS, GRID, NUMBERS, PLURALS,
                               REFERENCE_SIZE, RELATIONS, SHAPES, SIZES, SUPERSAMPLE, draw_shape, relation_holds,
                               shape_outline)

CHECKS = ("count", "shape", "color", "size", "position", "relation")
MIN_AREA = 20  # px at 64 px; the smallest object (a small star) has ~57 above half coverage
WINDOW_PAD = 2  # px at 64 px around a component where its blurred edge is still counted; objects are 3 apart
BLURS = (0.0, 0.5, 0.8, 1.1, 1.5)  # Gaussian sigmas (px at 64 px) tried when matching shapes
_COLOR_NAMES = tuple(COLORS)
_SIZE_SPLIT = sum(SIZES.values()) / len(SIZES)  # 15 px at 64 px, between small and large


@dataclass(frozen=True)
class ObjectQuery:
    """One object a prompt asks for; size and cell are None when the prompt does not say."""

    shape: str
    color: str
    size: str | None = None
    cell: tuple[int, int] | None = None


@dataclass(frozen=True)
class PromptSpec:
    prompt: str
    category: str
    objects: tuple[ObjectQuery, ...]  # the whole scene: counting prompts repeat one query n times
    relations: tuple[tuple[int, str, int], ...] = ()  # (subject index, relation, object index)

    @property
    def count(self) -> int:
        return len(self.objects)

    @property
    def checks(self) -> tuple[str, ...]:
        present = {"count", "shape", "color"}
        if any(o.size for o in self.objects):
            present.add("size")
        if any(o.cell for o in self.objects):
            present.add("position")
        if self.relations:
            present.add("relation")
        return tuple(c for c in CHECKS if c in present)


@dataclass(frozen=True)
class Detection:
    shape: str
    color: str
    size: str
    cell: tuple[int, int]  # (row, col) on the 3x3 grid
    centroid: tuple[float, float]  # (x, y) in pixels
    area: int  # pixels
    bbox: tuple[int, int, int, int]  # (x0, y0, x1, y1), end exclusive


# ---------------------------------------------------------------------------------------------------- parsing

def _alternatives(words) -> str:
    return "|".join(sorted(map(re.escape, words), key=len, reverse=True))


_OBJ = rf"an? (?:({_alternatives(SIZES)}) )?({_alternatives(COLORS)}) ({_alternatives(SHAPES)})"
_CELL_BY_NAME = {name: cell for cell, name in CELL_NAMES.items()}
_PATTERNS = {
    "single_object": re.compile(rf"{_OBJ}(?: in the ({_alternatives(_CELL_BY_NAME)}))?"),
    "two_object": re.compile(rf"{_OBJ} ({_alternatives(RELATIONS)}) {_OBJ}"),
    "counting": re.compile(rf"({_alternatives(NUMBERS.values())}) ({_alternatives(COLORS)}) "
                           rf"({_alternatives(PLURALS.values())})"),
    "three_object": re.compile(rf"{_OBJ} ?, ?{_OBJ},? and {_OBJ}"),
}
_NUMBER_BY_WORD = {w: n for n, w in NUMBERS.items()}
_SHAPE_BY_PLURAL = {p: s for s, p in PLURALS.items()}


def parse_prompt(prompt: str) -> PromptSpec:
    """Parse a caption of any `mmgen.data.shapes` template (case, extra spaces and a final period ignored)."""
    if not isinstance(prompt, str):
        raise ValueError(f"prompt must be a str, got {type(prompt).__name__}")
    text = " ".join(prompt.lower().split()).rstrip(".").strip()
    for category, pattern in _PATTERNS.items():
        m = pattern.fullmatch(text)
        if m is None:
            continue
        g = m.groups()
        if category == "single_object":
            cell = _CELL_BY_NAME[g[3]] if g[3] else None
            return PromptSpec(text, category, (ObjectQuery(g[2], g[1], g[0], cell),))
        if category == "two_object":
            a, b = ObjectQuery(g[2], g[1], g[0]), ObjectQuery(g[6], g[5], g[4])
            return PromptSpec(text, category, (a, b), ((0, g[3], 1),))
        if category == "counting":
            q = ObjectQuery(_SHAPE_BY_PLURAL[g[2]], g[1])
            return PromptSpec(text, category, (q,) * _NUMBER_BY_WORD[g[0]])
        objs = tuple(ObjectQuery(g[i + 2], g[i + 1], g[i]) for i in (0, 3, 6))
        return PromptSpec(text, category, objs)
    raise ValueError(f"cannot parse prompt {prompt!r}: expected one of the shapes caption templates, e.g. "
                     f"'a large red circle in the top left', 'a red circle above a blue square', "
                     f"'two green triangles', 'a red circle, a blue square and a yellow star'")


# -------------------------------------------------------------------------------------------------- detection

def _to_rgb(image) -> np.ndarray:
    """(H, W, 3) float64 in [0, 255] from a PIL image, a uint8 array, or a float array in [0, 1]."""
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"), dtype=np.float64)
    if not isinstance(image, np.ndarray):
        raise ValueError(f"image must be a PIL.Image.Image or a numpy array, got {type(image).__name__}")
    if image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"image array must have shape (H, W, 3), got {image.shape}")
    if image.dtype == np.uint8:
        return image.astype(np.float64)
    if np.issubdtype(image.dtype, np.floating):
        if image.size and (image.min() < -0.5 or image.max() > 1.5):
            raise ValueError("a float image array must hold values in [0, 1] "
                             f"(got range [{image.min():.3g}, {image.max():.3g}])")
        return np.clip(image.astype(np.float64), 0.0, 1.0) * 255.0
    raise ValueError(f"image array dtype must be uint8 or floating, got {image.dtype}")


def _project(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Coverage of each palette color (H, W, C), unclipped, and the label per pixel (H, W), -1 = background."""
    # The background is whatever covers most of the image, so a generator's slightly-off black still works.
    bg = np.median(rgb.reshape(-1, 3), axis=0)
    if np.linalg.norm(bg - np.asarray(BACKGROUND, dtype=np.float64)) > 60:
        bg = np.asarray(BACKGROUND, dtype=np.float64)  # objects covered most of it: use the palette's own
    v = np.asarray(list(COLORS.values()), dtype=np.float64) - bg  # (C, 3)
    d = rgb - bg  # (H, W, 3)
    alpha = d @ v.T / (v * v).sum(1)  # (H, W, C)
    a = np.clip(alpha, 0.0, None)  # not capped above: a brighter, more saturated color is still that color
    resid = np.linalg.norm(d[..., None, :] - a[..., None] * v, axis=-1)  # (H, W, C)
    best = resid.argmin(-1)
    fg = np.take_along_axis(alpha, best[..., None], -1)[..., 0] >= 0.5
    return alpha, np.where(fg, best, -1)


def _components(labels: np.ndarray) -> list[tuple[int, np.ndarray, np.ndarray]]:
    """8-connected components of equal non-negative labels: (label, ys, xs) each."""
    h, w = labels.shape
    flat = labels.ravel().tolist()
    seen = [False] * (h * w)
    out = []
    for start in np.flatnonzero(labels.ravel() >= 0).tolist():
        if seen[start]:
            continue
        lab, members, queue = flat[start], [], deque([start])
        seen[start] = True
        while queue:
            p = queue.popleft()
            members.append(p)
            y, x = divmod(p, w)
            for ny in (y - 1, y, y + 1):
                if not 0 <= ny < h:
                    continue
                for nx in (x - 1, x, x + 1):
                    q = ny * w + nx
                    if 0 <= nx < w and not seen[q] and flat[q] == lab:
                        seen[q] = True
                        queue.append(q)
        idx = np.asarray(members)
        out.append((lab, idx // w, idx % w))
    return out


@lru_cache(maxsize=None)
def _geometry(shape: str) -> tuple[float, float, float]:
    """(area, centroid dx, centroid dy) of `shape` drawn 1 px wide, the centroid relative to its box center."""
    poly = shape_outline(shape, 0.0, 0.0, 1.0)
    if poly is None:
        return math.pi / 4, 0.0, 0.0
    # Shoelace formulas for a simple polygon's area and centroid.
    area = cx = cy = 0.0
    for (x0, y0), (x1, y1) in zip(poly, poly[1:] + poly[:1]):
        cross = x0 * y1 - x1 * y0
        area += cross / 2
        cx += (x0 + x1) * cross / 6
        cy += (y0 + y1) * cross / 6
    return abs(area), cx / area, cy / area


@lru_cache(maxsize=4096)
def _blur_matrix(n: int, sigma: float) -> np.ndarray:
    """(n, n) Gaussian blur along one axis, zero outside: blurring an image is G_h @ image @ G_w.T."""
    i = np.arange(n)
    g = np.exp(-((i[:, None] - i[None, :]) ** 2) / (2 * sigma * sigma))
    k = np.exp(-np.arange(-n, n + 1) ** 2 / (2 * sigma * sigma))
    return g / k.sum()  # normalized by the full kernel, so mass that leaves the window is lost, as in images


def _blur(a: np.ndarray, sigma: float) -> np.ndarray:
    if sigma <= 0:
        return a
    return _blur_matrix(a.shape[0], sigma) @ a @ _blur_matrix(a.shape[1], sigma).T


def _coverage(shape: str, cx: float, cy: float, d: float, h: int, w: int) -> np.ndarray:
    """(h, w) area coverage of `shape` drawn like `render` does, box center (cx, cy) in window pixels."""
    s = SUPERSAMPLE
    img = Image.new("L", (w * s, h * s), 0)
    draw_shape(ImageDraw.Draw(img), shape, cx, cy, d, 255, s)
    return np.asarray(img.resize((w, h), Image.Resampling.BOX), dtype=np.float64) / 255.0


def _dilate(mask: np.ndarray, steps: int) -> np.ndarray:
    for _ in range(steps):
        p = np.pad(mask, 1)
        mask = np.any([p[dy:dy + mask.shape[0], dx:dx + mask.shape[1]] for dy in range(3) for dx in range(3)],
                      axis=0)
    return mask


def _fit_shape(obs: np.ndarray, scale: float) -> tuple[str, float, tuple[float, float]]:
    """Best (shape, width, centroid) for a soft coverage window, by drawing each shape and comparing.

    Analysis by synthesis: blur preserves the mass and centroid of the coverage, so for each shape the width
    follows from the mass and the position from the centroid; each candidate is drawn (and blurred by a few
    amounts, since generated images are softer than renders) and the smallest squared error wins. A blurred
    star keeps its mass spread over five arms and still beats a blurred circle of the same mass.
    """
    h, w = obs.shape
    # Negative coverage (noise below the background) stays in the mass, where it cancels positive noise, but
    # not in the centroid weights; the floor only guards against images far off the palette.
    mass = max(float(obs.sum()), 0.5 * float((obs >= 0.5).sum()), 1.0)
    pos = np.clip(obs, 0.0, None)
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    cx, cy = (pos * xs).sum() / pos.sum(), (pos * ys).sum() / pos.sum()
    best = (math.inf, "", 0.0)
    for shape in SHAPES:
        area, dx, dy = _geometry(shape)
        d = math.sqrt(mass / area)
        base = _coverage(shape, cx - dx * d, cy - dy * d, d, h, w)
        for sigma in BLURS:
            err = float(((_blur(base, sigma * scale) - obs) ** 2).sum())
            if err < best[0]:
                best = (err, shape, d)
    return best[1], best[2], (cx, cy)


def detect_objects(image) -> list[Detection]:
    """Objects in a shapes image (PIL, uint8 (H, W, 3) array, or float (H, W, 3) array in [0, 1])."""
    rgb = _to_rgb(image)
    h, w = rgb.shape[:2]
    scale = (h + w) / 2 / REFERENCE_SIZE
    alpha, labels = _project(rgb)
    comps = [c for c in _components(labels) if len(c[1]) >= MIN_AREA * scale * scale]
    owner = np.full((h, w), -1)  # which kept component a pixel belongs to
    for k, (_, ys, xs) in enumerate(comps):
        owner[ys, xs] = k
    pad = max(1, round(WINDOW_PAD * scale))
    dets = []
    for k, (lab, ys, xs) in enumerate(comps):
        x0, y0 = max(0, int(xs.min()) - pad), max(0, int(ys.min()) - pad)
        x1, y1 = min(w, int(xs.max()) + 1 + pad), min(h, int(ys.max()) + 1 + pad)
        mine = owner[y0:y1, x0:x1] == k
        # Soft coverage of this color around the component, so blurred edges count with their true weight;
        # pixels of any other object (or noise of another color) count as empty.
        near = _dilate(mine, pad) & (labels[y0:y1, x0:x1] < 0)
        obs = np.where(mine | near, alpha[y0:y1, x0:x1, lab], 0.0)
        shape, d, (cx, cy) = _fit_shape(obs, scale)
        cx, cy = cx + x0, cy + y0
        cell = (min(GRID - 1, max(0, int(cy * GRID / h))), min(GRID - 1, max(0, int(cx * GRID / w))))
        size = "large" if d / scale > _SIZE_SPLIT else "small"
        dets.append(Detection(shape, _COLOR_NAMES[lab], size, cell, (float(cx), float(cy)), len(ys),
                              (int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1)))
    return dets


# ---------------------------------------------------------------------------------------------------- scoring

def _contains(found: Counter, wanted: Counter) -> bool:
    return all(found[k] >= n for k, n in wanted.items())


def _matches(d: Detection, q: ObjectQuery) -> bool:
    return d.shape == q.shape and d.color == q.color


def score_detections(spec: PromptSpec, dets: Sequence[Detection]) -> dict[str, bool]:
    """The checks `spec` implies, judged on `dets`, plus `correct` (all pass)."""
    out = {
        "count": len(dets) == spec.count,
        "shape": _contains(Counter(d.shape for d in dets), Counter(q.shape for q in spec.objects)),
        "color": _contains(Counter((d.color, d.shape) for d in dets),
                           Counter((q.color, q.shape) for q in spec.objects)),
    }
    checks = spec.checks
    if "size" in checks:
        out["size"] = all(any(_matches(d, q) and d.size == q.size for d in dets)
                          for q in spec.objects if q.size)
    if "position" in checks:
        out["position"] = all(any(_matches(d, q) and d.cell == q.cell for d in dets)
                              for q in spec.objects if q.cell)
    if "relation" in checks:
        out["relation"] = all(
            any(a is not b and _matches(a, spec.objects[i]) and _matches(b, spec.objects[j])
                and relation_holds(rel, a.centroid, b.centroid) for a in dets for b in dets)
            for i, rel, j in spec.relations)
    out["correct"] = all(out[c] for c in checks)
    return out


def score(image, prompt: str | PromptSpec) -> dict[str, bool]:
    """Judge one image against its prompt: {check: bool for each check the prompt implies, "correct": bool}."""
    spec = prompt if isinstance(prompt, PromptSpec) else parse_prompt(prompt)
    return score_detections(spec, detect_objects(image))


def evaluate(images: Sequence, prompts: Sequence[str]) -> dict:
    """Accuracy (fraction `correct`) overall, per prompt category and per check, over paired images/prompts."""
    if len(images) != len(prompts):
        raise ValueError(f"images and prompts must have the same length, got {len(images)} and {len(prompts)}")
    if len(prompts) == 0:
        raise ValueError("prompts must not be empty")
    specs = [parse_prompt(p) for p in prompts]  # parse all first: a bad prompt fails before any detection
    correct, per_cat, per_check = [], {}, {}
    for image, spec in zip(images, specs):
        s = score(image, spec)
        correct.append(s["correct"])
        per_cat.setdefault(spec.category, []).append(s["correct"])
        for c in spec.checks:
            per_check.setdefault(c, []).append(s[c])
    return {"accuracy": _mean(correct), "n": len(correct),
            "per_category": {c: _mean(per_cat[c]) for c in CATEGORIES if c in per_cat},
            "per_check": {c: _mean(per_check[c]) for c in CHECKS if c in per_check}}


def _mean(xs: list[bool]) -> float:
    return sum(xs) / len(xs)
