"""The evaluation harness (`mmgen.eval.harness`, `mmgen eval`, `scripts/evaluate.py`) on tiny seeded models:
JSON keys and counts, oracle tokenizers with known PSNR / SSIM / rFD / codebook usage, the class-accuracy branch
with a stand-in classifier, the data a model directory records, and CLI errors."""

import importlib.util
import json
import math
from functools import partial
from pathlib import Path

import pytest
import torch

from tiny import tiny_next_token_pipeline, tiny_seed_tokenizer, tiny_vae, tiny_vqgan
from mmgen import cli
from mmgen.data.fashion_mnist import CLASSES, caption_for
from mmgen.data.shapes import CATEGORIES, ShapesDataset, all_caption_words, heldout_prompts
from mmgen.eval import harness
from mmgen.eval.compositional import evaluate as compositional_accuracy
from mmgen.eval.image_metrics import psnr
from mmgen.pipelines import load_pipeline
from mmgen.pipelines.base import generators_from_seed
from mmgen.text import train_text_tokenizer

ROOT = Path(__file__).resolve().parents[1]
SIZE = 32  # the smallest image ShapesDataset renders
FASHION_CAPTIONS = [caption_for(c) for c in range(len(CLASSES))]


def _emoji_captions() -> list[str]:
    """The Twemoji training captions when the data is installed (the emoji FD prompts), else none."""
    try:
        return harness.real_dataset("emoji", "train", SIZE).captions
    except FileNotFoundError:
        return []


@pytest.fixture(scope="module")
def pipe_dir(tmp_path_factory):
    vq = tiny_vqgan(channel_mult=(1, 2, 2), image_size=SIZE)
    tok = train_text_tokenizer(FASHION_CAPTIONS + _emoji_captions(), all_caption_words())
    pipe = tiny_next_token_pipeline(tok, vq, max_seq_len=96, max_text_len=16)
    d = tmp_path_factory.mktemp("run") / "pipeline"  # the layout scripts/train_generator.py writes
    pipe.save_pretrained(d)
    return d


@pytest.fixture(scope="module")
def pipe(pipe_dir):
    return load_pipeline(pipe_dir)


def _items(images):
    return [{"image": x} for x in images]


def test_shapes_keys_counts_and_batch_independence(pipe):
    result = harness.evaluate_pipeline(pipe, "shapes", per_category=1, fd=4, batch_size=8, progress=False,
                                       guidance_scale=2.0)
    assert list(result) == ["data", "sampling", "splits", "fd_enl0", "speed"]
    assert result["sampling"] == {"guidance_scale": 2.0}
    for split in ("heldout", "train"):
        s = result["splits"][split]
        assert s["n"] == len(CATEGORIES) and list(s["per_category"]) == list(CATEGORIES)
        assert 0 <= s["accuracy"] <= 1 and s["seconds_per_image"] > 0
    assert result["fd_enl0"]["n"] == 4 and math.isfinite(result["fd_enl0"]["value"])
    # 4 + 4 prompts and 4 FD images; an 8x8 raster grid takes 64 decoder passes per image
    assert result["speed"]["images"] == 12 and result["speed"]["nfe_per_image"] == 64.0
    assert "model_evals_per_image" not in result["speed"]

    # image i has seed i whatever the batch: the scores equal a direct run of the judge on those images
    prompts = [q for c in CATEGORIES for q in heldout_prompts(1, seed=1, category=c)]
    images = pipe(prompt=prompts, generator=generators_from_seed(0, len(prompts)), guidance_scale=2.0).images
    other = harness.evaluate_pipeline(pipe, "shapes", per_category=1, splits=["heldout"], batch_size=3,
                                      progress=False, guidance_scale=2.0)
    expected = compositional_accuracy(images, prompts)
    for r in (result, other):
        got = {k: v for k, v in r["splits"]["heldout"].items() if k != "seconds_per_image"}
        assert got == expected
    assert list(other["splits"]) == ["heldout"] and "fd_enl0" not in other


class _AlwaysTShirt:
    def __init__(self):
        self.seen = []

    def predict(self, images):
        self.seen.append(images)
        return torch.zeros(len(images), dtype=torch.long)


