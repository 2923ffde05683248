"""A component directory that is another directory's component, byte for byte: stored once, read from there.

Two saved pipelines that use the same tokenizer (a decoder trained on another model's VQGAN) would each hold its
weights. Instead, the second one's component directory keeps its `config.json` and a `shared.json`

    {"from": "../../shapes-emoji/vq_model",
     "files": {"diffusion_pytorch_model.safetensors": {"sha256": "...", "bytes": 7666398}}}

naming the directory (relative to itself) whose files it shares and what they hold; `from_pretrained` of a class
with `SharedComponentMixin` then loads that directory. A reference, not a file-system link: a wheel, a zip or a
copy keeps it as it is, where a link would become a second copy of the weights (wheels hold no links).
`mmgen.safe_save.verify` checks the recorded sizes and digests; `save_pretrained` writes the weights themselves,
so a saved copy stands alone.
"""

from __future__ import annotations

import json
from pathlib import Path

SHARED_FILE = "shared.json"


def shared_source(component_dir: str | Path) -> Path | None:
    """The directory whose files `component_dir` shares (its shared.json's "from"), or None when it holds its own.
    Raises ValueError naming the file when the reference is malformed, points nowhere, or its config differs."""
    component_dir = Path(component_dir)
    ref = component_dir / SHARED_FILE
    if not ref.is_file():
        return None
    entry = json.loads(ref.read_text())
    if not isinstance(entry, dict) or not isinstance(entry.get("from"), str) or not isinstance(entry.get("files"), dict):
        raise ValueError(f"{str(ref)!r} is not a shared-component reference (expected 'from': a directory relative "
                         f"to it, and 'files': each shared file's 'sha256' and 'bytes')")
    source = (component_dir / entry["from"]).resolve()
    for name, info in entry["files"].items():
        if not (source / name).is_file():
            raise ValueError(f"{str(ref)!r} shares {entry['from']}/{name}, which does not exist ({source / name}); "
                             f"the model was moved without the one it shares from: load it from its zoo, or save a "
                             f"standalone copy there with save_pretrained")
    own, theirs = component_dir / "config.json", source / "config.json"
    if own.is_file() and theirs.is_file() and json.loads(own.read_text()) != json.loads(theirs.read_text()):
        raise ValueError(f"{str(ref)!r} shares {entry['from']}, whose config.json differs from {str(own)!r}: a "
                         f"shared component must be the same component")
    return source


def shared_files(component_dir: str | Path) -> dict[str, dict]:
    """name -> {"sha256", "bytes"} of the files `component_dir` reads from its source ({} when none)."""
    ref = Path(component_dir) / SHARED_FILE
    return json.loads(ref.read_text())["files"] if ref.is_file() else {}


class SharedComponentMixin:
    """`from_pretrained` follows a component directory's shared.json to the directory it shares (see the module)."""

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *args, **kwargs):
        local = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        source = shared_source(local) if local.is_dir() else None
        if source is not None:
            kwargs.pop("subfolder", None)
            pretrained_model_name_or_path = str(source)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)


__all__ = ["SHARED_FILE", "SharedComponentMixin", "shared_files", "shared_source"]
