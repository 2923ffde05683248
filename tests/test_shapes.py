"""Procedural shapes data and the image-folder dataset: determinism, the compositional split, geometry of
captions (relations hold, objects apart), tensor format, and loud errors for bad arguments."""

import json
import random
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

import mmgen.data.shapes as shapes
from mmgen.data import ImageCaptionFolder
from mmgen.data.shapes import (ALL_PAIRS, BACKGROUND, CATEGORIES, COLORS, HELDOUT_PAIRS, RELATIONS, SHAPES,
                               SIZES, TRAIN_PAIRS, ObjectSpec, Scene, ShapesDataset, all_caption_words,
                               heldout_prompts, render, sample_scene, train_prompts)


def _scenes(split, n, seed=0, category=None):
    rng = random.Random(f"test/{split}/{seed}")
    return [sample_scene(rng, split, category) for _ in range(n)]


def _coverage(obj: ObjectSpec, image_size=64) -> np.ndarray:
    """Per-pixel coverage in [0, 1] of one object rendered alone in white."""
    img = render(Scene((ObjectSpec(obj.shape, "white", obj.size, obj.cell, obj.offset),), "", "single_object"),
                 image_size)
    return (np.asarray(img, dtype=np.float64)[..., 0] - BACKGROUND[0]) / (COLORS["white"][0] - BACKGROUND[0])


def _centroid(cov: np.ndarray) -> tuple[float, float]:
    ys, xs = np.mgrid[0:cov.shape[0], 0:cov.shape[1]] + 0.5
    return float((cov * xs).sum() / cov.sum()), float((cov * ys).sum() / cov.sum())


# ----------------------------------------------------------------------------------------------- determinism

def test_same_seed_and_index_give_identical_bytes():
    a, b = ShapesDataset("train", size=50, seed=3), ShapesDataset("train", size=50, seed=3)
    idx = [0, 17, 49]
    from_b = {i: b[i] for i in reversed(idx)}  # a different access order must not change any item
    for i in idx:
        assert a[i]["caption"] == from_b[i]["caption"]
        assert a[i]["image"].numpy().tobytes() == from_b[i]["image"].numpy().tobytes()
    assert np.asarray(render(a.scene(5))).tobytes() == np.asarray(render(b.scene(5))).tobytes()


def test_different_seeds_and_splits_differ():
    a = ShapesDataset("train", size=200, seed=0).captions
    b = ShapesDataset("train", size=200, seed=1).captions
    c = ShapesDataset("heldout", size=200, seed=0).captions
    assert sum(x != y for x, y in zip(a, b)) > 190
    assert sum(x != y for x, y in zip(a, c)) > 190
    img0, img1 = ShapesDataset(seed=0, size=1)[0]["image"], ShapesDataset(seed=1, size=1)[0]["image"]
    assert not torch.equal(img0, img1)


def test_index_is_independent_of_dataset_size_and_process():
    small, big = ShapesDataset(size=10, seed=7), ShapesDataset(size=10000, seed=7)
    assert small.captions == [big.scene(i).caption for i in range(10)]
    # String seeds go through SHA-512 in `random`, so this is fixed across processes and Python hash seeds.
    assert ShapesDataset(size=1, seed=0).scene(0) == sample_scene(random.Random("mmgen-shapes/0/train/0"))


def test_captions_do_not_render(monkeypatch):
    def boom(*args, **kwargs):
        raise AssertionError("captions must not render images")

    monkeypatch.setattr(shapes, "render", boom)
    caps = ShapesDataset(size=2000, seed=0).captions
    assert len(caps) == 2000 and all(isinstance(c, str) and c for c in caps)


# ---------------------------------------------------------------------------------------------- tensor format

def test_item_format_and_range():
    ds = ShapesDataset("heldout", size=4, seed=0)
    item = ds[0]
    assert set(item) == {"image", "caption"}
    x = item["image"]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.min() >= -1.0 and x.max() <= 1.0
    # The corner is background: exactly BACKGROUND mapped to [-1, 1].
    torch.testing.assert_close(x[:, 0, 0], torch.tensor(BACKGROUND, dtype=torch.float32) / 127.5 - 1)
    # Objects reach their palette color exactly somewhere (full coverage inside the shape).
    color = torch.tensor(COLORS[ds.scene(0).objects[0].color], dtype=torch.float32) / 127.5 - 1
    assert ((x - color[:, None, None]).abs().amax(0) < 1e-6).sum() > 30
    assert ShapesDataset(size=1, image_size=96)[0]["image"].shape == (3, 96, 96)
    assert len(ds) == 4 and len(list(ds)) == 4  # iteration stops at the end (IndexError)


