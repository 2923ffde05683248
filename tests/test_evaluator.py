"""GenEval-style evaluator on the shapes world: >= 99% on ground-truth renders of both splits, fails wrong
prompts, survives noise and blur, parses every caption template, and aggregates exactly."""

import random
import re

import numpy as np
import pytest
from PIL import ImageFilter

from mmgen.data.shapes import (CATEGORIES, CELL_NAMES, COLORS, SHAPES, ObjectSpec, Scene, ShapesDataset,
                               object_center, render, sample_scene)
from mmgen.eval.compositional import (ObjectQuery, PromptSpec, detect_objects, evaluate, parse_prompt, score,
                                      score_detections)

N_PER_SPLIT = 500


@pytest.fixture(scope="module")
def rendered():
    """Ground-truth scenes of both splits, all categories: {split: [(scene, image, detections)]}."""
    out = {}
    for split in ("train", "heldout"):
        ds = ShapesDataset(split, size=N_PER_SPLIT, seed=123)
        items = []
        for i in range(N_PER_SPLIT):
            scene = ds.scene(i)
            image = render(scene)
            items.append((scene, image, detect_objects(image)))
        out[split] = items
    return out


def test_ground_truth_renders_score_at_least_99_percent(rendered):
    for split, items in rendered.items():
        specs = [parse_prompt(s.caption) for s, _, _ in items]
        correct = [score_detections(spec, d)["correct"] for spec, (_, _, d) in zip(specs, items)]
        result = sum(correct) / len(correct)
        by_cat = {c: [ok for ok, spec in zip(correct, specs) if spec.category == c] for c in CATEGORIES}
        print(f"\n{split}: {result:.4f} correct over {len(items)} renders; "
              + ", ".join(f"{c} {sum(v) / len(v):.3f} (n={len(v)})" for c, v in by_cat.items()))
        assert result >= 0.99
        for c, v in by_cat.items():
            assert len(v) >= 80 and sum(v) / len(v) >= 0.97, c


def test_evaluate_matches_per_image_scores(rendered):
    items = rendered["heldout"][:60]
    result = evaluate([im for _, im, _ in items], [s.caption for s, _, _ in items])
    assert result["n"] == 60 and result["accuracy"] >= 0.99
    assert set(result["per_category"]) == set(CATEGORIES)
    assert set(result["per_check"]) == {"count", "shape", "color", "size", "position", "relation"}


def _other(value, choices, rng):
    return rng.choice([c for c in choices if c != value])


def _corruptions(scene: Scene, rng: random.Random) -> dict[str, str]:
    """Wrong prompts for a scene: each changes one fact the image contradicts."""
    cap, o = scene.caption, scene.objects[0]
    plural = "s" if scene.category == "counting" else ""
    out = {}
    # The first object's phrase is the first "<color> <shape>" of the caption.
    phrase = f"{o.color} {o.shape}{plural}"
    out["color"] = cap.replace(phrase, f"{_other(o.color, COLORS, rng)} {o.shape}{plural}", 1)
    out["shape"] = cap.replace(phrase, f"{o.color} {_other(o.shape, SHAPES, rng)}{plural}", 1)
    if scene.category == "two_object":
        flip = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        rel = next(r for r in flip if f" {r} " in cap)
        out["relation"] = cap.replace(f" {rel} ", f" {flip[rel]} ")
    if scene.category == "counting":
        out["count"] = re.sub(r"^(two|three)", lambda m: {"two": "three", "three": "two"}[m.group(1)], cap)
    if scene.category == "single_object":
        out["size"] = re.sub(r"^a (small|large)", lambda m: "a " + {"small": "large", "large": "small"}[m.group(1)],
                             cap)
        if " in the " in cap:
            out["position"] = cap.split(" in the ")[0] + f" in the {CELL_NAMES[_other(o.cell, CELL_NAMES, rng)]}"
    # Keep article agreement after a color swap ("a orange" -> "an orange") so the prompt stays in-template.
    return {k: re.sub(r"\ba (?=[aeiou])", "an ", re.sub(r"\ban (?=[^aeiou])", "a ", v)) for k, v in out.items()}


