"""Pipelines (one class per paradigm) and `load_pipeline`, which picks the class from a saved directory."""

from __future__ import annotations

import json
from pathlib import Path

from mmgen.pipelines.base import ARPipelineOutput
from mmgen.pipelines.flow import FlowARPipeline, NextXPipeline, RasterFlowPipeline
from mmgen.pipelines.next_scale import NextScalePipeline
from mmgen.pipelines.next_token import NextTokenPipeline

PIPELINES = {cls.__name__: cls for cls in (NextTokenPipeline, NextScalePipeline, RasterFlowPipeline, FlowARPipeline,
                                                  NextXPipeline)}


def load_pipeline(model_dir: str | Path):
    """Load any mmgen pipeline from a local directory written by `save_pretrained`."""
    model_dir = Path(model_dir)
    index = model_dir / "model_index.json"
    if not model_dir.is_dir():
        raise FileNotFoundError(f"model directory {str(model_dir)!r} does not exist")
    if not index.is_file():
        raise FileNotFoundError(f"{str(model_dir)!r} is not a saved pipeline: it has no model_index.json")
    name = json.loads(index.read_text()).get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{str(index)!r} names pipeline {name!r}; accepted: {', '.join(PIPELINES)}")
    return PIPELINES[name].from_pretrained(str(model_dir))


__all__ = ["ARPipelineOutput", "FlowARPipeline", "NextScalePipeline", "NextTokenPipeline", "NextXPipeline",
           "PIPELINES", "RasterFlowPipeline", "load_pipeline"]
