"""Saved pipelines that are written atomically and checked before loading.

`save_pipeline` writes a pipeline with its own `save_pretrained` into a temporary directory beside the target,
records the sha256 and size of every file the loader reads in `checksums.json`, and only then renames the
directory into place, so a killed save never leaves a half-written model where a model was. `verify` checks
a saved directory before torch or diffusers open anything: every JSON file parses, every safetensors file is
structurally whole (its header parses and its tensors end where the file ends), and, where `checksums.json`
exists, every listed file is present with the recorded size and digest. Older directories without
`checksums.json` still load, with the structural checks only. The same idea as the training checkpoints in
`mmgen.training.checkpoint`, applied to diffusers-layout model directories.

    python -m mmgen.safe_save write mmgen/zoo/*     # (re)write checksums.json after editing a saved model
    python -m mmgen.safe_save verify mmgen/zoo/*
"""

from __future__ import annotations

import argparse
import hashlib
import json
import struct
import sys
from pathlib import Path

from mmgen.atomic import atomic_dir, write_text_atomic
from tokenizers_vis.shared import SHARED_FILE, shared_files, shared_source

CHECKSUM_FILE = "checksums.json"
# measurements and descriptions recorded beside a model after it was saved (mmgen eval, train_tokenizer.py,
# package_zoo.py); the loader never reads them, so updating them must not invalidate the model
RESULT_FILES = frozenset({"eval.json", "metrics.json", "card.json"})
CARD_FILE = "card.json"  # a zoo model's description (paradigm, data, training commands) for `mmgen models`


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints and saved pipelines both record it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _model_files(model_dir: Path) -> list[Path]:
    """The files a checksum covers: all of them except results and the checksum file itself."""
    return sorted(p for p in model_dir.rglob("*")
                  if p.is_file() and p.name != CHECKSUM_FILE and p.name not in RESULT_FILES)


def write_checksums(model_dir: str | Path) -> dict:
    """Record sha256 and size of every model file in `model_dir/checksums.json`; returns the written table."""
    model_dir = Path(model_dir)
    if not (model_dir / "model_index.json").is_file():
        raise ValueError(f"{str(model_dir)!r} is not a saved pipeline: it has no model_index.json")
    table = {"algorithm": "sha256",
             "files": {p.relative_to(model_dir).as_posix(): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
                       for p in _model_files(model_dir)}}
    write_text_atomic(model_dir / CHECKSUM_FILE, json.dumps(table, indent=1, sort_keys=True) + "\n")
    return table


def save_pipeline(pipe, save_directory: str | Path, **save_kwargs) -> Path:
    """`pipe.save_pretrained(save_directory)`, atomically and with `checksums.json` (`mmgen.atomic.atomic_dir`:
    saved beside the target, swapped in when complete; if saving fails the target is left as it was)."""
    target = Path(save_directory)
    with atomic_dir(target) as tmp:
        pipe.save_pretrained(tmp, **save_kwargs)
        write_checksums(tmp)
    return target


def _check_json(path: Path) -> None:
    try:
        json.loads(path.read_bytes())
    except json.JSONDecodeError as e:
        raise ValueError(f"model file {str(path)!r} is not valid JSON ({e.msg} at line {e.lineno} column "
                         f"{e.colno}); the file is truncated or corrupt") from None
    except UnicodeDecodeError:
        raise ValueError(f"model file {str(path)!r} is not valid JSON (not UTF-8 text); the file is corrupt") from None


