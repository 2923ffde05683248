"""Tiny end-to-end run: train a tokenizer and a generator with the real scripts, resume, then generate."""

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch

from tiny import load_script
from mmgen import cli

TOK = ["model.base_channels=8", "model.channel_mult=[1,2,2,2]", "model.embed_dim=16", "model.num_codes=32",
       "model.code_dim=4", "loss.perceptual_weight=0.05", "loss.perceptual_resize=null", "loss.disc_start=3",
       "loss.disc_channels=8", "data.size=64", "train.batch_size=8", "train.eval_images=16", "train.log_every=1"]
GEN = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "data.size=64", "train.batch_size=16",
       "train.log_every=1", "train.lr=3e-3", "train.warmup=5", "train.cond_drop_prob=0.1"]


def run(script, *args) -> str:
    """A training script's main in this process; returns what it printed."""
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        load_script(script).main(list(args))
    return printed.getvalue()


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    d = tmp_path_factory.mktemp("run")
    run("train_tokenizer", *TOK, f"train.out_dir={d / 'vq'}", "train.steps=6", "train.ckpt_every=3")
    gen = [*GEN, f"tokenizer={d / 'vq' / 'final'}", f"train.out_dir={d / 'gen'}", "train.ckpt_every=20"]
    run("train_generator", *gen, "train.steps=20", "train.snapshots=[7,20]")
    first = [json.loads(l) for l in (d / "gen" / "log.jsonl").read_text().splitlines()]
    resumed = run("train_generator", *gen, "train.steps=40")
    return d, first, resumed


def test_tokenizer_run_writes_model_metrics_and_checkpoints(trained):
    d, _, _ = trained
    metrics = json.loads((d / "vq" / "final" / "metrics.json").read_text())
    assert set(metrics) >= {"psnr", "ssim", "codebook_usage", "codebook_perplexity"}
    assert (d / "vq" / "latest").read_text() == "step-0000006"
    assert not list(d.rglob("*.bin")) and not list(d.rglob("*.pt")) and not list(d.rglob("*.pkl"))
    log = [json.loads(l) for l in (d / "vq" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(6))
    assert "d_loss" in log[-1] and "d_loss" not in log[0]  # the discriminator starts after disc_start


def test_generator_loss_falls_and_resume_continues(trained):
    d, first, resumed = trained
    assert first[-1]["loss"] < first[0]["loss"] - 0.5, (first[0], first[-1])
    assert "resumed from" in resumed and "step 20" in resumed
    log = [json.loads(l) for l in (d / "gen" / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == list(range(40))
    # wall and CPU time run on across the resume (a training curve against compute reads one axis)
    for key in ("elapsed_s", "cpu_s"):
        assert all(a[key] <= b[key] for a, b in zip(log, log[1:])), [r[key] for r in log]


def test_snapshots_hold_the_weights_after_their_step(trained):
    from safetensors.torch import load_file

    d, _, _ = trained
    snaps = d / "gen" / "snapshots"
    assert sorted(p.name for p in snaps.iterdir()) == ["step-0000007", "step-0000020"]
    at20 = load_file(snaps / "step-0000020" / "transformer" / "diffusion_pytorch_model.safetensors")
    ckpt = load_file(d / "gen" / "step-0000020" / "model.safetensors")
    assert at20.keys() == ckpt.keys() and all(torch.equal(at20[k].float(), ckpt[k]) for k in ckpt)
    at7 = load_file(snaps / "step-0000007" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert not all(torch.equal(at7[k], at20[k]) for k in at20)
    assert (snaps / "step-0000007" / "checksums.json").is_file()


def test_trained_pipeline_generates_from_cli(trained, tmp_path, capsys):
    d, _, _ = trained
    out = tmp_path / "img.png"
    assert cli.main(["generate", "a large red circle", "--model", str(d / "gen" / "pipeline"), "--out", str(out),
                     "--seed", "1", "--json"]) == 0
    res = json.loads(capsys.readouterr().out)
    assert res["nfe_per_image"] == 64 and Path(res["images"][0]).is_file()


def test_unknown_config_key_is_rejected(tmp_path, monkeypatch, capsys):
    # the script's own config loading: a usage error (exit 2) before anything runs
    script = load_script("train_generator")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exc:
        script.main(["train.stepz=3"])
    assert exc.value.code == 2 and "unknown config key(s) ['stepz'] in train" in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


def test_generator_with_arra_alignment(trained):
    """alignment.type=arra trains the projector beside the decoder: the alignment loss falls, the projector
    is checkpointed but never reaches the pipeline."""
    d, _, _ = trained
    out = d / "gen_arra"
    run("train_generator", *GEN, f"tokenizer={d / 'vq' / 'final'}", f"train.out_dir={out}", "train.steps=25",
        "train.ckpt_every=25", "alignment.type=arra", "alignment.encoder=tokenizer", "alignment.layer=1")
    log = [json.loads(l) for l in (out / "log.jsonl").read_text().splitlines()]
    assert log[-1]["align_loss"] < 0.5 * log[0]["align_loss"]
    assert abs(log[-1]["loss"] - log[-1]["ar_loss"] - log[-1]["align_loss"]) < 1e-3
    from safetensors.torch import load_file
    ckpt = list((out / "step-0000025").glob("*align*"))
    assert ckpt and all(load_file(f) for f in ckpt)
    pipe_files = [p.name for p in (out / "pipeline").rglob("*")]
    assert not any("align" in n for n in pipe_files)


def test_compare_paradigms_sizes_runs_by_cpu_time():
    module = load_script("compare_paradigms")
    # 3 slow warm-up steps, then 0.5 CPU seconds a step: the warm-up is not counted
    log = [{"step": i, "cpu_s": 4.0 * i if i <= 3 else 12.0 + 0.5 * (i - 3)} for i in range(12)]
    assert module.cpu_seconds_per_step(log, skip=3) == 0.5
    assert module.snapshot_steps(100, 3) == [33, 67, 100]
    assert module.snapshot_steps(2, 4) == [1, 2]
    with pytest.raises(ValueError, match="skip=3"):
        module.cpu_seconds_per_step(log[:4], skip=3)