def test_wrong_prompts_fail(rendered):
    rng = random.Random(0)
    total, check_failed, rejected = {}, {}, {}
    for items in rendered.values():
        for scene, _, dets in items:
            for kind, wrong in _corruptions(scene, rng).items():
                assert wrong != scene.caption
                s = score_detections(parse_prompt(wrong), dets)
                total[kind] = total.get(kind, 0) + 1
                check_failed[kind] = check_failed.get(kind, 0) + (s[kind] is False)  # the check that should
                rejected[kind] = rejected.get(kind, 0) + (s["correct"] is False)
    rates = {k: rejected[k] / total[k] for k in total}
    print("\nwrong prompts rejected:", {k: f"{v:.3f} (n={total[k]})" for k, v in rates.items()})
    assert set(rates) == {"color", "shape", "relation", "count", "size", "position"}
    assert all(total[k] >= 50 for k in total)
    assert min(rates.values()) >= 0.99
    assert all(check_failed[k] / total[k] >= 0.99 for k in total)


def test_gaussian_noise_keeps_accuracy(rendered):
    rng = np.random.default_rng(0)
    items = rendered["train"][:150] + rendered["heldout"][:150]
    noisy = [np.clip(np.asarray(im, dtype=np.float64) / 255 + rng.normal(0, 0.05, (64, 64, 3)), 0, 1)
             for _, im, _ in items]
    result = evaluate(noisy, [s.caption for s, _, _ in items])
    print(f"\nGaussian noise sigma=0.05: accuracy {result['accuracy']:.4f} over {result['n']}")
    assert result["accuracy"] >= 0.95


def test_blur_keeps_accuracy(rendered):
    items = rendered["train"][:100] + rendered["heldout"][:100]
    blurred = [im.filter(ImageFilter.GaussianBlur(1.5)) for _, im, _ in items]
    result = evaluate(blurred, [s.caption for s, _, _ in items])
    print(f"\nGaussian blur sigma=1.5px: accuracy {result['accuracy']:.4f} over {result['n']}")
    assert result["accuracy"] >= 0.95


# ------------------------------------------------------------------------------------------------------ parsing

@pytest.mark.parametrize("prompt, expected", [
    ("a large red circle", PromptSpec("a large red circle", "single_object",
                                      (ObjectQuery("circle", "red", "large"),))),
    ("a small blue star in the top left", PromptSpec("a small blue star in the top left", "single_object",
                                                     (ObjectQuery("star", "blue", "small", (0, 0)),))),
    ("an orange square below a white triangle",
     PromptSpec("an orange square below a white triangle", "two_object",
                (ObjectQuery("square", "orange"), ObjectQuery("triangle", "white")), ((0, "below", 1),))),
    ("three green triangles", PromptSpec("three green triangles", "counting",
                                         (ObjectQuery("triangle", "green"),) * 3)),
    ("a red circle, a blue square and a yellow star",
     PromptSpec("a red circle, a blue square and a yellow star", "three_object",
                (ObjectQuery("circle", "red"), ObjectQuery("square", "blue"), ObjectQuery("star", "yellow")))),
    ("  A Cyan Star Right Of A Purple Circle. ",
     PromptSpec("a cyan star right of a purple circle", "two_object",
                (ObjectQuery("star", "cyan"), ObjectQuery("circle", "purple")), ((0, "right of", 1),))),
])
def test_parse_prompt_templates(prompt, expected):
    assert parse_prompt(prompt) == expected


def test_parse_prompt_round_trips_every_caption():
    rng = random.Random(0)
    seen_positions = set()
    for split in ("train", "heldout"):
        for cat in CATEGORIES:
            for _ in range(150):
                scene = sample_scene(rng, split, cat)
                spec = parse_prompt(scene.caption)
                assert spec.category == cat and spec.prompt == scene.caption
                assert [(q.color, q.shape) for q in spec.objects] == [(o.color, o.shape) for o in scene.objects]
                if cat == "single_object":
                    assert spec.objects[0].size == scene.objects[0].size
                    if " in the " in scene.caption:
                        assert spec.objects[0].cell == scene.objects[0].cell
                        seen_positions.add(spec.objects[0].cell)
                assert bool(spec.relations) == (cat == "two_object")
    assert seen_positions == set(CELL_NAMES)


@pytest.mark.parametrize("bad", ["a pink circle", "a red hexagon", "four red circles", "", "a red circle above",
                                 "a red circle near a blue square", "two red circle"])
def test_parse_prompt_rejects_other_text(bad):
    with pytest.raises(ValueError, match=re.escape(repr(bad))):
        parse_prompt(bad)


def test_checks_follow_the_prompt():
    assert parse_prompt("two green triangles").checks == ("count", "shape", "color")
    assert parse_prompt("a small red star in the center").checks == ("count", "shape", "color", "size", "position")
    assert parse_prompt("a red star above a blue circle").checks == ("count", "shape", "color", "relation")
    img = render(Scene((ObjectSpec("star", "red", "small", (1, 1)),), "", "single_object"))
    assert score(img, "a small red star in the center") == {
        "count": True, "shape": True, "color": True, "size": True, "position": True, "correct": True}
    assert score(img, "a large red star") == {
        "count": True, "shape": True, "color": True, "size": False, "correct": False}


