"""The field's training recipe switches in the one training loop (`mmgen.training.loop.Run`), on a tiny seeded
decoder in this process: EMA (torch's AveragedModel), gradient accumulation (Accelerate's accumulate), gradient
checkpointing (mmgen's decoder and transformers' Janus), trackers (TensorBoard), the resume choice with its
config check, and the FSDP block classes of each model family. Sharded checkpoints under 1 and 2 processes are in
tests/test_distributed_sharded.py."""

import json
import signal
from dataclasses import dataclass, field

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from test_finetune_janus import tiny_janus, tiny_processor

from mmgen.models.shuffle import TokenShuffleTransformer
from mmgen.models.transformer import Transformer
from mmgen.training.loop import Run, load_run_config
from mmgen.training.memory import enable_gradient_checkpointing, shard_classes
from mmgen.training.transformers_models import JanusTrainer, load_finetune

V, T, N = 16, 8, 32  # vocabulary, sequence length, data set size


@dataclass
class TinyModel:
    dim: int = 16
    n_layers: int = 2


@dataclass
class TinyTrain:
    out_dir: str = "runs/tiny"
    steps: int = 4
    batch_size: int = 8
    lr: float = 1e-2
    grad_clip: float = 1.0
    ckpt_every: int = 2
    log_every: int = 1
    seed: int = 0
    fsdp: bool = False
    grad_accum: int = 1
    ema_decay: float = 0.0
    ema_for_sampling: bool = False
    gradient_checkpointing: bool = False
    fsdp_state_dict: str = "full"
    report_to: str = "none"
    resume: str = "latest"


@dataclass
class TinyConfig:
    model: TinyModel = field(default_factory=TinyModel)
    train: TinyTrain = field(default_factory=TinyTrain)


DATA = torch.randint(0, V, (N, T), generator=torch.Generator().manual_seed(0))


@pytest.fixture(autouse=True)
def fresh_accelerate():
    """Accelerate keeps its state in process-wide singletons and Run installs signal handlers: reset both."""
    from accelerate.state import AcceleratorState, GradientState

    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    for s, h in handlers.items():
        signal.signal(s, h)


def tiny_decoder(cfg: TinyModel) -> Transformer:
    return Transformer(vocab_size=V, dim=cfg.dim, n_layers=cfg.n_layers, n_heads=2, max_seq_len=T, rope_2d=False)


def lm_loss(model, tokens):
    logits = model(tokens[:, :-1])
    return F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten())


