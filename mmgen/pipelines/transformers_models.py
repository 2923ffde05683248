"""Public AR image models saved in the transformers layout (`save_pretrained` of the model + its processor, as
the hub checkpoints are): which pipeline class serves which `config.json` `model_type`."""

from __future__ import annotations

import importlib
import json
from pathlib import Path

# model_type -> "module:class"; imported on use (loading transformers' model code is not free)
TRANSFORMERS_PIPELINES = {"janus": "mmgen.pipelines.janus:JanusPipeline",
                          "emu3": "mmgen.pipelines.emu3:Emu3Pipeline"}


def transformers_model_type(model_dir: str | Path) -> str | None:
    """`model_type` of a transformers directory's config.json, or None when the directory has none."""
    config = Path(model_dir) / "config.json"
    if not config.is_file():
        return None
    try:
        return json.loads(config.read_text()).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{str(config)!r} is not valid JSON: {e}") from None


def transformers_pipeline_class(model_type: str | None, model_dir: str | Path):
    if model_type not in TRANSFORMERS_PIPELINES:
        raise ValueError(f"{str(model_dir)!r} holds a transformers model of type {model_type!r}, which cannot "
                         f"generate images here; supported model types: {', '.join(TRANSFORMERS_PIPELINES)}")
    module, name = TRANSFORMERS_PIPELINES[model_type].split(":")
    return getattr(importlib.import_module(module), name)


def load_transformers_pipeline(model_dir: str | Path, dtype=None):
    """The pipeline for a transformers checkpoint directory (model + processor), chosen by `model_type`."""
    cls = transformers_pipeline_class(transformers_model_type(model_dir), model_dir)
    return cls.from_pretrained(model_dir) if dtype is None else cls.from_pretrained(model_dir, dtype=dtype)