def test_class_accuracy_with_a_stand_in_classifier(pipe):
    clf = _AlwaysTShirt()
    result = harness.evaluate_pipeline(pipe, "fashion_mnist", per_category=2, batch_size=7, progress=False,
                                       classifier=clf)
    acc = result["class_accuracy"]
    assert acc["accuracy"] == 0.1 and acc["n"] == 20
    assert acc["per_class"] == {name: (1.0 if i == 0 else 0.0) for i, name in enumerate(CLASSES)}
    images = torch.cat(clf.seen)
    assert images.shape == (20, 3, SIZE, SIZE) and images.min() >= -1 and images.max() <= 1
    assert result["speed"]["images"] == 20 and "splits" not in result and "fd_enl0" not in result


class _Offset:
    """A continuous stand-in tokenizer (the visual tokenizer protocol): reconstructions are the images shifted by
    +0.2 (0.1 on [0, 1])."""

    kind, image_size, token_shape, vocab_size = "latents", SIZE, (3, SIZE, SIZE), 0

    def encode_tokens(self, images):
        return images

    def decode_tokens(self, latents):
        return latents + 0.2


class _Levels:
    """A VQ stand-in: each value snapped to one of 8 levels in [-1, 1]; exact on images made of those levels."""

    kind, image_size, token_shape, vocab_size = "codes", SIZE, (3 * SIZE, SIZE), 8

    def encode_tokens(self, images):
        return ((images + 1) / 2 * 7).round().long()

    def decode_tokens(self, ids):
        return ids.float() / 7 * 2 - 1