def train(out, steps=4, model_cfg=None, trace=None, **train):
    """Run the loop as scripts/train_generator.py does; returns (run, decoder). `trace` collects the decoder's
    parameters after every optimisation step."""
    cfg = TinyConfig(model=model_cfg or TinyModel(), train=TinyTrain(out_dir=str(out), steps=steps, **train))
    run = Run(cfg, cfg.train, "tiny")
    model = tiny_decoder(cfg.model)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.train.lr)
    run.resume({"model": model})
    step_model, opt = run.prepare(model, {"opt": opt}, ema=model)

    def step(i):
        loss = lm_loss(step_model, DATA[run.indices(i, N)])
        run.accelerator.backward(loss)
        grad_norm = run.clip_grad_norm_(list(model.parameters()), cfg.train.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if trace is not None and run.sync_gradients:
            trace.append([p.detach().clone() for p in model.parameters()])
        return {"loss": loss.detach(), "grad_norm": grad_norm}

    run.train(step)
    return run, model


def log(out):
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


# 1. EMA

def test_ema_follows_the_weights_and_resumes_exactly(tmp_path):
    trace = []
    run, model = train(tmp_path / "straight", ema_decay=0.9, trace=trace)
    expected = trace[0]  # the first update copies the weights, then ema = 0.9 ema + 0.1 w
    for w in trace[1:]:
        expected = [0.9 * e + 0.1 * x for e, x in zip(expected, w)]
    got = list(run.ema.module.parameters())
    assert max((a - b).abs().max().item() for a, b in zip(got, expected)) < 1e-6
    assert max((a - b).abs().max().item() for a, b in zip(got, model.parameters())) > 1e-4  # not the weights
    saved = load_file(tmp_path / "straight" / "step-0000004" / "ema.safetensors")
    assert saved["n_averaged"].item() == 4 and torch.equal(saved["module.tok_emb.weight"], got[0])

    # stopped after step 2 and resumed: the same average, bit for bit
    train(tmp_path / "resumed", steps=2, ema_decay=0.9)
    resumed, _ = train(tmp_path / "resumed", steps=4, ema_decay=0.9)
    assert resumed.start == 2
    again = load_file(tmp_path / "resumed" / "step-0000004" / "ema.safetensors")
    assert again.keys() == saved.keys() and all(torch.equal(again[k], saved[k]) for k in saved)

    # the pipeline is saved with the average only where the config asks
    assert run.for_sampling(model) is model and torch.equal(model.tok_emb.weight, trace[-1][0])
    run.train_cfg.ema_for_sampling = True
    assert torch.equal(run.for_sampling(model).tok_emb.weight, got[0])


def test_ema_off_by_default_and_bad_decay_named(tmp_path):
    run, _ = train(tmp_path / "plain", steps=2)
    assert run.ema is None and not (tmp_path / "plain" / "step-0000002" / "ema.safetensors").exists()
    with pytest.raises(ValueError, match=r"train.ema_decay must be in \[0, 1\)"):
        train(tmp_path / "bad", ema_decay=1.5)


# 2. gradient accumulation

def test_two_accumulated_batches_of_4_update_as_one_batch_of_8(tmp_path):
    # grad_clip 0.05 clips every step: the norm must be the whole step's gradient's, not a micro-batch's
    one, big = train(tmp_path / "b8", steps=3, batch_size=8, grad_clip=0.05)
    two, acc = train(tmp_path / "b4x2", steps=3, batch_size=4, grad_accum=2, grad_clip=0.05)
    assert max((a - b).abs().max().item() for a, b in zip(big.parameters(), acc.parameters())) < 1e-6
    changed = max((a - b).abs().max().item() for a, b in zip(big.parameters(), tiny_decoder(TinyModel()).parameters()))
    assert changed > 1e-3  # the steps did move the weights
    a, b = log(tmp_path / "b8"), log(tmp_path / "b4x2")
    assert [r["step"] for r in b] == [0, 1, 2]  # one record per optimisation step
    assert all(abs(x["loss"] - y["loss"]) < 1e-5 and abs(x["grad_norm"] - y["grad_norm"]) < 1e-4
               for x, y in zip(a, b)), (a, b)
    with pytest.raises(ValueError, match="train.grad_accum must be an integer >= 1"):
        train(tmp_path / "bad", grad_accum=0)


# 3. gradient checkpointing

def count_block_calls(model) -> list:
    calls = []
    for block in model.layers:
        block.register_forward_pre_hook(lambda *a: calls.append(1))
    return calls


def test_gradient_checkpointing_same_loss_and_gradients():
    torch.manual_seed(0)
    plain = tiny_decoder(TinyModel())
    ckpt = tiny_decoder(TinyModel())
    ckpt.load_state_dict(plain.state_dict())
    assert enable_gradient_checkpointing(ckpt) == ["Transformer"]
    calls = count_block_calls(ckpt)
    losses = []
    for m in (plain, ckpt):
        loss = lm_loss(m, DATA[:8])
        loss.backward()
        losses.append(loss.item())
    assert len(calls) == 4  # two blocks, each run again in the backward pass: activations were not kept
    assert abs(losses[0] - losses[1]) < 1e-6
    assert max((a.grad - b.grad).abs().max().item() for a, b in zip(plain.parameters(), ckpt.parameters())) < 1e-6
    with torch.no_grad():  # sampling never recomputes
        calls.clear()
        ckpt(DATA[:2])
        assert len(calls) == 2


def test_gradient_checkpointing_through_the_loop_and_refused_where_unsupported(tmp_path):
    train(tmp_path / "plain", steps=2)
    train(tmp_path / "ckpt", steps=2, gradient_checkpointing=True)
    a, b = load_file(tmp_path / "plain" / "step-0000002" / "model.safetensors"), \
        load_file(tmp_path / "ckpt" / "step-0000002" / "model.safetensors")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    with pytest.raises(ValueError, match="train.gradient_checkpointing=true: Linear holds no model"):
        enable_gradient_checkpointing(torch.nn.Linear(2, 2))


def test_janus_gradient_checkpointing_is_transformers_own(tmp_path):
    d = tmp_path / "janus"
    tiny_janus().save_pretrained(d)
    tiny_processor().save_pretrained(d)
    plain, ckpt = load_finetune("janus", d), load_finetune("janus", d)
    assert isinstance(ckpt, JanusTrainer)
    assert enable_gradient_checkpointing(ckpt) == ["JanusForConditionalGeneration"]
    assert ckpt.model.model.language_model.gradient_checkpointing
    assert shard_classes(ckpt) == ("LlamaDecoderLayer",)  # FSDP units: its decoder layers, not the vision encoder
    prompts = plain.prompts(["a red circle", "a blue square"])
    codes = torch.randint(0, 32, (2, 16), generator=torch.Generator().manual_seed(1))
    batch = plain.batch(prompts, codes, torch.tensor([False, True]))
    losses = []
    for m in (plain, ckpt):
        loss = m(**batch)
        loss.backward()
        losses.append(loss.item())
    assert abs(losses[0] - losses[1]) < 1e-6
    grads = [(a.grad, b.grad) for a, b in zip(plain.parameters(), ckpt.parameters()) if a.grad is not None]
    assert grads and max((a - b).abs().max().item() for a, b in grads) < 1e-6


# 4. trackers

def test_tensorboard_tracker_logs_the_jsonl_values(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = tmp_path / "tb"
    train(out, steps=3, report_to="tensorboard")
    events = list((out / "trackers").rglob("events.out.tfevents.*"))
    assert events
    acc = EventAccumulator(str(events[0].parent)).Reload()
    scalars = {e.step: e.value for e in acc.Scalars("loss")}
    assert scalars.keys() == {0, 1, 2}
    assert all(abs(scalars[r["step"]] - r["loss"]) < 1e-5 for r in log(out))


def test_bad_or_missing_tracker_is_named(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="train.report_to must be one of none, tensorboard, wandb, got 'mlflow'"):
        train(tmp_path / "bad", report_to="mlflow")
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "tensorboard" else real(name, *a))
    with pytest.raises(ImportError, match=r"pip install 'mmgen\[track\]'"):
        train(tmp_path / "missing", report_to="tensorboard")


# 5. resume choice and config check

def test_resume_latest_path_or_none(tmp_path):
    cfg = load_run_config(TinyConfig, "tiny", ["--resume", "none", "train.steps=3"])
    assert cfg.train.resume == "none" and cfg.train.steps == 3
    assert load_run_config(TinyConfig, "tiny", []).train.resume == "latest"

    first = tmp_path / "first"
    train(first, steps=2)
    assert train(first, steps=3)[0].start == 2  # latest, the default
    assert train(first, steps=3, resume="none")[0].start == 0
    assert [r["step"] for r in log(first)] == [0, 1, 2]  # the fresh run's log replaced the old one
    other = tmp_path / "other"
    run, _ = train(other, steps=4, resume=str(first / "step-0000002"))  # a checkpoint of another run
    assert run.start == 2 and (other / "step-0000004").is_dir()
    assert train(tmp_path / "third", steps=4, resume=str(other))[0].start == 4  # a run directory: its latest
    with pytest.raises(ValueError, match="--resume must be latest, none or a checkpoint directory"):
        train(tmp_path / "x", resume=str(tmp_path / "nowhere"))


def test_resume_refuses_a_changed_meaning_and_allows_a_longer_run(tmp_path):
    out = tmp_path / "run"
    train(out, steps=2)
    with pytest.raises(ValueError, match=r"model.dim: 16 -> 32; train.lr: 0.01 -> 0.02\)"):
        train(out, steps=2, model_cfg=TinyModel(dim=32), lr=0.02)
    run, _ = train(out, steps=4, log_every=2, ckpt_every=4)  # safe keys
    assert run.start == 2


# 6. FSDP units per model family

def test_fsdp_units_are_each_familys_blocks():
    from mmgen.paradigms.flow_head import RasterFlowModel

    assert shard_classes(tiny_decoder(TinyModel())) == ("Block",)
    shuffle = TokenShuffleTransformer(vocab_size=V + 8, image_vocab_size=8, dim=16, n_layers=1, n_heads=2,
                                      shuffle_window=2, max_seq_len=T)
    assert shard_classes(shuffle) == ("Block", "ResidualMLP")
    assert {type(m).__name__ for m in shuffle.modules()} >= {"Block", "ResidualMLP"}
    flow = RasterFlowModel(vocab_size=V, token_dim=4, dim=16, n_layers=1, n_heads=2, max_seq_len=T)
    assert shard_classes(flow) == ("Block",)


# the switches wired through scripts/train_generator.py (one small run)

def test_generator_script_takes_the_switches(tmp_path, capsys):
    from pathlib import Path

    from tiny import load_script

    root = Path(__file__).resolve().parents[1]
    out = tmp_path / "gen"
    argv = ["model.dim=32", "model.n_layers=2",
            "model.n_heads=4", "data.size=32", "train.batch_size=4", "train.grad_accum=2", "train.steps=3",
            "train.ckpt_every=2", "train.log_every=1", "train.warmup=1", "train.ema_decay=0.5",
            "train.ema_for_sampling=true", "train.gradient_checkpointing=true", f"train.out_dir={out}",
            f"tokenizer={root / 'mmgen' / 'zoo' / 'shapes-nexttoken' / 'vq_model'}"]
    load_script("train_generator").main(argv)
    assert "gradient checkpointing: Transformer" in capsys.readouterr().out
    assert [r["step"] for r in log(out)] == [0, 1, 2]
    ema = load_file(out / "step-0000003" / "ema.safetensors")
    raw = load_file(out / "step-0000003" / "model.safetensors")
    saved = load_file(out / "pipeline" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert ema["n_averaged"].item() == 3
    assert all(torch.equal(saved[k], ema[f"module.{k}"]) for k in saved)  # the pipeline holds the average
    assert any(not torch.equal(saved[k], raw[k]) for k in saved)
