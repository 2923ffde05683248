"""Reverse-cycle-consistent detection encoder: the distortions it trains under, the tuning script on a tiny
pipeline (its loss falls and its match rises), and detection reading images through the installed encoder."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import tiny_next_token_pipeline, tiny_text_tokenizer, tiny_vqgan
from mmgen.pipelines import load_pipeline
from mmgen.pipelines.base import ENCODER_WEIGHTS, load_detection_encoder, save_detection_encoder
from mmgen.training.augment import DISTORTIONS, distort, distort_one

ROOT = Path(__file__).resolve().parents[1]


def _script():
    spec = importlib.util.spec_from_file_location("train_rcc", ROOT / "scripts" / "train_rcc.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_distortions_are_seeded_and_change_images():
    images = (torch.rand(6, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 255).to(torch.uint8)
    a = distort(images, torch.Generator().manual_seed(1))
    b = distort(images, torch.Generator().manual_seed(1))
    assert a.dtype == torch.uint8 and a.shape == images.shape and torch.equal(a, b)
    for name, (lo, hi) in DISTORTIONS.items():
        out = distort_one(images[0], name, (lo + hi) / 2, torch.Generator().manual_seed(0))
        assert out.shape == images[0].shape and out.dtype == torch.uint8
        assert torch.equal(out, images[0]) == (name == "none"), name
    with pytest.raises(ValueError, match="distortions must be a non-empty subset"):
        distort(images, torch.Generator(), ("rotate",))
    with pytest.raises(ValueError, match="uint8"):
        distort(images.float(), torch.Generator())


def test_detection_encoder_round_trip(tmp_path):
    pipe = tiny_next_token_pipeline(tiny_text_tokenizer())
    vq = pipe.vq_model
    changed = type(vq).from_config(vq.config)
    changed.load_state_dict(vq.state_dict())
    with torch.no_grad():
        changed.encoder.net[0].weight.add_(0.5)
    save_detection_encoder(changed, tmp_path / "enc", ("encoder.", "quantizer.proj_in."), {"steps": 0})
    saved = load_file(tmp_path / "enc" / ENCODER_WEIGHTS)
    assert set(saved) == {k for k in vq.state_dict() if k.startswith(("encoder.", "quantizer.proj_in."))}
    loaded = load_detection_encoder(vq, tmp_path / "enc")
    for k, v in loaded.state_dict().items():  # tuned tensors from the file, the rest from the pipeline's own
        assert torch.equal(v, (changed if k.startswith(("encoder.", "quantizer.proj_in.")) else vq).state_dict()[k]), k
    assert not torch.equal(loaded.encoder.net[0].weight, vq.encoder.net[0].weight)  # the original is untouched
    (tmp_path / "enc" / ENCODER_WEIGHTS).unlink()
    with pytest.raises(FileNotFoundError, match="detection encoder file"):
        load_detection_encoder(vq, tmp_path / "enc")


def test_train_rcc_learns_and_installs(tmp_path):
    """120 steps on a tiny 32 px pipeline: the loss falls, the training match rises, and once installed the
    pipeline's detection reads images through the tuned encoder (and only detection: generation is unchanged)."""
    tok = tiny_text_tokenizer(shapes_words=True)
    torch.manual_seed(0)
    pipe_dir = tmp_path / "pipe"
    vq = tiny_vqgan(channel_mult=(1, 2, 2), image_size=32)  # the shapes renderer draws 32 px and up: 8x8 codes
    tiny_next_token_pipeline(tok, vq, max_seq_len=96, max_text_len=16).save_pretrained(pipe_dir)
    out = tmp_path / "run"
    script = _script()
    script.main(["--config", str(ROOT / "configs" / "rcc_shapes_emoji.yaml"), f"model={pipe_dir}",
                 "data.name=shapes", "data.size=200", "data.image_size=32", "codes.generated=48", "codes.real=16",
                 "codes.heldout=16", "codes.batch_size=16", f"train.out_dir={out}", "train.steps=120",
                 "train.log_every=1", "train.batch_size=16", "train.lr=3e-3", "train.warmup=1",
                 "train.distortions=[none]", "train.ckpt_every=100", "install=true"])
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    assert len(log) == 120
    first, last = log[:10], log[-10:]
    assert sum(r["loss"] for r in last) < 0.7 * sum(r["loss"] for r in first)
    assert sum(r["match"] for r in last) > sum(r["match"] for r in first)
    metrics = json.loads((out / "final" / "metrics.json").read_text())
    assert metrics["token_match"]["tuned"]["clean"] > metrics["token_match"]["original"]["clean"]

    pipe = load_pipeline(pipe_dir)
    assert pipe.watermark.encoder == "watermark_encoder" and pipe.detection_tokenizer is not None
    images = pipe(["a red circle"], num_images_per_prompt=2, generator=torch.Generator().manual_seed(0)).images
    x = torch.cat([pipe.image_processor.preprocess(im) for im in images])
    assert torch.equal(pipe.retokenize(images), pipe.detection_tokenizer.encode(x).flatten(1))
    assert not torch.equal(pipe.detection_tokenizer.encode(x), pipe.vq_model.encode(x))


