"""Pipelines (one class per paradigm) and `load_pipeline`, which picks the class from a saved directory."""

from __future__ import annotations

import json
from pathlib import Path

from mmgen.pipelines.base import ARPipelineOutput
from mmgen.pipelines.flow import FlowARPipeline, NextXPipeline, RasterFlowPipeline
from mmgen.pipelines.next_scale import NextScalePipeline
from mmgen.pipelines.next_token import NextTokenPipeline
from mmgen.pipelines.registry import PARADIGMS, get_paradigm, paradigm_name
from mmgen.safe_save import save_pipeline, verify

PIPELINES = {entry.pipeline.__name__: entry.pipeline for entry in PARADIGMS.values()}  # model_index.json names


ZOO = Path(__file__).resolve().parents[1] / "zoo"


def zoo_names() -> list[str]:
    """The shipped models in `mmgen/zoo`, by name."""
    return sorted(d.name for d in ZOO.iterdir() if (d / "model_index.json").is_file())


def default_guidance_scale(directory) -> float:
    """A saved pipeline's own guidance scale (`default_guidance_scale` in its model_index.json; the pipelines'
    3.0 where it sets none), read without loading the model."""
    index = json.loads((Path(directory) / "model_index.json").read_text())
    return float(index.get("default_guidance_scale", 3.0))


def zoo_card(name: str) -> dict:
    """What `mmgen models` shows of a shipped model: its card (paradigm, data, training commands), pipeline
    class, size, parameter counts (read from the safetensors headers, nothing loaded) and headline results
    from its eval.json (held-out / train compositional accuracy, FD-ENL0, decoder passes per image)."""
    import json
    import math

    from safetensors import safe_open

    d = resolve_model(name)
    card = json.loads((d / "card.json").read_text()) if (d / "card.json").is_file() else {}
    params = {}
    for f in sorted(d.glob("*/*.safetensors")):
        with safe_open(f, "pt") as st:
            params[f.parent.name] = sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    row = {"name": d.name, "pipeline": json.loads((d / "model_index.json").read_text())["_class_name"], **card,
           "guidance_scale": default_guidance_scale(d), "parameters": params,
           "size_mb": round(sum(f.stat().st_size for f in d.rglob("*") if f.is_file()) / 2**20, 1)}
    if (d / "eval.json").is_file():
        ev = json.loads((d / "eval.json").read_text())
        splits = ev.get("splits", {})
        row["results"] = {f"{k}_accuracy": v["accuracy"] for k, v in splits.items()}
        if isinstance(ev.get("fd_enl0"), dict):
            row["results"]["fd_enl0"] = ev["fd_enl0"]["value"]
        if "speed" in ev:
            row["results"]["nfe_per_image"] = ev["speed"]["nfe_per_image"]
    return row


def resolve_model(name_or_dir: str | Path) -> Path:
    """A saved pipeline directory, or the name of a shipped model (`shapes-flowar`) -> its directory."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    if str(name_or_dir) in zoo_names():
        return ZOO / str(name_or_dir)
    raise FileNotFoundError(f"model {str(name_or_dir)!r} does not exist: it is neither a directory nor a shipped "
                            f"model ({', '.join(zoo_names())})")


def load_pipeline(model_dir: str | Path):
    """Load any mmgen pipeline from a local directory written by `save_pretrained` (or `save_pipeline`), or a
    shipped model by name. The directory is verified first (`mmgen.safe_save.verify`): a truncated, corrupt or
    missing file raises a ValueError naming it before torch reads anything."""
    model_dir = resolve_model(model_dir)
    index = model_dir / "model_index.json"
    if not index.is_file():
        raise FileNotFoundError(f"{str(model_dir)!r} is not a saved pipeline: it has no model_index.json")
    verify(model_dir)
    name = json.loads(index.read_text()).get("_class_name")
    if name not in PIPELINES:
        raise ValueError(f"{str(index)!r} names pipeline {name!r}; accepted: {', '.join(PIPELINES)}")
    return PIPELINES[name].from_pretrained(str(model_dir))


__all__ = ["ARPipelineOutput", "FlowARPipeline", "NextScalePipeline", "NextTokenPipeline", "NextXPipeline",
           "PARADIGMS", "PIPELINES", "RasterFlowPipeline", "ZOO", "default_guidance_scale", "get_paradigm",
           "load_pipeline", "paradigm_name", "resolve_model", "save_pipeline", "verify", "zoo_card", "zoo_names"]
