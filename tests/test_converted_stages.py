"""Every stage of mmgen on converted LlamaGen and VAR models (issue 35): the tiny fixtures of tests/test_llamagen.py
and tests/test_var_convert.py, converted once per module by `mmgen convert`, through the watermark, `mmgen eval`,
`mmgen serve`'s handler and fine-tuning; what a family cannot take (SJD, the watermark and fine-tuning on VAR's
next-scale decoder) is refused by name. SJD's exactness on converted LlamaGen is tests/test_llamagen.py's."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from mmgen.cli import main
from mmgen.data.fashion_mnist import DEFAULT_ROOT as FASHION_ROOT
from mmgen.options import OptionError, refuse_options
from mmgen.pipelines import load_pipeline
from mmgen.pipelines.base import generators_from_seed
from mmgen.watermark import cluster_codebook, detect_tokens, detect_tokens_combined

ROOT = Path(__file__).resolve().parents[1]
LLAMAGEN = ROOT / "tests" / "fixtures" / "llamagen"
VAR = ROOT / "tests" / "fixtures" / "var"
needs_fashion = pytest.mark.skipif(not (FASHION_ROOT / "train-labels-idx1-ubyte.gz").is_file(),
                                   reason="Fashion-MNIST not installed (bash scripts/install_data.sh)")
torch.set_num_threads(1)


def _script(name: str):
    spec = importlib.util.spec_from_file_location(f"converted_{name}", ROOT / "scripts" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    """{"llamagen": the c2i fixture converted, "var": VAR's "release" fixture converted}, by the CLI."""
    root = tmp_path_factory.mktemp("converted")
    meta = json.loads((LLAMAGEN / "reference.json").read_text())
    assert main(["convert", "llamagen", "--gpt", str(LLAMAGEN / meta["files"]["c2i"]), "--vq", str(LLAMAGEN / "vq.pt"),
                 "--out", str(root / "llamagen"), "--n-head", str(meta["gpt"]["n_head"]),
                 "--image-size", str(meta["image_size"])]) == 0
    # VAR's two .pth files, rebuilt as tests/test_var_convert.py does (synthetic parameters + recorded buffers)
    spec = json.loads((VAR / "manifest.json").read_text())["variants"]["release"]
    make, buffers = _script("make_var_fixtures"), load_file(VAR / "buffers_release.safetensors")
    for i, part in enumerate(("var", "vae")):
        sd = make.synthetic_state_dict(spec[f"{part}_params"], spec["seed"] * 2 + i)
        torch.save(sd | {k[len(part) + 1:]: v for k, v in buffers.items() if k.startswith(part + ".")},
                   root / f"{part}.pth")
    assert main(["convert", "var", "--var", str(root / "var.pth"), "--vae", str(root / "vae.pth"), "--out",
                 str(root / "var"), "--patch-nums", *map(str, spec["patch_nums"])]) == 0
    return {"llamagen": root / "llamagen", "var": root / "var"}


@pytest.fixture(scope="module")
def pipes(dirs):
    loaded = {name: load_pipeline(d) for name, d in dirs.items()}
    for pipe in loaded.values():
        pipe.set_progress_bar_config(disable=True)
    return loaded


def cli_error(capsys, argv) -> str:
    """The one-line error of a command that must exit 2."""
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    last = capsys.readouterr().err.rstrip("\n").split("\n")[-1]
    assert exit_.value.code == 2, last
    return last


# ---- SJD: exact on LlamaGen (tests/test_llamagen.py), refused on VAR's next-scale decoder ------------------------

def test_sjd_is_refused_for_var_naming_the_flag_and_what_it_takes(dirs, pipes, capsys, tmp_path):
    out = str(tmp_path / "x.png")
    last = cli_error(capsys, ["generate", "--model", str(dirs["var"]), "--class-label", "1", "--sampler", "sjd",
                              "--out", out])
    assert last.startswith("mmgen generate: error: --sampler does not apply to VARPipeline (model ")
    assert last.endswith("its options: --guidance-scale, --temperature, --top-k, --top-p, --cfg-schedule"), last
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(OptionError, match=r"^sampler does not apply to VARPipeline; its options: guidance_scale, "
                                          r"temperature, top_k, top_p, cfg_schedule$"):
        refuse_options(pipes["var"], {"sampler": "sjd"})  # the check the eval harness and serve route through
    refuse_options(pipes["llamagen"], {"sampler": "sjd"})  # LlamaGen takes it


# ---- watermark: LlamaGen's own codebook and VQ encoder; VAR refused ----------------------------------------------

@pytest.fixture(scope="module")
def marked(pipes):
    """64 images of the converted LlamaGen (8 classes x 8 seeds) with the key "k1" and the same seeds without."""
    pipe = pipes["llamagen"]
    call = dict(class_labels=list(range(8)), num_images_per_prompt=8)
    with_key = pipe(**call, generator=generators_from_seed(0, 64), watermark_key="k1")
    clean = pipe(**call, generator=generators_from_seed(0, 64))
    return with_key, clean


def test_llamagen_watermark_embeds_and_is_detected_calibrated(pipes, marked):
    pipe, (with_key, clean) = pipes["llamagen"], marked
    config = pipe.watermark_config()
    assert config.clusters == cluster_codebook(pipe.vq_model.codebook, 16) and len(config.clusters) == 64
    tokens, clean_tokens = with_key.tokens.flatten(1), clean.tokens.flatten(1)
    assert not torch.equal(tokens, clean_tokens)  # the key reached the sampler
    # the set: marked tokens are detected far below any FPR; under another key, and clean, they are not
    assert detect_tokens_combined(tokens, config, "k1").p_value < 1e-6
    assert detect_tokens_combined(tokens, config, "k2").p_value > 1e-3
    assert detect_tokens_combined(clean_tokens, config, "k1").p_value > 1e-3
    # one image (16 tokens): most marked images fall under 5%, clean ones as often as chance says
    p_marked = [d.p_value for d in detect_tokens(tokens, config, "k1")]
    assert np.mean(np.array(p_marked) <= 0.05) > 0.3, p_marked
    # calibrated: over 16 other keys, marked and clean images' p-values are exact under no watermark
    p_null = np.array([d.p_value for key in range(16) for t in (tokens, clean_tokens)
                       for d in detect_tokens(t, config, f"other-{key}")])
    n = len(p_null)
    for alpha in (0.05, 0.2, 0.5):
        assert np.mean(p_null <= alpha) <= alpha + 4 * math.sqrt(alpha * (1 - alpha) / n), alpha
    assert abs(np.mean(p_null) - 0.5) < 0.06


def test_llamagen_detection_reads_images_through_the_converted_vq(dirs, pipes, marked, tmp_path, capsys):
    """detect_watermark and `mmgen watermark detect --model DIR` score what the converted VQ encoder reads back (a
    tiny random VQ re-tokenizes few codes, so no verdict is asserted on pixels)."""
    pipe, images = pipes["llamagen"], marked[0].images[:3]
    pixels = torch.cat([pipe.image_processor.preprocess(im) for im in images])
    read = pipe.vq_model.encode_tokens(pixels).flatten(1)
    want = [d.as_dict(0.01) for d in detect_tokens(read, pipe.watermark_config(), "k1")]
    assert pipe.detect_watermark(images, "k1") == want
    paths = []
    for i, image in enumerate(images):
        paths.append(str(tmp_path / f"{i}.png"))
        image.save(paths[-1])
    capsys.readouterr()
    assert main(["watermark", "detect", *paths, "--model", str(dirs["llamagen"]), "--key", "k1", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert [r["p_value"] for r in report["images"]] == [w["p_value"] for w in want]


def test_var_watermark_is_refused(dirs, tmp_path, capsys):
    """VAR draws a whole scale per pass, so no token has its predecessors to key it: both commands refuse."""
    image = tmp_path / "v.png"
    Image.new("RGB", (64, 64), "gray").save(image)
    last = cli_error(capsys, ["generate", "--model", str(dirs["var"]), "--class-label", "1", "--watermark-key", "k",
                              "--out", str(tmp_path / "x.png")])
    assert "--watermark-key does not apply to VARPipeline" in last, last
    last = cli_error(capsys, ["watermark", "detect", str(image), "--model", str(dirs["var"]), "--key", "k"])
    assert last.startswith("mmgen watermark: error: --model ") and "is a VARPipeline, which embeds no watermark" \
        in last and "next-token models" in last, last


# ---- mmgen eval: class-conditional models by class index ---------------------------------------------------------

@needs_fashion
@pytest.mark.parametrize("family, passes", [("llamagen", 16), ("var", 4)])
def test_eval_reports_on_a_converted_model(dirs, capsys, family, passes):
    model = str(dirs[family])
    last = cli_error(capsys, ["eval", "--model", model, "--tokenizer-images", "0"])  # the shapes default: captions
    assert "data='shapes' prompts captions" in last and "class-conditional: pass data (--data) fashion_mnist" \
        in last, last
    assert main(["eval", "--model", model, "--data", "fashion_mnist", "--per-category", "1",
                 "--tokenizer-images", "2", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["pipeline"] == {"llamagen": "LlamaGenPipeline", "var": "VARPipeline"}[family]
    accuracy = report["class_accuracy"]
    assert accuracy["n"] == 10 and 0 <= accuracy["accuracy"] <= 1 and len(accuracy["per_class"]) == 10
    assert report["speed"]["images"] == 10 and report["speed"]["nfe_per_image"] == passes
    assert report["tokenizer"]["images"] == 2 and math.isfinite(report["tokenizer"]["psnr"])
    assert report["parameters"]["tokenizer_class"] == {"llamagen": "LlamaGenVQ", "var": "VARVQVAE"}[family]


# ---- mmgen serve: the handler with a class label ---------------------------------------------------------------

def test_serve_builds_and_generates_by_class_label(dirs, pipes):
    import gradio as gr

    from mmgen import serve

    demo = serve.build_demo({"llamagen": dirs["llamagen"], "var": dirs["var"]})
    models = demo.models
    assert "Class-conditional" in models.describe("llamagen") and "Class-conditional" in models.describe("var")
    for name, n, guidance in (("llamagen", 1, 4.0), ("var", 2, 2.5)):
        gallery, status = models.generate("", name, "ar", 5, guidance, n, False, "", "3")
        want = pipes[name](class_labels=[3], num_images_per_prompt=n, guidance_scale=guidance,
                           generator=generators_from_seed(5, n))
        assert [im.tobytes() for im, _ in gallery] == [im.tobytes() for im in want.images]
        assert status.startswith(f"{n} image")
    gallery, status = models.generate("", "llamagen", "sjd", 0, 4.0, 1, True, "k", "2")
    assert len(gallery) == 1 and status.endswith("; watermarked.")
    for args, message in ((("", "llamagen", "ar", 0, 4.0, 1, False, "", ""), "Enter a class label: llamagen is "
                                                                            "class-conditional; it takes an integer"),
                          (("", "var", "ar", 0, 2.5, 1, False, "", "10"), "must be an integer in [0, 9]; got 10"),
                          (("", "var", "sjd", 0, 2.5, 1, False, "", "1"), "SJD (speculative Jacobi decoding) needs a "
                                                                          "next-token model; var is a VARPipeline"),
                          (("", "var", "ar", 0, 2.5, 1, True, "k", "1"), "The watermark needs a next-token model")):
        with pytest.raises(gr.Error) as info:
            models.generate(*args)
        assert message in info.value.message, info.value.message


# ---- fine-tuning: LlamaGen with its own loss on a labelled folder; VAR refused -----------------------------------

def labelled_folder(root: Path) -> Path:
    """An ImageNet-style folder: 3 classes of 4 noisy 8x8 colour fields."""
    rng = np.random.default_rng(0)
    for name, colour in (("n01_red", (220, 30, 30)), ("n02_blue", (30, 30, 220)), ("n03_green", (30, 200, 30))):
        (root / "train" / name).mkdir(parents=True)
        for i in range(4):
            pixels = np.clip(np.array(colour) + rng.normal(0, 20, (8, 8, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / "train" / name / f"{i}.png")
    return root


def test_finetune_converted_llamagen_then_reload_and_generate(dirs, pipes, tmp_path):
    train = _script("train_generator")
    run = tmp_path / "run"
    train.main([f"init_from={dirs['llamagen']}", "data.name=imagefolder",
                f"data.root={labelled_folder(tmp_path / 'folder')}", "train.batch_size=12", "train.steps=8",
                "train.lr=3e-3", "train.warmup=1", "train.log_every=1", "train.ckpt_every=1000",
                f"train.out_dir={run}"])
    losses = [json.loads(line)["loss"] for line in (run / "log.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and all(map(math.isfinite, losses)) and losses[-1] < 0.5 * losses[0], losses
    tuned = load_pipeline(run / "pipeline")
    before = pipes["llamagen"].transformer.state_dict()
    moved = [k for k, v in tuned.transformer.state_dict().items() if not torch.equal(v, before[k])]
    assert "output.weight" in moved and "cls_embedding.embedding_table.weight" in moved
    assert torch.equal(tuned.vq_model.codebook, pipes["llamagen"].vq_model.codebook)  # the VQ stayed frozen
    out = tuned(class_labels=[0, 2], guidance_scale=1.0, temperature=0, output_type="np")
    assert type(tuned).__name__ == "LlamaGenPipeline" and out.images.shape == (2, 8, 8, 3)
    # the training loss reads the sequence as the sampler writes it: teacher-forced logits give the greedy codes
    from mmgen.training.llamagen import LlamaGenTrainer

    with torch.no_grad():
        logits = LlamaGenTrainer(tuned).logits(torch.tensor([0, 2]), out.tokens.flatten(1))
    assert torch.equal(logits.argmax(-1), out.tokens.flatten(1))


def test_finetune_refusals_name_init_from(dirs, tmp_path):
    train = _script("train_generator")
    common = ["data.name=imagefolder", f"data.root={tmp_path}", f"train.out_dir={tmp_path / 'run'}"]
    with pytest.raises(ValueError, match=r"init_from '.*' is a converted VAR model: its class-AdaLN next-scale "
                                         r"decoder has no training loop here; fine-tuning continues next-token "
                                         r"models: .*converted LlamaGenPipeline directories"):
        train.main([f"init_from={dirs['var']}", *common])
    with pytest.raises(ValueError, match=r"converted LlamaGenPipeline model, which fine-tunes as paradigm "
                                         r"next_token or llamagen; got paradigm='next_scale'"):
        train.main([f"init_from={dirs['llamagen']}", "paradigm=next_scale", *common])
    assert not (tmp_path / "run").exists()
