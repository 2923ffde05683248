"""The shipped models: `mmgen/zoo/<name>/` are saved pipeline directories (diffusers layout, float16 weights, a
card, checksums, an eval.json); this module is the one place that knows where they are and what they are called.

`DEFAULT_MODEL` is what `mmgen generate`, `bench`, `serve` and `watermark detect` use without `--model`;
`resolve_model` turns a name or a directory into a directory (`mmgen.pipelines.load_pipeline` calls it, so it
loads shipped models by name); `default_guidance_scale` and `zoo_card` read a model without loading it. Nothing
here imports a pipeline: the zoo sits below them.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from safetensors import safe_open

from mmgen.safe_save import pipeline_class_name
from mmgen.sampling.config import DEFAULT_GUIDANCE_SCALE

ZOO_DIR = Path(__file__).resolve().parent
DEFAULT_MODEL_NAME = "shapes-emoji"
DEFAULT_MODEL = ZOO_DIR / DEFAULT_MODEL_NAME


def model_mb(directory: Path) -> float:
    """What loading a model reads: every file of its directory, shared ones included (see `zoo_mb`)."""
    return sum(f.stat().st_size for f in directory.rglob("*") if f.is_file()) / 2**20


def zoo_mb(zoo: Path | None = None) -> float:
    """What the zoo stores: each distinct file once. A component that two models ship byte for byte (one
    tokenizer under two decoders) is kept in one model's directory and linked from the other's
    (`scripts/package_zoo.py`)."""
    files = {f.resolve() for d in zoo_models(zoo).values() for f in d.rglob("*") if f.is_file()}
    return sum(f.stat().st_size for f in files) / 2**20


def zoo_models(zoo: Path | None = None) -> dict[str, Path]:
    """The shipped models (or those of another zoo directory): name -> directory, by name."""
    return {d.name: d for d in sorted((zoo or ZOO_DIR).iterdir()) if (d / "model_index.json").is_file()}


def zoo_names() -> list[str]:
    """The shipped models, by name."""
    return list(zoo_models())


def resolve_model(name_or_dir: str | Path) -> Path:
    """A saved pipeline directory, or the name of a shipped model (`shapes-flowar`) -> its directory."""
    path = Path(name_or_dir)
    if path.is_dir():
        return path
    models = zoo_models()
    if str(name_or_dir) in models:
        return models[str(name_or_dir)]
    raise FileNotFoundError(f"model {str(name_or_dir)!r} does not exist: it is neither a directory nor a shipped "
                            f"model ({', '.join(models)})")


def default_guidance_scale(directory: str | Path) -> float:
    """A saved pipeline's own guidance scale (`default_guidance_scale` in its model_index.json; the pipelines'
    `DEFAULT_GUIDANCE_SCALE` where it sets none), read without loading the model."""
    index = json.loads((Path(directory) / "model_index.json").read_text())
    return float(index.get("default_guidance_scale", DEFAULT_GUIDANCE_SCALE))


def conditioning_kind(index: dict) -> str:
    """A saved pipeline's conditioning kind from its model_index.json (`mmgen.conditioning`; none saved: caption)."""
    return (index.get("conditioning") or {}).get("kind", "caption")


def zoo_card(name: str) -> dict:
    """What `mmgen models` shows of a shipped model: its card (paradigm, data, training commands), pipeline
    class, conditioning kind, size (`model_mb`), parameter counts (read from the safetensors headers, nothing loaded)
    and headline results from its eval.json (held-out / train compositional accuracy, FD-ENL0, decoder passes per image)."""
    d = resolve_model(name)
    card = json.loads((d / "card.json").read_text()) if (d / "card.json").is_file() else {}
    params = {}
    for f in sorted(d.glob("*/*.safetensors")):
        with safe_open(f, "pt") as st:
            params[f.parent.name] = sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
    index = json.loads((d / "model_index.json").read_text())
    row = {"name": d.name, "pipeline": pipeline_class_name(index), **card, "conditioning": conditioning_kind(index),
           "guidance_scale": default_guidance_scale(d), "parameters": params,
           "size_mb": round(model_mb(d), 1)}
    if (d / "eval.json").is_file():
        ev = json.loads((d / "eval.json").read_text())
        splits = ev.get("splits", {})
        row["results"] = {f"{k}_accuracy": v["accuracy"] for k, v in splits.items()}
        if isinstance(ev.get("fd_enl0"), dict):
            row["results"]["fd_enl0"] = ev["fd_enl0"]["value"]
        if "speed" in ev:
            row["results"]["nfe_per_image"] = ev["speed"]["nfe_per_image"]
    return row


__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_NAME", "ZOO_DIR", "conditioning_kind", "default_guidance_scale", "resolve_model", "zoo_card", "zoo_models", "zoo_names"]
