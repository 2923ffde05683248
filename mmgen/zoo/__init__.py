"""The shipped models: `mmgen/zoo/<name>/` are saved pipeline directories (diffusers layout, float16 weights, a
card, checksums, an eval.json); this module is the one place that knows where they are and what they are called.

Where they are (`find_zoo`): beside this module in a source checkout or an editable install; installed from
wheels, in the `mmgen_zoo` package of the separate `mmgen-zoo` distribution (built from the same files by
`zoo/pyproject.toml`), since mmgen's own wheel leaves the weights out to stay far under PyPI's 100 MB limit.

`DEFAULT_MODEL` is what `mmgen generate`, `bench`, `serve` and `watermark detect` use without `--model`;
`resolve_model` turns a name or a directory into a directory (`mmgen.pipelines.load_pipeline` calls it, so it
loads shipped models by name); `default_guidance_scale` and `zoo_card` read a model without loading it. Nothing
here imports a pipeline: the zoo sits below them.
"""

from __future__ import annotations

import importlib.util
import json
import math
from pathlib import Path

from safetensors import safe_open

from mmgen.safe_save import pipeline_class_name
from mmgen.sampling.config import DEFAULT_GUIDANCE_SCALE
from tokenizers_vis.shared import shared_files, shared_source

ZOO_PACKAGE = "mmgen_zoo"  # the import name of the mmgen-zoo distribution (zoo/pyproject.toml)
ZOO_INSTALL_HINT = "pip install mmgen-zoo (or: pip install 'mmgen[zoo]')"


def zoo_models(zoo: Path | None = None) -> dict[str, Path]:
    """The shipped models (or those of another zoo directory): name -> directory, by name."""
    zoo = zoo or ZOO_DIR
    return {d.name: d for d in sorted(zoo.iterdir()) if (d / "model_index.json").is_file()} if zoo.is_dir() else {}


def find_zoo(here: Path | None = None) -> Path:
    """The directory holding the shipped models: `here` (this module's directory, `mmgen/zoo`) when it holds any, as
    in a source checkout or editable install; else the installed `mmgen_zoo` package's directory (found without
    importing it); else `here`, empty, and `resolve_model` names the distribution to install."""
    here = here or Path(__file__).resolve().parent
    if zoo_models(here):
        return here
    spec = importlib.util.find_spec(ZOO_PACKAGE)
    for location in (spec.submodule_search_locations or []) if spec is not None else []:
        if zoo_models(Path(location)):
            return Path(location).resolve()
    return here


ZOO_DIR = find_zoo()
DEFAULT_MODEL_NAME = "shapes-emoji"
DEFAULT_MODEL = ZOO_DIR / DEFAULT_MODEL_NAME


def model_files(directory: Path) -> set[Path]:
    """Every file loading a model reads, resolved: its own, and those its components share from another model's
    directory (a component's shared.json, `tokenizers_vis.shared`)."""
    files = {f.resolve() for f in directory.rglob("*") if f.is_file()}
    for component in (d for d in directory.iterdir() if d.is_dir()):
        source = shared_source(component)
        files |= {(source / name).resolve() for name in shared_files(component)} if source is not None else set()
    return files


def model_mb(directory: Path) -> float:
    """What loading a model reads: every file of its directory, shared ones included (see `zoo_mb`)."""
    return sum(f.stat().st_size for f in model_files(directory)) / 2**20


def zoo_mb(zoo: Path | None = None) -> float:
    """What the zoo stores: each distinct file once. A component that two models ship byte for byte (one
    tokenizer under two decoders) is stored in one model's directory and named by the other's shared.json
    (`scripts/package_zoo.py`)."""
    files = {f for d in zoo_models(zoo).values() for f in model_files(d)}
    return sum(f.stat().st_size for f in files) / 2**20


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
    if not models:
        raise FileNotFoundError(f"model {str(name_or_dir)!r} is not a directory, and no shipped models are installed "
                                f"(neither {ZOO_DIR} nor an {ZOO_PACKAGE} package holds any): {ZOO_INSTALL_HINT}")
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
    for component in sorted(c for c in d.iterdir() if c.is_dir()):
        source = shared_source(component) or component
        for f in sorted(source.glob("*.safetensors")):
            with safe_open(f, "pt") as st:
                params[component.name] = sum(math.prod(st.get_slice(k).get_shape()) for k in st.keys())
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


__all__ = ["DEFAULT_MODEL", "DEFAULT_MODEL_NAME", "ZOO_DIR", "ZOO_PACKAGE", "conditioning_kind", "default_guidance_scale",
           "find_zoo", "model_files", "resolve_model", "zoo_card", "zoo_models", "zoo_names"]