# ---------------------------------------------------------------------------------------------------- detection

def test_detect_objects_exact_values():
    objs = (ObjectSpec("circle", "yellow", "large", (0, 0)), ObjectSpec("square", "orange", "small", (1, 2)),
            ObjectSpec("triangle", "blue", "large", (2, 1)), ObjectSpec("star", "white", "small", (2, 2)))
    dets = sorted(detect_objects(render(Scene(objs, "", "three_object"))), key=lambda d: d.cell)
    assert [(d.shape, d.color, d.size, d.cell) for d in dets] == [
        ("circle", "yellow", "large", (0, 0)), ("square", "orange", "small", (1, 2)),
        ("triangle", "blue", "large", (2, 1)), ("star", "white", "small", (2, 2))]
    # Circle and square: centroid = box center (to the 1/4 px grid the renderer draws on); areas in pixels.
    for d, o in zip(dets[:2], objs[:2]):
        assert np.allclose(d.centroid, object_center(o), atol=0.15)
    assert abs(dets[0].area - np.pi * 9 ** 2) < 5 and dets[1].area == 12 * 12
    assert dets[0].bbox == (2, 2, 20, 20) and dets[1].bbox == (47, 26, 59, 38)
    assert all(isinstance(v, float) for d in dets for v in d.centroid)


def test_input_formats_agree_and_bad_inputs_fail():
    img = render(sample_scene(random.Random(4), "train", "three_object"))
    ref = detect_objects(img)
    assert len(ref) == 3
    arr = np.asarray(img)
    assert detect_objects(arr) == ref
    got = detect_objects(arr.astype(np.float32) / 255)
    assert [(d.shape, d.color, d.size, d.cell) for d in got] == [(d.shape, d.color, d.size, d.cell) for d in ref]
    assert detect_objects(render(Scene((), "", "single_object"))) == []
    with pytest.raises(ValueError, match="shape"):
        detect_objects(arr[..., :2])
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        detect_objects(arr.astype(np.float32))
    with pytest.raises(ValueError, match="image must be"):
        detect_objects(arr.tolist())


def test_extra_blob_breaks_count_but_speckles_do_not():
    scene = Scene((ObjectSpec("circle", "red", "large", (1, 1)),), "a large red circle", "single_object")
    arr = np.asarray(render(scene)).copy()
    speckles = arr.copy()
    speckles[2:4, 2:4] = COLORS["green"]  # 4 px: below the noise floor
    speckles[60, 5:9] = COLORS["blue"]
    assert score(speckles, scene.caption)["correct"]
    blob = arr.copy()
    blob[2:8, 2:8] = COLORS["green"]  # 36 px: an object
    s = score(blob, scene.caption)
    assert s["count"] is False and s["color"] is True and s["correct"] is False


def test_binding_is_checked_not_just_colors_and_shapes():
    # The image has a red circle and a blue square; the prompt swaps the colors between the shapes.
    objs = (ObjectSpec("circle", "red", "large", (0, 0)), ObjectSpec("square", "blue", "large", (2, 2)))
    s = score(render(Scene(objs, "", "two_object")), "a blue circle above a red square")
    assert s == {"count": True, "shape": True, "color": False, "relation": False, "correct": False}


def test_evaluate_aggregates_exactly():
    a = render(Scene((ObjectSpec("square", "green", "large", (0, 0)),), "", "single_object"))
    b = render(Scene((ObjectSpec("star", "cyan", "small", (0, 0)), ObjectSpec("star", "cyan", "small", (2, 2))),
                     "", "counting"))
    result = evaluate([a, a, b, b], ["a large green square", "a small green square in the top left",
                                     "two cyan stars", "three cyan stars"])
    assert result == {"accuracy": 0.5, "n": 4,
                      "per_category": {"single_object": 0.5, "counting": 0.5},
                      # "three cyan stars" over two stars also fails shape and color: 3 are asked for.
                      "per_check": {"count": 0.75, "shape": 0.75, "color": 0.75, "size": 0.5, "position": 1.0}}
    with pytest.raises(ValueError, match="same length"):
        evaluate([a], ["a large green square", "two cyan stars"])
    with pytest.raises(ValueError, match="must not be empty"):
        evaluate([], [])
    with pytest.raises(ValueError, match="cannot parse prompt 'a green blob'"):
        evaluate([a], ["a green blob"])
