"""ETT (`mmgen.training.ett`, arXiv 2505.10562): which parts the AR loss reaches in each stage, the projector folded
into the saved decoder, and the `ett.*` switch of scripts/train_generator.py (loss falls, the tuned tokenizer is
saved with the pipeline and resumes exactly)."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from mmgen.paradigms import next_token
from mmgen.pipelines import NextTokenPipeline
from mmgen.text import UnifiedVocab
from mmgen.training.ett import CodebookProjector, ETTConfig, ETTStep, embedded_loss, fold_projector
from tiny import load_script, tiny_transformer, tiny_vqgan
from tokenizers_vis.vqgan import VQGAN

GRID, TEXT_LEN = (4, 4), 4


def tiny_ett(seed=0):
    """An ETTStep on a 16 px VQGAN (4x4 codes of 32) and a 2-layer decoder, no perceptual term."""
    vq = tiny_vqgan(channel_mult=(1, 2, 2), seed=seed)
    layout = next_token.NextTokenLayout(UnifiedVocab(10, vq.vocab_size), TEXT_LEN, GRID)
    model = tiny_transformer(layout.vocab.size, layout.seq_len, seed=seed).train()
    projector = CodebookProjector(vq.quantizer.code_dim, 32)
    cfg = ETTConfig(enabled=True, loss={"perceptual_weight": 0.0})
    return ETTStep(cfg, next_token, layout, model, vq, projector, cfg.make_loss()), layout


def batch(seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(2, 3, 16, 16, generator=g) * 2 - 1, [[1, 2], [3]]


def reached(step, loss) -> dict:
    """Which parts hold a nonzero gradient of `loss`."""
    parts = {"projector": step.projector.net[0].weight, "decoder": next(step.model.layers[0].parameters()),
             "encoder": step.vq.encoder.net[0].weight, "codebook": step.vq.quantizer.embedding.weight,
             "pixel_decoder": step.vq.last_layer}
    wanted = {k: p for k, p in parts.items() if p.requires_grad}
    grads = torch.autograd.grad(loss, list(wanted.values()), retain_graph=True, allow_unused=True)
    return {k: g is not None and bool(g.abs().sum() > 0) for k, g in zip(wanted, grads)} | \
        {k: False for k in parts if k not in wanted}


def test_stage1_trains_the_projector_alone_and_stage2_reaches_the_tokenizer():
    step, _ = tiny_ett()
    images, texts = batch()
    step.set_stage(False)
    loss, ar, tok = step(images, texts, stage2=False)
    assert tok is None and reached(step, loss) == dict(projector=True, decoder=False, encoder=False, codebook=False,
                                                      pixel_decoder=False)
    step.set_stage(True)
    loss, ar, tok = step(images, texts, stage2=True)
    # the AR loss alone reaches encoder (straight-through) and codebook; the pixel decoder only through recon
    assert reached(step, ar) == dict(projector=True, decoder=True, encoder=True, codebook=True, pixel_decoder=False)
    assert all(reached(step, loss).values())


def test_a_detached_codebook_is_caught(monkeypatch):
    step, _ = tiny_ett()
    quantizer = step.vq.quantizer
    plain = quantizer.code_vectors
    monkeypatch.setattr(quantizer, "code_vectors", lambda ids: plain(ids).detach())
    step.set_stage(True)
    _, ar, _ = step(*batch(), stage2=True)
    seen = reached(step, ar)
    assert not seen["codebook"] and seen["encoder"]  # the check above would fail on this variant


def test_folded_decoder_reads_ids_as_training_read_codes():
    step, layout = tiny_ett()
    step.eval()
    images, texts = batch()
    with torch.no_grad():
        tp_ids = step.vq.encode(images)
        b = next_token.build_batch(layout, texts, tp_ids)
        codes = step.vq.quantizer.code_vectors(tp_ids.flatten(1))
        trained = embedded_loss(step.model, b, layout, step.projector(codes))
        fold_projector(step.model, step.vq, step.projector, layout.vocab.image_offset)
        sampled = next_token.loss_fn(step.model, b, layout)
    assert torch.allclose(trained, sampled, atol=1e-6), (trained, sampled)


TRAIN = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "data.size=32",
         "data.image_size=32", "train.batch_size=8", "train.log_every=1", "train.lr=3e-3", "train.warmup=2",
         "train.ckpt_every=3", "ett.enabled=true", "ett.stage1_steps=2", "ett.loss.perceptual_weight=0.0",
         "ett.tokenizer_lr_scale=0.5", "ett.projector_lr_scale=2.0"]


@pytest.fixture(scope="module")
def ett_run(tmp_path_factory):
    d = tmp_path_factory.mktemp("ett")
    tiny_vqgan(channel_mult=(1, 2, 2, 2), image_size=32).save_pretrained(d / "vq")
    args = [*TRAIN, f"tokenizer={d / 'vq'}", "train.steps=6", "train.snapshots=[6]"]
    load_script("train_generator").main([*args, f"train.out_dir={d / 'run'}"])
    return d, args


def log(run_dir):
    return [json.loads(line) for line in (run_dir / "log.jsonl").read_text().splitlines()]


def test_ett_run_switches_stage_and_loss_falls(ett_run):
    d, _ = ett_run
    records = log(d / "run")
    assert [r["stage"] for r in records] == [1, 1, 2, 2, 2, 2]
    assert "tok_loss" in records[-1] and "tok_loss" not in records[0]
    assert records[-1]["ar_loss"] < records[0]["ar_loss"] - 0.3, [r["ar_loss"] for r in records]


def test_tuned_tokenizer_is_saved_with_the_pipeline_bit_identically(ett_run):
    d, _ = ett_run
    tuned = load_file(d / "run" / "step-0000006" / "vq_model.safetensors")
    before = VQGAN.from_pretrained(d / "vq").state_dict()
    assert any(not torch.equal(tuned[k], before[k]) for k in tuned)  # stage 2 moved it
    pipe = NextTokenPipeline.from_pretrained(d / "run" / "pipeline")
    saved = pipe.vq_model.state_dict()
    assert tuned.keys() == saved.keys() and all(torch.equal(tuned[k], saved[k]) for k in tuned)
    again = d / "again"
    pipe.vq_model.save_pretrained(again)
    reloaded = VQGAN.from_pretrained(again).state_dict()
    assert all(torch.equal(v, reloaded[k]) for k, v in saved.items())
    # the decoder's image rows are the projector's view of the tuned codebook
    projector = CodebookProjector(pipe.vq_model.quantizer.code_dim, 32)
    projector.load_state_dict(load_file(d / "run" / "step-0000006" / "ett_projector.safetensors"))
    off = UnifiedVocab(len(pipe.tokenizer), pipe.vq_model.vocab_size).image_offset
    with torch.no_grad():
        rows = projector(pipe.vq_model.quantizer.code_vectors(torch.arange(pipe.vq_model.vocab_size)))
    assert torch.allclose(pipe.transformer.tok_emb.weight[off: off + len(rows)], rows, atol=1e-6)
    for part in ("transformer", "vq_model"):  # a snapshot is folded the same way
        snap = load_file(d / "run" / "snapshots" / "step-0000006" / part / "diffusion_pytorch_model.safetensors")
        final = load_file(d / "run" / "pipeline" / part / "diffusion_pytorch_model.safetensors")
        assert all(torch.equal(snap[k], final[k]) for k in final)


def test_ett_resume_is_exact(ett_run):
    d, args = ett_run
    stopped = d / "stopped"
    shutil.copytree(d / "run", stopped)
    shutil.rmtree(stopped / "step-0000006")
    shutil.rmtree(stopped / "pipeline")
    (stopped / "latest").write_text("step-0000003")
    load_script("train_generator").main([*args, f"train.out_dir={stopped}"])
    strip = lambda rs: [{k: v for k, v in r.items() if k not in ("elapsed_s", "cpu_s")} for r in rs]  # noqa: E731
    assert strip(log(stopped)) == strip(log(d / "run"))


@pytest.mark.parametrize("override, named", [
    ("ett.stage1_steps=9", "ett.stage1_steps must be in 0..train.steps=6"),
    ("ett.loss.disc_weight=0.1", "ett.loss.disc_weight must be 0"),
    ("ett.loss.gan=1", r"ett.loss: unknown key\(s\) \['gan'\]; accepted: \['codebook_weight'"),
    ("ett.rec_weight=-1", "ett.rec_weight must be >= 0"),
    ("ett.projector_lr_scale=0.0", "ett.projector_lr_scale must be > 0"),
    ("train.ema_decay=0.9", "train.ema_decay must be 0 with ett.enabled"),
    ("model.shuffle_window=2", "paradigm must be next_token"),
])
def test_bad_ett_values_are_refused_by_name(ett_run, tmp_path, override, named):
    d, args = ett_run
    with pytest.raises(ValueError, match=named):
        load_script("train_generator").main([*args, override, f"train.out_dir={tmp_path / 'x'}"])


def test_checkpoints_older_than_the_switch_resume_with_it_off():
    from dataclasses import asdict

    from mmgen.training.resume import check_resumable

    config = load_script("train_generator").GeneratorRunConfig
    # written (as JSON) before `ett` existed
    saved = json.loads(json.dumps({k: v for k, v in asdict(config()).items() if k != "ett"}))
    check_resumable(saved, asdict(config()), asdict(config()))
    with pytest.raises(ValueError, match="ett.enabled: None -> False"):  # without the defaults: refused
        check_resumable(saved, asdict(config()))
    on = config()
    on.ett.enabled = True
    with pytest.raises(ValueError, match="ett.enabled: None -> True"):
        check_resumable(saved, asdict(on), asdict(config()))