def test_object_sizes_in_pixels():
    for size, d in SIZES.items():
        for shape in ("circle", "square"):
            cov = _coverage(ObjectSpec(shape, "white", size, (1, 1)))
            cols = np.nonzero((cov > 0.5).any(0))[0]
            assert cols.max() - cols.min() + 1 == d, (shape, size)
    big = _coverage(ObjectSpec("square", "white", "large", (1, 1)), image_size=128)
    assert abs(big.sum() - (2 * SIZES["large"]) ** 2) < 0.01 * (2 * SIZES["large"]) ** 2


# ------------------------------------------------------------------------------------------ compositional split

def test_heldout_pairs_cover_every_color_and_shape():
    assert len(ALL_PAIRS) == len(COLORS) * len(SHAPES) == 32
    assert len(HELDOUT_PAIRS) == 8 and len(TRAIN_PAIRS) == 24
    assert set(ALL_PAIRS) >= HELDOUT_PAIRS
    assert {c for c, _ in HELDOUT_PAIRS} == set(COLORS)
    assert Counter(s for _, s in HELDOUT_PAIRS) == {s: 2 for s in SHAPES}
    # Every held-out color and shape is still seen in training with other partners.
    assert {c for c, _ in TRAIN_PAIRS} == set(COLORS) and {s for _, s in TRAIN_PAIRS} == set(SHAPES)


def test_train_scenes_never_contain_a_heldout_pair():
    scenes = _scenes("train", 4000)
    pairs = Counter((o.color, o.shape) for s in scenes for o in s.objects)
    assert not set(pairs) & HELDOUT_PAIRS
    assert set(pairs) == set(TRAIN_PAIRS)  # and every training pair does occur
    assert Counter(s.category for s in scenes).keys() == set(CATEGORIES)
    assert {len(s.objects) for s in scenes} == {1, 2, 3}


def test_every_heldout_scene_contains_a_heldout_pair():
    scenes = _scenes("heldout", 4000)
    assert all(any((o.color, o.shape) in HELDOUT_PAIRS for o in s.objects) for s in scenes)
    seen = Counter((o.color, o.shape) for s in scenes for o in s.objects)
    assert set(seen) >= HELDOUT_PAIRS
    # Each category yields held-out scenes too.
    for cat in CATEGORIES:
        for s in _scenes("heldout", 200, seed=1, category=cat):
            assert s.category == cat and any((o.color, o.shape) in HELDOUT_PAIRS for o in s.objects)


def test_prompt_helpers_follow_the_split():
    hp = heldout_prompts(300, seed=0)
    assert hp == heldout_prompts(300, seed=0) and hp != heldout_prompts(300, seed=1)
    held_phrases = {f"{c} {s}" for c, s in HELDOUT_PAIRS} | {f"{c} {s}s" for c, s in HELDOUT_PAIRS}
    assert all(any(p in q for p in held_phrases) for q in hp)
    assert not any(p in q for q in train_prompts(300, seed=0) for p in held_phrases)
    counting = train_prompts(50, seed=0, category="counting")
    assert all(q.split()[0] in ("two", "three") for q in counting)


# --------------------------------------------------------------------------------------------------- geometry

def test_captions_describe_the_objects():
    for s in _scenes("train", 300) + _scenes("heldout", 300):
        words = s.caption.replace(",", " ").split()
        if s.category == "counting":
            assert words[0] == {2: "two", 3: "three"}[len(s.objects)]
            assert words[1:] == [s.objects[0].color, s.objects[0].shape + "s"]
            assert len({(o.color, o.shape) for o in s.objects}) == 1
        else:
            named = [(w, words[i + 1]) for i, w in enumerate(words[:-1]) if w in COLORS]
            assert named == [(o.color, o.shape) for o in s.objects]
            assert len(set(named)) == len(named)  # distinct objects, so each phrase names one object
        if s.category == "single_object":
            assert words[1] == s.objects[0].size


def test_relations_hold_geometrically():
    n_checked = Counter()
    for s in _scenes("train", 150, category="two_object") + _scenes("heldout", 150, category="two_object"):
        rel = next(r for r in RELATIONS if f" {r} " in s.caption)
        (ax, ay), (bx, by) = (_centroid(_coverage(o)) for o in s.objects)
        margin = 10  # px: different grid cells, so centroids are far apart along the stated axis
        holds = {"left of": ax < bx - margin, "right of": ax > bx + margin,
                 "above": ay < by - margin, "below": ay > by + margin}[rel]
        assert holds, (s.caption, (ax, ay), (bx, by))
        n_checked[rel] += 1
    assert set(n_checked) == set(RELATIONS)