def test_tokenizer_oracles():
    g = torch.Generator().manual_seed(0)
    images = torch.rand(6, 3, SIZE, SIZE, generator=g) * 1.6 - 0.8  # +0.2 stays inside [-1, 1]
    shifted = harness.evaluate_tokenizer(_Offset(), _items(images), n=6, batch_size=4)
    assert shifted["psnr"] == pytest.approx(20.0, abs=1e-3)  # MSE 0.01 on [0, 1]
    assert 0 < shifted["ssim"] < 1 and shifted["rfd_enl0"] > 0.1 and "codebook_usage" not in shifted

    # levels 0, 3 and 7 only, in counts 1 : 1 : 2 per image; reconstruction is exact
    levels = torch.tensor([0, 3, 7, 7]).repeat(3 * SIZE * SIZE // 4)
    exact = torch.stack([levels[torch.randperm(len(levels), generator=g)].view(3, SIZE, SIZE) for _ in range(5)])
    exact = exact.float() / 7 * 2 - 1
    res = harness.evaluate_tokenizer(_Levels(), _items(exact), n=5, batch_size=2)
    assert res["images"] == 5 and res["psnr"] == math.inf and res["ssim"] == pytest.approx(1.0, abs=1e-4)
    assert abs(res["rfd_enl0"]) < 0.01  # a set against itself
    assert res["codebook_usage"] == 3 / 8
    assert res["codebook_perplexity"] == pytest.approx(math.exp(-(2 * 0.25 * math.log(0.25) + 0.5 * math.log(0.5))),
                                                       abs=1e-4)


@pytest.mark.parametrize("kind", ["vqgan", "multiscale", "vae", "seed"])
def test_real_tokenizers(kind):
    tok = {  # tests/tiny.py factories, each seeded 0
        "vqgan": partial(tiny_vqgan, channel_mult=(1, 2, 2), image_size=SIZE),
        "multiscale": partial(tiny_vqgan, channel_mult=(1, 2, 2), image_size=SIZE, scales=(1, 2, 4, 8)),
        "vae": partial(tiny_vae, image_size=SIZE),
        "seed": partial(tiny_seed_tokenizer, image_size=SIZE, num_queries=4, qformer_layers=1),
    }[kind]().eval()
    data = ShapesDataset("heldout", size=4, image_size=SIZE)
    res = harness.evaluate_tokenizer(tok, data, n=10, batch_size=3)  # n is capped at the data's 4 images
    real = torch.stack([data[i]["image"] for i in range(4)])
    recon, ids = harness.reconstruct(tok, real)
    assert res["images"] == 4
    assert res["psnr"] == pytest.approx(psnr(recon, real).item(), abs=0.01)
    assert math.isfinite(res["rfd_enl0"]) and 0 < res["ssim"] < 1
    assert ("codebook_usage" in res) == (kind != "vae")
    if kind != "vae":
        assert res["codebook_usage"] == pytest.approx(len(ids.unique()) / tok.vocab_size, abs=1e-4)


def test_evaluate_model_reads_recorded_data_and_counts_parameters(pipe_dir, pipe):
    run_config = pipe_dir.parent / "config.json"
    assert harness.trained_data(pipe_dir) == (None, None)
    try:
        run_config.write_text(json.dumps({"paradigm": "next_token", "data": {"name": "fashion_mnist"}}))
        assert harness.trained_data(pipe_dir) == ("fashion_mnist", str(run_config))
        run_config.write_text(json.dumps({"paradigm": "next_token", "data": {"name": "folder"}}))
        with pytest.raises(ValueError, match="records data 'folder'"):
            harness.trained_data(pipe_dir)
        run_config.write_text(json.dumps({"paradigm": "next_token", "data": {"name": "shapes+emoji"}}))
        result = harness.evaluate_model(pipe_dir, per_category=1, splits=["heldout"], tokenizer_images=2,
                                        progress=False, pipeline=pipe, temperature=0.5)
    finally:
        run_config.unlink()
    assert result["data"] == "shapes" and result["data_from"] == str(run_config)
    assert result["parameters"] == {"decoder": sum(p.numel() for p in pipe.transformer.parameters()),
                                    "tokenizer": sum(p.numel() for p in pipe.vq_model.parameters()),
                                    "tokenizer_class": "VQGAN"}
    assert result["settings"] == {"per_category": 1, "splits": ["heldout"], "fd": 0, "tokenizer_images": 2,
                                  "batch_size": 25, "seed": 0, "device": "cpu"}
    # the sampling actually used: the given value over the pipeline's defaults
    assert result["sampling"]["temperature"] == 0.5 and result["sampling"]["guidance_scale"] == 3.0
    assert result["sampling"]["sampler"] == "ar"
    assert result["tokenizer"]["images"] == 2 and "codebook_usage" in result["tokenizer"]


@pytest.mark.parametrize("kwargs, needle", [
    (dict(data="mnist"), "data must be one of shapes, fashion_mnist, emoji"),
    (dict(splits=["test"]), "splits must be"),
    (dict(splits=[]), "splits must be"),
    (dict(fd=1), "fd must be 0"),
    (dict(per_category=0), "per_category"),
    (dict(data="emoji"), "FD-ENL0 only"),
    (dict(num_inference_steps=3), "num_inference_steps does not apply to NextTokenPipeline; its options: "
                                  "guidance_scale, temperature"),
    (dict(seed=-1), r"seed must be an integer in \[0, 2\*\*63 - 1\], got -1"),
])
def test_bad_arguments(pipe, kwargs, needle):
    with pytest.raises(ValueError, match=needle):
        harness.evaluate_pipeline(pipe, progress=False, **kwargs)


def test_cli_eval_json_and_out_file(pipe_dir, tmp_path, capsys):
    out = tmp_path / "reports" / "eval.json"
    assert cli.main(["eval", "--model", str(pipe_dir), "--per-category", "1", "--splits", "train",
                     "--tokenizer-images", "2", "--guidance-scale", "1.5", "--top-k", "8", "--seed", "3", "--json",
                     "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert json.loads(out.read_text()) == printed
    assert [f.name for f in out.parent.iterdir()] == ["eval.json"]  # no temporary file left behind
    assert printed["model"] == str(pipe_dir) and printed["pipeline"] == "NextTokenPipeline"
    assert printed["data"] == "shapes" and printed["data_from"] == "default"
    assert list(printed["splits"]) == ["train"] and printed["splits"]["train"]["n"] == 4
    assert printed["sampling"]["guidance_scale"] == 1.5 and printed["sampling"]["top_k"] == 8
    assert printed["settings"]["seed"] == 3 and printed["speed"]["nfe_per_image"] == 64.0
    assert set(printed["tokenizer"]) == {"images", "psnr", "ssim", "rfd_enl0", "codebook_usage",
                                         "codebook_perplexity", "reconstruction_accuracy"}
    recon = printed["tokenizer"]["reconstruction_accuracy"]  # ground truth of the same 4 prompts, round-tripped
    assert list(recon) == ["train"] and set(recon["train"]["per_category"]) == set(CATEGORIES)
    # a report written by --out is the data record the next run reads
    (pipe_dir / "eval.json").write_text(json.dumps({**printed, "data": "fashion_mnist"}))
    try:
        assert harness.trained_data(pipe_dir) == ("fashion_mnist", str(pipe_dir / "eval.json"))
    finally:
        (pipe_dir / "eval.json").unlink()


@pytest.mark.parametrize("args, needle", [
    (["--fd", "1"], "--fd must be 0 (off) or >= 2"),
    (["--tokenizer-images", "-3"], "--tokenizer-images must be 0 (off) or >= 2"),
    (["--per-category", "0"], "--per-category must be >= 1"),
    (["--data", "mnist"], "--data: invalid choice"),
    (["--splits", "test"], "--splits: invalid choice"),
    (["--guidance-scale", "-1"], "--guidance-scale must be a finite number >= 0"),
    (["--cfg", "-1"], "--cfg must be a finite number >= 0"),  # the old name, kept as a hidden alias
    (["--seed", "-1"], "--seed must be an integer in [0, 2**63 - 1], got -1"),
    (["--out", "report.txt"], "--out must end in .json"),
    (["--steps", "3"], "--steps does not apply to NextTokenPipeline"),
    (["--data", "emoji"], "FD-ENL0 only"),
])
def test_cli_eval_bad_flags(pipe_dir, args, needle, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--model", str(pipe_dir), "--tokenizer-images", "0", *args])
    assert e.value.code == 2
    assert needle in capsys.readouterr().err


def test_cli_eval_missing_model(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(["eval", "--model", str(tmp_path / "nope")])
    assert e.value.code == 2 and "--model" in capsys.readouterr().err


def test_evaluate_script_keeps_its_keys(pipe_dir, capsys):
    spec = importlib.util.spec_from_file_location("evaluate_script", ROOT / "scripts" / "evaluate.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    try:
        script.main(["--model", str(pipe_dir), "--per-category", "1", "--splits", "heldout", "--fd", "2", "--json"])
    finally:
        torch.set_grad_enabled(True)  # the script turns autograd off for its process
    result = json.loads(capsys.readouterr().out)
    assert list(result) == ["model", "sampling", "splits", "fd_enl0"]
    assert result["sampling"] == {"guidance_scale": 3.0, "temperature": 1.0}
    assert result["splits"]["heldout"]["n"] == 4 and result["fd_enl0"]["n"] == 2


def test_class_accuracy_with_the_real_classifier_at_its_resolution(pipe):
    """The shipped classifier's class judges 64 px input; a 32 px model's images are resized (bicubic) for it."""
    from PIL import Image

    from mmgen.data.shapes import to_tensor
    from mmgen.eval.classifier import FashionClassifier

    torch.manual_seed(0)
    clf = FashionClassifier(image_size=64, widths=(4, 8)).eval()
    result = harness.evaluate_pipeline(pipe, "fashion_mnist", per_category=1, progress=False, classifier=clf)
    images = pipe(prompt=FASHION_CAPTIONS, generator=generators_from_seed(0, len(CLASSES))).images
    x = torch.stack([to_tensor(im.resize((64, 64), Image.Resampling.BICUBIC)) for im in images])
    hits = (clf.predict(x) == torch.arange(len(CLASSES))).tolist()
    assert result["class_accuracy"]["per_class"] == {name: float(h) for name, h in zip(CLASSES, hits)}
    assert result["class_accuracy"]["accuracy"] == pytest.approx(sum(hits) / len(CLASSES))


@pytest.mark.parametrize("data", ["fashion_mnist", "emoji"])
def test_evaluate_model_on_installed_data(pipe_dir, pipe, data):
    """FD-ENL0 against the data set's training images, tokenizer metrics on its test images (both installed by
    `bash scripts/install_data.sh`)."""
    try:
        real = harness.real_dataset(data, "train", SIZE)
    except FileNotFoundError as e:
        pytest.skip(f"{data} is not installed: {e}")
    result = harness.evaluate_model(pipe_dir, data=data, per_category=1, fd=3, tokenizer_images=2, seed=5,
                                    progress=False, pipeline=pipe, classifier=_AlwaysTShirt())
    assert result["data"] == data and result["data_from"] == "argument"
    assert result["fd_enl0"]["n"] == 3 and math.isfinite(result["fd_enl0"]["value"])
    assert result["tokenizer"]["images"] == 2 and len(real) > 3
    assert ("class_accuracy" in result) == (data == "fashion_mnist") and "splits" not in result
    assert result["speed"]["images"] == 3 + (10 if data == "fashion_mnist" else 0)
    # the FD images are a seeded draw from the whole test split
    assert harness._subset(len(real), 3, 5) == harness._subset(len(real), 3, 5) != [0, 1, 2]


def test_flags_and_icons_are_fd_only_datasets():
    from mmgen.data import Flags, Icons

    assert isinstance(harness.real_dataset("flags", "heldout", 32), Flags)
    assert isinstance(harness.real_dataset("icons", "train", 32), Icons)
    with pytest.raises(ValueError, match="data='icons' is scored by FD-ENL0 only"):
        harness.evaluate_pipeline(object(), data="icons", fd=0)
