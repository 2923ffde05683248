"""The training scripts for the scale-wise and continuous paradigms: a multi-scale VQGAN and an AutoencoderKL
trained by train_tokenizer.py, then next_scale / flow_head / flowar / next_x decoders by train_generator.py; losses fall,
runs resume, and the saved pipelines generate from the CLI."""

import json
from pathlib import Path

import pytest

from tiny import load_script
from mmgen import cli

DATA = ["data.size=64", "train.batch_size=8", "train.eval_images=16", "train.log_every=1",
        "loss.perceptual_weight=0.05", "loss.perceptual_resize=null", "loss.disc_channels=8"]
MSVQ = ["model_type=multiscale", "model.base_channels=8", "model.channel_mult=[1,2,2,2]", "model.embed_dim=16",
        "model.num_codes=32", "model.code_dim=4", "model.scales=[1,2,4,8]", "loss.disc_start=100"]
VAE = ["model_type=vae", "model.block_out_channels=[8,8,8,8]", "model.norm_num_groups=4", "loss.disc_start=100"]
GEN = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "data.size=64", "train.batch_size=16",
       "train.log_every=1", "train.lr=3e-3", "train.warmup=5", "train.cond_drop_prob=0.1",
       "flow.head_width=32", "flow.head_depth=2", "flow.flow_width=16", "flow.flow_depth=1", "flow.flow_heads=2"]


def run(script, *args):
    """A training script's main, in this process (the scripts are what the tests exercise, not the interpreter
    start: the CLI's own process start is checked once in test_pipeline_cli)."""
    load_script(script).main(list(args))


def log(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("tok")
    run("train_tokenizer", *DATA, *MSVQ, f"train.out_dir={d / 'msvq'}", "train.steps=4", "train.ckpt_every=4")
    run("train_tokenizer", *DATA, *VAE, f"train.out_dir={d / 'vae'}", "train.steps=4", "train.ckpt_every=4")
    return d


def test_tokenizer_runs_save_their_kind(tokenizers):
    ms = json.loads((tokenizers / "msvq" / "final" / "metrics.json").read_text())
    assert set(ms) >= {"psnr", "ssim", "codebook_usage"}
    vae = json.loads((tokenizers / "vae" / "final" / "metrics.json").read_text())
    assert set(vae) == {"psnr", "ssim", "images"}
    cfg = json.loads((tokenizers / "vae" / "final" / "config.json").read_text())
    assert cfg["_class_name"] == "AutoencoderKL" and cfg["scaling_factor"] != 1.0  # estimated from the data
    assert "kl" in log(tokenizers / "vae" / "log.jsonl")[0]


@pytest.mark.parametrize("paradigm, tok, nfe", [("next_scale", "msvq", 4), ("flow_head", "vae", 64),
                                                ("flowar", "vae", 4), ("next_x", "vae", 4)])
def test_generator_trains_resumes_and_generates(tokenizers, tmp_path, capsys, paradigm, tok, nfe):
    gen = [*GEN, f"paradigm={paradigm}", f"tokenizer={tokenizers / tok / 'final'}", f"train.out_dir={tmp_path}",
           "train.ckpt_every=15"]
    run("train_generator", *gen, "train.steps=15")
    capsys.readouterr()
    run("train_generator", *gen, "train.steps=30")
    assert "resumed from" in capsys.readouterr().out
    records = log(tmp_path / "log.jsonl")
    assert [r["step"] for r in records] == list(range(30))
    first, last = records[0]["loss"], sum(r["loss"] for r in records[-5:]) / 5
    # cross-entropy starts at ln(32) = 3.47 nats; the flow losses start near E|noise - x|^2 ~ 2
    assert (last < first - 0.5) if paradigm == "next_scale" else (last < 0.7 * first), (first, last)
    out = tmp_path / "img.png"
    capsys.readouterr()
    assert cli.main(["generate", "a large red circle", "--model", str(tmp_path / "pipeline"), "--out", str(out),
                     "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nfe_per_image"] == nfe and out.is_file()


def test_alignment_rejected_for_continuous_paradigm(tokenizers, tmp_path):
    with pytest.raises(ValueError, match="needs a discrete paradigm"):
        run("train_generator", *GEN, "paradigm=flowar", f"tokenizer={tokenizers / 'vae' / 'final'}",
            f"train.out_dir={tmp_path}", "train.steps=2", "alignment.type=arra", "alignment.encoder=tokenizer")


def test_tokenizer_of_another_paradigm_is_rejected(tmp_path):
    """train_generator.py loads `tokenizer` through load_visual_tokenizer(paradigm, dir), which checks the class
    the directory holds: a function call on a saved (untrained) multi-scale VQGAN, no training run needed."""
    from tiny import tiny_vqgan
    from mmgen.pipelines import load_visual_tokenizer

    tiny_vqgan(channel_mult=(1, 2, 2), scales=(1, 2, 4)).save_pretrained(tmp_path / "msvq")
    with pytest.raises(ValueError, match="paradigm 'flowar' needs tokenizer class AutoencoderKL; .* holds "
                                         "MultiScaleVQGAN"):
        load_visual_tokenizer("flowar", str(tmp_path / "msvq"))
    assert type(load_visual_tokenizer("next_scale", str(tmp_path / "msvq"))).__name__ == "MultiScaleVQGAN"


def test_unknown_paradigm_is_rejected():
    """The script resolves `paradigm` with resolve_paradigm(cfg.paradigm, cfg.model.shuffle_window)."""
    import re

    from mmgen.pipelines import PARADIGMS, resolve_paradigm

    assert {"next_token", "token_shuffle", "next_scale", "flow_head", "flowar", "next_x"} <= set(PARADIGMS)
    with pytest.raises(ValueError, match=re.escape(f"paradigm must be one of {', '.join(PARADIGMS)}; got 'diffusion'")):
        resolve_paradigm("diffusion")
    assert resolve_paradigm("next_token", 2) == "token_shuffle"


def test_next_scale_with_arra_alignment(tokenizers, tmp_path):
    """ARRA on the next-scale paradigm: the alignment loss on the hidden states of the image-predicting
    positions falls beside the AR loss, and the projector stays out of the pipeline."""
    run("train_generator", *GEN, "paradigm=next_scale", f"tokenizer={tokenizers / 'msvq' / 'final'}",
        f"train.out_dir={tmp_path}", "train.steps=25", "train.ckpt_every=25", "alignment.type=arra",
        "alignment.encoder=tokenizer", "alignment.layer=1")
    records = log(tmp_path / "log.jsonl")
    assert records[-1]["align_loss"] < 0.5 * records[0]["align_loss"]
    assert abs(records[-1]["loss"] - records[-1]["ar_loss"] - records[-1]["align_loss"]) < 1e-3
    assert not any("align" in p.name for p in (tmp_path / "pipeline").rglob("*"))