def test_objects_never_touch_and_sit_in_their_cells():
    for s in _scenes("train", 400) + _scenes("heldout", 400):
        cells = [o.cell for o in s.objects]
        assert len(set(cells)) == len(cells)
        masks = []
        for o in s.objects:
            cov = _coverage(o)
            cx, cy = _centroid(cov)
            assert (int(cy // (64 / 3)), int(cx // (64 / 3))) == o.cell
            ys, xs = np.nonzero(cov > 0)
            assert ys.min() >= 1 and xs.min() >= 1 and ys.max() <= 62 and xs.max() <= 62  # not on the border
            masks.append(cov > 0)
        for i in range(len(masks)):
            # Grow one mask by a pixel in all 8 directions: at least one clean background pixel must separate.
            grown = np.pad(masks[i], 1)
            grown = np.any([grown[dy:dy + 64, dx:dx + 64] for dy in range(3) for dx in range(3)], axis=0)
            for j in range(i + 1, len(masks)):
                assert not (grown & masks[j]).any(), s


def test_vocabulary_is_closed():
    vocab = set(all_caption_words())
    caps = [s.caption for s in _scenes("train", 1000) + _scenes("heldout", 1000)]
    used = {w for c in caps for w in c.replace(",", " , ").split()}
    assert used <= vocab
    assert vocab - used == set()  # no dead words either
    assert len(vocab) < 60


# ------------------------------------------------------------------------------------------------ bad arguments

@pytest.mark.parametrize("kwargs, needle", [
    ({"split": "val"}, "split"),
    ({"size": 0}, "size"),
    ({"image_size": 16}, "image_size"),
    ({"categories": ["counting", "colors"]}, "categories"),
    ({"categories": "counting"}, "categories"),
    ({"categories": []}, "categories"),
])
def test_dataset_rejects_bad_arguments(kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        ShapesDataset(**kwargs)


def test_functions_reject_bad_arguments():
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'heldout'\), got 'test'"):
        sample_scene(random.Random(0), split="test")
    with pytest.raises(ValueError, match="category"):
        sample_scene(random.Random(0), category="colors")
    with pytest.raises(ValueError, match="category"):
        heldout_prompts(3, category="position")
    with pytest.raises(ValueError, match="n must"):
        train_prompts(-1)
    with pytest.raises(IndexError):
        ShapesDataset(size=3)[3]


def test_categories_restrict_the_dataset():
    ds = ShapesDataset("train", size=200, seed=0, categories=["counting", "three_object"])
    assert Counter(ds.scene(i).category for i in range(200)).keys() == {"counting", "three_object"}


# ------------------------------------------------------------------------------------------------ image folder

def _write_folder(root, lines):
    Image.new("RGB", (128, 64), (255, 0, 0)).save(root / "wide.png")
    img = Image.new("RGB", (128, 64), (255, 0, 0))
    img.paste((0, 0, 255), (32, 0, 96, 64))  # blue center half: exactly what the center crop keeps
    img.save(root / "center.png")
    (root / "sub").mkdir()
    Image.new("L", (40, 50), 128).save(root / "sub" / "gray.png")
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")


def test_image_folder_loads_resizes_and_crops(tmp_path):
    _write_folder(tmp_path, [json.dumps({"file": "wide.png", "caption": "red"}), "",
                             json.dumps({"file": "center.png", "caption": "blue"}),
                             json.dumps({"file": "sub/gray.png", "caption": "gray"})])
    ds = ImageCaptionFolder(tmp_path, image_size=32)
    assert len(ds) == 3 and ds.captions == ["red", "blue", "gray"]
    for i in range(3):
        assert ds[i]["image"].shape == (3, 32, 32) and ds[i]["image"].dtype == torch.float32
    torch.testing.assert_close(ds[1]["image"][:, 4:28, 4:28].mean((1, 2)), torch.tensor([-1.0, -1.0, 1.0]),
                               atol=0.02, rtol=0)
    gray = ds[2]["image"]
    assert torch.allclose(gray, torch.full_like(gray, 128 / 127.5 - 1), atol=0.02)  # L -> RGB, upscaled
    assert ds[0]["caption"] == "red" and ds[0]["image"][0].min() > 0.95


def test_image_folder_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a directory"):
        ImageCaptionFolder(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="captions file"):
        ImageCaptionFolder(tmp_path)
    _write_folder(tmp_path, [json.dumps({"file": "wide.png", "caption": "red"}), "{not json"])
    with pytest.raises(ValueError, match="line 2"):
        ImageCaptionFolder(tmp_path)
    (tmp_path / "captions.jsonl").write_text(json.dumps({"file": "wide.png"}) + "\n")
    with pytest.raises(ValueError, match="line 1.*'caption'"):
        ImageCaptionFolder(tmp_path)
    (tmp_path / "captions.jsonl").write_text(
        json.dumps({"file": "wide.png", "caption": "a"}) + "\n" + json.dumps({"file": "gone.png", "caption": "b"}))
    with pytest.raises(FileNotFoundError, match="line 2.*gone.png"):
        ImageCaptionFolder(tmp_path)
    (tmp_path / "captions.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="lists no images"):
        ImageCaptionFolder(tmp_path)
    with pytest.raises(ValueError, match="image_size"):
        ImageCaptionFolder(tmp_path, image_size=0)
