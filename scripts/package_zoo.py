"""Package a trained pipeline as a shipped zoo model: weights stored as float16, a model card, checksums.

    python scripts/package_zoo.py --pipeline runs/shuffle_s2/pipeline --name shapes-shuffle \
        --paradigm token_shuffle --data shapes --train "python scripts/train_generator.py --config ..."

Float16 storage halves the size, which is what lets one checkpoint per paradigm fit the zoo's 100 MB (25 MB
each); diffusers casts the weights back to each model's float32 parameters when the pipeline loads, so the
shipped model computes in float32 from float16-rounded weights. Its `eval.json` must be measured on the
packaged model (`mmgen eval --model <name> --out mmgen/zoo/<name>/eval.json`), not copied from the run.
The directory is assembled under a temporary name and renamed into place.

A tokenizer component that another zoo model already ships byte for byte, config and weights (a decoder trained on
the default model's tokenizer), is stored once: the new model's component directory keeps its config.json and a
shared.json naming the other's directory and the digests of the files it reads there (`tokenizers_vis.shared`), in
place of the weights. A reference, not a symbolic link: wheels hold no links and would store a linked file twice.
Components whose class cannot follow a reference (`SharedComponentMixin`: the tokenizers) keep their own files.
A model's size (`MAX_MODEL_MB`) counts what loading it reads, shared files included; the zoo's (`MAX_ZOO_MB`)
counts each distinct file once (`mmgen.zoo.zoo_mb`).
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from mmgen.atomic import atomic_dir
from mmgen.safe_save import CARD_FILE, file_sha256, verify, write_checksums
from mmgen.zoo import ZOO_DIR, model_files, model_mb, zoo_models
from tokenizers_vis.shared import SHARED_FILE, SharedComponentMixin

MAX_MODEL_MB, MAX_ZOO_MB = 25, 100


def shipped_weights(zoo: Path, exclude: str) -> dict[str, Path]:
    """sha256 -> a weights file stored (not shared from elsewhere) in another zoo model."""
    return {file_sha256(f): f for n, d in zoo_models(zoo).items() if n != exclude for f in d.rglob("*.safetensors")}


def other_files(zoo: Path, name: str) -> dict[Path, Path]:
    """Every file the other zoo models read (resolved path -> the model directory that reads it)."""
    return {f: d for n, d in zoo_models(zoo).items() if n != name for f in model_files(d)}


def check_shared_kept(tmp: Path, target: Path, zoo: Path) -> None:
    """A file of `target` that another model shares must stay, byte for byte, in the new `target`."""
    if not target.is_dir():
        return
    root = target.resolve()
    for resolved, reader in other_files(zoo, target.name).items():
        if root in resolved.parents:
            rel = resolved.relative_to(root)
            if not (tmp / rel).is_file() or file_sha256(tmp / rel) != file_sha256(resolved):
                raise ValueError(f"{reader.name} shares {target.name}/{rel}, which the new {target.name} would not "
                                 f"keep as it is; package {reader.name} again after it")


def follows_references(tmp: Path, component: str) -> bool:
    """Whether the class model_index.json names for `component` loads through a shared.json."""
    spec = json.loads((tmp / "model_index.json").read_text()).get(component)
    try:
        cls = getattr(importlib.import_module(spec[0]), spec[1])
    except (ImportError, AttributeError, TypeError, IndexError):
        return False
    return isinstance(cls, type) and issubclass(cls, SharedComponentMixin)


def share_duplicates(tmp: Path, target: Path, zoo: Path) -> list[str]:
    """Replace each weights file of `tmp` (to become `target`) that another zoo model ships byte for byte, in a
    component directory with the same config.json and a class that follows references, with that component's
    shared.json naming the other directory as seen from `target`. Returns the shared paths (relative to `tmp`)."""
    shipped, shared = shipped_weights(zoo, target.name), []
    for f in sorted(tmp.rglob("*.safetensors")):
        other = shipped.get(file_sha256(f))
        component = f.parent
        if other is None or component.parent != tmp or not follows_references(tmp, component.name) \
                or file_sha256(component / "config.json") != file_sha256(other.parent / "config.json"):
            continue
        rel = f.relative_to(tmp)
        entry = {"from": os.path.relpath(other.parent, target / component.name).replace(os.sep, "/"),
                 "files": {f.name: {"sha256": file_sha256(f), "bytes": f.stat().st_size}}}
        f.unlink()
        (component / SHARED_FILE).write_text(json.dumps(entry, indent=1) + "\n")
        shared.append(str(rel))
    return shared


def package(pipeline: Path, name: str, card: dict, zoo: Path = ZOO_DIR) -> Path:
    if not (pipeline / "model_index.json").is_file():
        raise ValueError(f"--pipeline {str(pipeline)!r} is not a saved pipeline (no model_index.json)")
    target = zoo / name
    with atomic_dir(target) as tmp:
        shutil.copytree(pipeline, tmp, ignore=shutil.ignore_patterns("checksums.json", "eval.json"),
                        dirs_exist_ok=True)
        for f in tmp.rglob("*.safetensors"):
            tensors = load_file(f)
            save_file({k: v.half() if v.is_floating_point() else v for k, v in tensors.items()}, f)
        (tmp / CARD_FILE).write_text(json.dumps({**card, "weights": "float16"}, indent=1) + "\n")
        size = model_mb(tmp)
        if size > MAX_MODEL_MB:
            raise ValueError(f"{name}: {size:.1f} MB packaged, over the {MAX_MODEL_MB} MB a zoo model may take")
        write_checksums(tmp)
        verify(tmp)
        check_shared_kept(tmp, target, zoo)
        shared = share_duplicates(tmp, target, zoo)  # references that resolve once tmp is renamed to target
        if shared:
            write_checksums(tmp)  # the shared weights are no longer files of this directory
        new = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file()) / 2**20
        root = target.resolve()
        others = sum(f.stat().st_size for f in other_files(zoo, name) if root not in f.parents) / 2**20
        if others + new > MAX_ZOO_MB:
            raise ValueError(f"the zoo would hold {others + new:.1f} MB with {name}, over {MAX_ZOO_MB} MB")
    verify(target)
    if shared:
        print(f"{name}: shares {', '.join(shared)} with another zoo model ({SHARED_FILE}, stored once)")
    return target


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pipeline", type=Path, required=True, help="saved pipeline directory of a training run")
    p.add_argument("--name", required=True, help="zoo name, e.g. shapes-shuffle")
    p.add_argument("--paradigm", required=True, help="next_token, token_shuffle, seed, next_scale, flowar, flow_head, "
                                                     "next_x")
    p.add_argument("--data", default="shapes", help="the data it was trained on (a data.name of the scripts)")
    p.add_argument("--description", default="", help="one line for `mmgen models`")
    p.add_argument("--train", action="append", default=[], help="a command that trains it (repeat, in order)")
    args = p.parse_args(argv)
    try:
        out = package(args.pipeline, args.name, {"paradigm": args.paradigm, "data": args.data,
                                                 "description": args.description, "train": args.train})
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"packaged {out} ({model_mb(out):.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