def _check_safetensors(path: Path) -> None:
    """The safetensors layout: 8-byte little-endian header length, a JSON header, then the tensor bytes,
    which the header's data_offsets must cover exactly up to the end of the file."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise ValueError(f"model file {str(path)!r} is truncated: {size} bytes, shorter than a safetensors "
                             f"header")
        (header_len,) = struct.unpack("<Q", head)
        if 8 + header_len > size:
            raise ValueError(f"model file {str(path)!r} is truncated or corrupt: its header claims {header_len} "
                             f"bytes but the file has {size}")
        try:
            header = json.loads(f.read(header_len))
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ValueError(f"model file {str(path)!r} is corrupt: its safetensors header is not JSON") from None
    if not isinstance(header, dict):
        raise ValueError(f"model file {str(path)!r} is corrupt: its safetensors header is not a mapping")
    ends = [v["data_offsets"][1] for k, v in header.items()
            if k != "__metadata__" and isinstance(v, dict) and len(v.get("data_offsets", ())) == 2]
    expected = 8 + header_len + max(ends, default=0)
    if expected != size:
        what = "truncated" if size < expected else "corrupt"
        raise ValueError(f"model file {str(path)!r} is {what}: its tensors need {expected} bytes, the file has {size}")


def verify(model_dir: str | Path) -> dict:
    """Check a saved pipeline directory before loading it; raises `ValueError` naming the bad file and what is
    wrong with it. Returns {"checksums": whether checksums.json was present, "files": files checked}."""
    model_dir = Path(model_dir)
    sums_path = model_dir / CHECKSUM_FILE
    listed = {}
    if sums_path.is_file():
        _check_json(sums_path)
        sums = json.loads(sums_path.read_text())
        listed = sums.get("files") if isinstance(sums, dict) else None
        if not isinstance(listed, dict) or sums.get("algorithm") != "sha256" or not all(
                isinstance(e, dict) and {"sha256", "bytes"} <= set(e) for e in listed.values()):
            raise ValueError(f"{str(sums_path)!r} is not an mmgen checksum table (expected 'algorithm': 'sha256' "
                             f"and 'files' mapping each path to its 'sha256' and 'bytes')")
        for rel, entry in listed.items():
            path = model_dir / rel
            if not path.is_file():
                raise ValueError(f"model file {str(path)!r} is missing (listed in {CHECKSUM_FILE})")
            size = path.stat().st_size
            if size != entry["bytes"]:
                what = "truncated" if size < entry["bytes"] else "corrupt"
                raise ValueError(f"model file {str(path)!r} is {what}: {size} bytes, {CHECKSUM_FILE} records "
                                 f"{entry['bytes']}")
            if file_sha256(path) != entry["sha256"]:
                raise ValueError(f"model file {str(path)!r} is corrupt: its sha256 differs from {CHECKSUM_FILE} "
                                 f"(if you edited the model on purpose, rerun `python -m mmgen.safe_save write "
                                 f"{model_dir}`)")
    files = _model_files(model_dir)
    for path in files:  # also catches damage in older directories that have no checksum table
        if path.suffix == ".json":
            _check_json(path)
        elif path.suffix == ".safetensors":
            _check_safetensors(path)
    index = json.loads((model_dir / "model_index.json").read_text()) if (model_dir / "model_index.json").is_file() \
        else {}
    for name, spec in index.items():
        if not name.startswith("_") and isinstance(spec, list) and None not in spec \
                and not (model_dir / name).is_dir():
            raise ValueError(f"model component {str(model_dir / name)!r} is missing (named in model_index.json)")
        if not name.startswith("_") and (model_dir / name / SHARED_FILE).is_file():
            _verify_shared(model_dir / name)
    return {"checksums": bool(listed), "files": len(files)}


def _verify_shared(component: Path) -> None:
    """The files a component reads from the one it shares (`tokenizers_vis.shared`): present, with the size and digest
    its shared.json records, and structurally whole."""
    source = shared_source(component)
    for name, entry in shared_files(component).items():
        path = source / name
        if path.stat().st_size != entry.get("bytes") or file_sha256(path) != entry.get("sha256"):
            raise ValueError(f"model file {str(path)!r}, shared by {str(component / SHARED_FILE)!r}, is not the file "
                             f"it records ({entry.get('bytes')} bytes, sha256 {entry.get('sha256')}): the model it is "
                             f"shared from changed; package this one again")
        if path.suffix == ".safetensors":
            _check_safetensors(path)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mmgen.safe_save",
                                     description="Write or verify checksums.json of saved pipeline directories.")
    parser.add_argument("action", choices=("write", "verify"))
    parser.add_argument("dirs", nargs="+", metavar="DIR", help="saved pipeline directories")
    args = parser.parse_args(argv)
    for d in args.dirs:
        try:
            if args.action == "write":
                print(f"{d}: {len(write_checksums(d)['files'])} files")
            else:
                print(f"{d}: ok {verify(d)}")
        except ValueError as e:
            parser.exit(2, f"{parser.prog}: error: {e}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())

def pipeline_class_name(index: dict) -> str | None:
    """The pipeline class a model_index.json names (`"Class"`, or `["pipeline", "Class"]` as mmgen saves it)."""
    name = index.get("_class_name")
    return name[1] if isinstance(name, list) and len(name) == 2 else name
