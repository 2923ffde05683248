"""Typed YAML configs (unknown keys rejected) and safetensors-only checkpoints (resume, corruption)."""

from dataclasses import dataclass, field

import pytest
import torch

from mmgen.training.checkpoint import (gather_training_state, latest_checkpoint, load_checkpoint, restore_optimizer,
                              save_checkpoint)
from mmgen.config import load_config
from mmgen.training.data import batch_indices


@dataclass
class Inner:
    lr: float = 1e-3
    betas: tuple = (0.9, 0.95)


@dataclass
class Outer:
    name: str = "x"
    steps: int = 10
    inner: Inner = field(default_factory=Inner)


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("steps: 5\ninner:\n  lr: 2\n")
    cfg = load_config(Outer, f, ["inner.betas=[0.5, 0.9]", "name=run", "inner.lr=2e0"])
    assert cfg == Outer(name="run", steps=5, inner=Inner(lr=2.0, betas=(0.5, 0.9)))
    assert isinstance(cfg.inner.lr, float)


def test_non_numeric_float_is_rejected_by_key():
    with pytest.raises(ValueError, match="inner.lr must be a number"):
        load_config(Outer, None, ["inner.lr=fast"])


def test_unknown_keys_rejected(tmp_path):
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['lrr'\] in inner; accepted: \['betas', 'lr'\]"):
        load_config(Outer, None, ["inner.lrr=1"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_config(Outer, tmp_path / "missing.yaml")


def _model_opt(seed):
    torch.manual_seed(seed)
    m = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(m.parameters(), lr=0.1)
    return m, opt


def _train(m, opt, steps):
    losses = []
    for _ in range(steps):
        x = torch.randn(8, 4)  # global RNG: restored with the checkpoint
        loss = m(x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_resume_continues_the_same_loss_sequence(tmp_path):
    m, opt = _model_opt(0)
    straight = _train(m, opt, 6)
    m, opt = _model_opt(0)
    first = _train(m, opt, 3)
    save_checkpoint(tmp_path, 3, {"model": m}, {"opt": opt})
    m2, opt2 = _model_opt(123)  # a fresh process with different weights and RNG
    torch.manual_seed(999)
    info = load_checkpoint(latest_checkpoint(tmp_path), {"model": m2}, {"opt": opt2})
    assert info["step"] == 3
    assert first + _train(m2, opt2, 3) == straight
    assert not list(tmp_path.glob("*.pkl")) and not list(tmp_path.glob("**/*.pt"))


@pytest.mark.parametrize("by_name", [True, False], ids=["by-name", "by-index"])
def test_optimizer_restored_after_prepare_continues_the_same_losses(tmp_path, by_name):
    """The scripts' path: whole state dicts keyed by parameter name (gather_training_state), the optimizer put
    back after the model is prepared (restore_optimizer); checkpoints keyed by parameter index (written
    before) restore through the same call."""
    m, opt = _model_opt(0)
    straight = _train(m, opt, 6)
    m, opt = _model_opt(0)
    first = _train(m, opt, 3)
    if by_name:
        model_sd, opts = gather_training_state(m, {"opt": opt})
        opt_sd = opts["opt"]
        assert set(opt_sd["state"]) == {"weight", "bias"}
        ckpt = save_checkpoint(tmp_path, 3, {"model": model_sd}, {"opt": opt_sd})
    else:
        ckpt = save_checkpoint(tmp_path, 3, {"model": m}, {"opt": opt})
    m2, opt2 = _model_opt(123)
    load_checkpoint(ckpt, {"model": m2}, {})
    restore_optimizer(ckpt, "opt", m2, opt2)
    assert first + _train(m2, opt2, 3) == straight


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    m, opt = _model_opt(0)
    _train(m, opt, 1)
    ckpt = save_checkpoint(tmp_path, 1, {"model": m}, {"opt": opt})
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match="corrupt"):
        load_checkpoint(ckpt, {"model": m}, {"opt": opt})


def test_keeps_only_recent_checkpoints(tmp_path):
    m, opt = _model_opt(0)
    for s in (1, 2, 3):
        save_checkpoint(tmp_path, s, {"model": m}, {"opt": opt}, keep=2)
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-0000002", "step-0000003"]
    assert latest_checkpoint(tmp_path).name == "step-0000003"


def test_batch_order_is_a_function_of_step():
    a = [batch_indices(s, 8, 50, seed=1) for s in range(12)]
    assert a == [batch_indices(s, 8, 50, seed=1) for s in range(12)]
    epoch0 = sum(a[:6], [])
    assert len(set(epoch0)) == 48  # no repeats inside an epoch
    # two ranks split the global batch
    assert sorted(batch_indices(3, 8, 50, 1, 0, 2) + batch_indices(3, 8, 50, 1, 1, 2)) == sorted(a[3])
