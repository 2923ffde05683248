"""Pipelines (one class per paradigm) and `load_pipeline`, which picks the class from a saved directory."""

from __future__ import annotations

import json
from pathlib import Path

from mmgen.pipelines.base import ARPipelineOutput
from mmgen.pipelines.flow import FlowARPipeline, NextXPipeline, RasterFlowPipeline
from mmgen.pipelines.next_scale import NextScalePipeline
from mmgen.pipelines.next_token import NextTokenPipeline
from mmgen.pipelines.registry import (PARADIGMS, get_paradigm, load_visual_tokenizer, paradigm_name,
                                      resolve_paradigm)
from mmgen.pipelines.transformers_models import load_transformers_pipeline, transformers_model_type
from mmgen.safe_save import save_pipeline, verify
from mmgen.zoo import resolve_model

PIPELINES = {entry.pipeline.__name__: entry.pipeline for entry in PARADIGMS.values()}  # model_index.json names


def load_pipeline(model_dir: str | Path):
    """Load any mmgen pipeline from a local directory written by `save_pretrained` (or `save_pipeline`), or a
    shipped model by name (`mmgen.zoo`), or a transformers checkpoint directory
    of a supported public model (`mmgen.pipelines.transformers_models`, by config.json's `model_type`). The directory is verified first (`mmgen.safe_save.verify`): a
    truncated, corrupt or missing file raises a ValueError naming it before torch reads anything."""
    model_dir = resolve_model(model_dir)
    index = model_dir / "model_index.json"
    if not index.is_file() and transformers_model_type(model_dir) is not None:
        return load_transformers_pipeline(model_dir)
    if not index.is_file():
        raise FileNotFoundError(f"{str(model_dir)!r} is not a saved pipeline: it has no model_index.json")
    verify(model_dir)
    name = json.loads(index.read_text()).get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{str(index)!r} names pipeline {name!r}; accepted: {', '.join(PIPELINES)}")
    return PIPELINES[name].from_pretrained(str(model_dir))


__all__ = ["ARPipelineOutput", "FlowARPipeline", "NextScalePipeline", "NextTokenPipeline", "NextXPipeline",
           "PARADIGMS", "PIPELINES", "RasterFlowPipeline", "get_paradigm", "load_pipeline", "load_visual_tokenizer",
           "paradigm_name", "resolve_paradigm", "save_pipeline", "verify"]
