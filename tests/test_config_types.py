"""Every config override is checked against its dataclass field's type (issue: `train.fsdp=maybe` switched FSDP on)."""

import importlib.util
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mmgen.config import load_config

ROOT = Path(__file__).resolve().parents[1]


def _generator_config():
    spec = importlib.util.spec_from_file_location("train_generator_types", ROOT / "scripts" / "train_generator.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module.GeneratorRunConfig


@pytest.mark.parametrize("override, message", [
    ("train.steps=abc", "config key train.steps must be an integer, got 'abc'"),
    ("train.batch_size=3.5", "config key train.batch_size must be an integer, got 3.5"),
    ("train.fsdp=maybe", "config key train.fsdp must be true or false, got 'maybe'"),
    ("train.lr=fast", "config key train.lr must be a number, got 'fast'"),
    ("train.steps=true", "config key train.steps must be an integer, got True"),
])
def test_wrongly_typed_override_names_key_value_and_type(override, message):
    with pytest.raises(ValueError) as e:
        load_config(_generator_config(), ROOT / "configs" / "generator_shapes.yaml", [override])
    assert str(e.value) == message


def test_well_typed_overrides_keep_their_types():
    cfg = load_config(_generator_config(), ROOT / "configs" / "generator_shapes.yaml",
                      ["train.steps=7", "train.fsdp=true", "train.lr=3e-3", "train.out_dir=2024"])
    assert (cfg.train.steps, cfg.train.fsdp, cfg.train.lr, cfg.train.out_dir) == (7, True, 0.003, "2024")


@dataclass
class Inner:
    sizes: tuple[int, ...] = (1, 2)
    pair: tuple[float, float] = (0.9, 0.95)
    note: str | None = None


@dataclass
class Outer:
    inner: Inner = field(default_factory=Inner)


def test_sequences_and_optionals_are_checked_element_by_element():
    cfg = load_config(Outer, None, ["inner.sizes=[1,2,4]", "inner.pair=[0.5, 1]", "inner.note=null"])
    assert cfg.inner == Inner(sizes=(1, 2, 4), pair=(0.5, 1.0), note=None)
    with pytest.raises(ValueError, match=r"inner.sizes\[1\] must be an integer, got 2.5"):
        load_config(Outer, None, ["inner.sizes=[1,2.5]"])
    with pytest.raises(ValueError, match=r"inner.pair must have 2 entries"):
        load_config(Outer, None, ["inner.pair=[1,2,3]"])
    with pytest.raises(ValueError, match=r"inner.sizes must be a list"):
        load_config(Outer, None, ["inner.sizes=4"])


def test_every_shipped_config_still_loads():
    cls = _generator_config()
    for path in sorted((ROOT / "configs").glob("*.yaml")):
        try:
            load_config(cls, path)
        except ValueError as e:  # tokenizer / RCC configs belong to other scripts
            assert "unknown config key" in str(e), (path, e)
