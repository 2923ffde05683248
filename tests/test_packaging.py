"""Packaging: optional parts live in extras, and a missing extra is named where it is needed."""

import sys
import tomllib
from pathlib import Path

import pytest

from mmgen import cli
from mmgen.alignment.encoders import make_target_encoder

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_web_and_alignment_stacks_are_extras_and_unused_packages_are_gone():
    core = " ".join(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    for name in ("gradio", "open_clip_torch", "einops"):
        assert name not in core
    assert extras["serve"] == ["gradio>=6"] and extras["align"] == ["open_clip_torch>=2.24"]
    assert "transformers>=5" in core and "torch>=2.6" in core  # what the zoo's tokenizers and FSDP2 need


def test_missing_serve_extra_is_named(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed: importing it raises ImportError
    monkeypatch.delitem(sys.modules, "mmgen.serve", raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--model", "shapes-emoji"])
    assert exc.value.code == 2
    assert "mmgen serve needs the serve extra: pip install 'mmgen[serve]' (gradio)" in capsys.readouterr().err


def test_missing_align_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    message = r"alignment.encoder=open_clip needs the align extra: pip install 'mmgen\[align\]'"
    with pytest.raises(ImportError, match=message):
        make_target_encoder("open_clip:ViT-B-32")
