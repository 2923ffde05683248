"""Pipelines (one class per paradigm) and `load_pipeline`, which picks the class from a saved directory."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmgen.pipelines.base import ARPipelineOutput
from mmgen.pipelines.flow import FlowARPipeline, NextXPipeline, RasterFlowPipeline
from mmgen.pipelines.llamagen import LlamaGenPipeline
from mmgen.pipelines.next_scale import NextScalePipeline
from mmgen.pipelines.next_token import NextTokenPipeline
from mmgen.pipelines.registry import (PARADIGMS, get_paradigm, load_visual_tokenizer, paradigm_name,
                                      resolve_paradigm)
from mmgen.pipelines.transformers_models import load_transformers_pipeline, transformers_model_type
from mmgen.pipelines.var import VARPipeline
from mmgen.safe_save import pipeline_class_name, save_pipeline, verify
from mmgen.zoo import resolve_model

PIPELINES = {entry.pipeline.__name__: entry.pipeline for entry in PARADIGMS.values()}  # model_index.json names
PIPELINES[VARPipeline.__name__] = VARPipeline  # released VAR checkpoints, `mmgen convert var`
PIPELINES[LlamaGenPipeline.__name__] = LlamaGenPipeline  # released LlamaGen checkpoints, `mmgen convert llamagen`


def load_pipeline(model_dir: str | Path, torch_dtype: torch.dtype | None = None, device: str | torch.device | None = None):
    """Load any mmgen pipeline from a local directory written by `save_pretrained` (or `save_pipeline`), or a
    shipped model by name (`mmgen.zoo`), or a transformers checkpoint directory of a supported public model
    (`mmgen.pipelines.transformers_models`, by config.json's `model_type`), then move it to `device` / `torch_dtype`
    (as diffusers' `from_pretrained(..., torch_dtype=)` + `.to(device)`; float32 on CPU unless told). The directory is
    verified first (`mmgen.safe_save.verify`): a truncated, corrupt or missing file raises a ValueError naming it
    before torch reads anything."""
    if torch_dtype is not None and not (isinstance(torch_dtype, torch.dtype) and torch_dtype.is_floating_point):
        raise ValueError(f"torch_dtype must be a floating torch.dtype (torch.float32, torch.bfloat16, "
                         f"torch.float16), got {torch_dtype!r}")
    if device is not None:
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch device such as 'cpu' or 'cuda:0', got {device!r}") from None
    model_dir = resolve_model(model_dir)
    index = model_dir / "model_index.json"
    if not index.is_file() and transformers_model_type(model_dir) is not None:
        pipe = load_transformers_pipeline(model_dir, dtype=torch_dtype)
    elif not index.is_file():
        raise FileNotFoundError(f"{str(model_dir)!r} is not a saved pipeline: it has no model_index.json")
    else:
        verify(model_dir)
        name = pipeline_class_name(json.loads(index.read_text()))
        if name not in PIPELINES:
            raise ValueError(f"{str(index)!r} names pipeline {name!r}; accepted: {', '.join(PIPELINES)}")
        pipe = PIPELINES[name].from_pretrained(str(model_dir), **({} if torch_dtype is None else {"torch_dtype": torch_dtype}))
    if device is not None:
        pipe = pipe.to(device)
    return pipe


__all__ = ["ARPipelineOutput", "FlowARPipeline", "LlamaGenPipeline", "NextScalePipeline", "NextTokenPipeline",
           "NextXPipeline", "PARADIGMS", "PIPELINES", "RasterFlowPipeline", "VARPipeline", "get_paradigm",
           "load_pipeline", "load_visual_tokenizer", "paradigm_name", "resolve_paradigm", "save_pipeline", "verify"]
