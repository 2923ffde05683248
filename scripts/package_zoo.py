"""Package a trained pipeline as a shipped zoo model: weights stored as float16, a model card, checksums.

    python scripts/package_zoo.py --pipeline runs/shuffle_s2/pipeline --name shapes-shuffle \
        --paradigm token_shuffle --data shapes --train "python scripts/train_generator.py --config ..."

Float16 storage halves the size, which is what lets one checkpoint per paradigm fit the zoo's 100 MB (25 MB
each); diffusers casts the weights back to each model's float32 parameters when the pipeline loads, so the
shipped model computes in float32 from float16-rounded weights. Its `eval.json` must be measured on the
packaged model (`mmgen eval --model <name> --out mmgen/zoo/<name>/eval.json`), not copied from the run.
The directory is assembled under a temporary name and renamed into place.

A weights file that another zoo model already ships byte for byte (a decoder trained on the default model's
tokenizer) is stored once: the new model's file becomes a relative symbolic link to it. A model's size
(`MAX_MODEL_MB`) counts what loading it reads, shared files included; the zoo's (`MAX_ZOO_MB`) counts each
distinct file once (`mmgen.zoo.zoo_mb`).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from mmgen.atomic import atomic_dir
from mmgen.safe_save import CARD_FILE, file_sha256, verify, write_checksums
from mmgen.zoo import ZOO_DIR, model_mb, zoo_models

MAX_MODEL_MB, MAX_ZOO_MB = 25, 100


def shipped_weights(zoo: Path, exclude: str) -> dict[str, Path]:
    """sha256 -> a weights file stored (not linked) in another zoo model."""
    return {file_sha256(f): f for n, d in zoo_models(zoo).items() if n != exclude
            for f in d.rglob("*.safetensors") if not f.is_symlink()}


def other_files(zoo: Path, name: str) -> dict[Path, Path]:
    """Every file the other zoo models read (resolved path -> the path as listed, a link or the file itself)."""
    return {f.resolve(): f for n, d in zoo_models(zoo).items() if n != name for f in d.rglob("*") if f.is_file()}


def check_shared_kept(tmp: Path, target: Path, zoo: Path) -> None:
    """A file of `target` that another model links to must stay, byte for byte, in the new `target`."""
    if not target.is_dir():
        return
    root = target.resolve()
    for resolved, link in other_files(zoo, target.name).items():
        if root in resolved.parents:
            rel = resolved.relative_to(root)
            if not (tmp / rel).is_file() or file_sha256(tmp / rel) != file_sha256(resolved):
                raise ValueError(f"{link} links to {target.name}/{rel}, which the new {target.name} would not keep "
                                 f"as it is; package {link.relative_to(zoo).parts[0]} again after it")


def share_duplicates(tmp: Path, target: Path, zoo: Path) -> list[str]:
    """Replace each weights file of `tmp` (to become `target`) that another zoo model ships byte for byte with a
    relative link to that file, written as seen from `target`. Returns the shared paths (relative to `tmp`)."""
    shipped, shared = shipped_weights(zoo, target.name), []
    for f in sorted(tmp.rglob("*.safetensors")):
        other = shipped.get(file_sha256(f))
        if other is not None:
            rel = f.relative_to(tmp)
            f.unlink()
            f.symlink_to(os.path.relpath(other, (target / rel).parent))
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
        shared = share_duplicates(tmp, target, zoo)  # links that resolve once tmp is renamed to target
        new = sum(f.stat().st_size for f in tmp.rglob("*") if f.is_file() and not f.is_symlink()) / 2**20
        root = target.resolve()
        others = sum(f.stat().st_size for f in other_files(zoo, name) if root not in f.parents) / 2**20
        if others + new > MAX_ZOO_MB:
            raise ValueError(f"the zoo would hold {others + new:.1f} MB with {name}, over {MAX_ZOO_MB} MB")
    verify(target)
    if shared:
        print(f"{name}: shares {', '.join(shared)} with another zoo model (linked, stored once)")
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
