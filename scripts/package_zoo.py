"""Package a trained pipeline as a shipped zoo model: weights stored as float16, a model card, checksums.

    python scripts/package_zoo.py --pipeline runs/shuffle_s2/pipeline --name shapes-shuffle \
        --paradigm token_shuffle --data shapes --train "python scripts/train_generator.py --config ..."

Float16 storage halves the size, which is what lets one checkpoint per paradigm fit the zoo's 100 MB (25 MB
each); diffusers casts the weights back to each model's float32 parameters when the pipeline loads, so the
shipped model computes in float32 from float16-rounded weights. Its `eval.json` must be measured on the
packaged model (`mmgen eval --model <name> --out mmgen/zoo/<name>/eval.json`), not copied from the run.
The directory is assembled under a temporary name and renamed into place.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

from safetensors.torch import load_file, save_file

from mmgen.atomic import atomic_dir
from mmgen.safe_save import CARD_FILE, verify, write_checksums
from mmgen.zoo import ZOO_DIR

MAX_MODEL_MB, MAX_ZOO_MB = 25, 100


def dir_mb(path: Path) -> float:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) / 2**20


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
        size = dir_mb(tmp)
        if size > MAX_MODEL_MB:
            raise ValueError(f"{name}: {size:.1f} MB packaged, over the {MAX_MODEL_MB} MB a zoo model may take")
        others = sum(dir_mb(d) for d in zoo.iterdir()  # the other models (not mmgen.zoo's own __pycache__)
                     if (d / "model_index.json").is_file() and d.name != name)
        if others + size > MAX_ZOO_MB:
            raise ValueError(f"the zoo would hold {others + size:.1f} MB with {name}, over {MAX_ZOO_MB} MB")
        write_checksums(tmp)
        verify(tmp)
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
    print(f"packaged {out} ({dir_mb(out):.1f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