def test_train_rcc_with_decoder_tells_codes_apart_and_installs(tmp_path):
    """Encoder and decoder tuned together on a tiny pipeline: the cycle match rises above what the encoder alone
    reaches in as many steps, and once installed the pipeline draws the same tokens with the tuned decoder and
    reads images back with the tuned encoder (no separate detection encoder)."""
    tok = tiny_text_tokenizer(shapes_words=True)
    torch.manual_seed(0)
    pipe_dir = tmp_path / "pipe"
    vq = tiny_vqgan(channel_mult=(1, 2, 2), image_size=32)
    tiny_next_token_pipeline(tok, vq, max_seq_len=96, max_text_len=16).save_pretrained(pipe_dir)
    before = load_pipeline(pipe_dir)
    script = _script()
    common = ["--config", str(ROOT / "configs" / "rcc_shapes_emoji.yaml"), f"model={pipe_dir}", "data.name=shapes",
              "data.size=200", "data.image_size=32", "codes.generated=48", "codes.real=16", "codes.heldout=16",
              "codes.batch_size=16", "train.steps=60", "train.log_every=1", "train.batch_size=16", "train.lr=3e-3",
              "train.warmup=1", "train.distortions=[none,noise]", "train.ckpt_every=100"]
    script.main([*common, f"train.out_dir={tmp_path / 'enc'}"])
    script.main([*common, f"train.out_dir={tmp_path / 'joint'}", "train.tune_decoder=true",
                 "train.fidelity_weight=10", "install=true"])
    enc = json.loads((tmp_path / "enc" / "final" / "metrics.json").read_text())
    joint = json.loads((tmp_path / "joint" / "final" / "metrics.json").read_text())
    assert joint["tune_decoder"] and "generated_psnr_tuned_vs_original" in joint
    assert joint["token_match"]["tuned"]["clean"] > enc["token_match"]["tuned"]["clean"], (joint, enc)
    log = [json.loads(line) for line in (tmp_path / "joint" / "log.jsonl").read_text().splitlines()]
    assert {"cycle", "fid_gen"} <= set(log[0])

    after = load_pipeline(pipe_dir)
    assert after.watermark_config().encoder is None and not (pipe_dir / "watermark_encoder").exists()
    tuned = {k: v for k, v in after.vq_model.state_dict().items()}
    assert not torch.equal(tuned["decoder.conv_out.weight"], before.vq_model.state_dict()["decoder.conv_out.weight"])
    assert torch.equal(tuned["quantizer.embedding.weight"], before.vq_model.state_dict()["quantizer.embedding.weight"])
    gen = dict(prompt=["a red circle"], num_images_per_prompt=2, output_type="pt")
    a = before(**gen, generator=torch.Generator().manual_seed(0))
    b = after(**gen, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a.tokens, b.tokens) and not torch.equal(a.images, b.images)
