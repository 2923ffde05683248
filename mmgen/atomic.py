"""Write-to-a-temporary-name-then-rename, the one way mmgen writes a file that a reader may open at any time
(configs, logs, caches, images, checkpoints): a crash leaves the old file or the new one, never half of one.
`atomic_dir` does the same for a directory written as a whole (a saved model)."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """A fresh temporary path beside `path` (same directory, same suffix, so writers that pick a format from the
    suffix still work); renamed onto `path` when the block ends, removed if it raises."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    tmp = Path(tmp)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextmanager
def atomic_dir(path: str | Path) -> Iterator[Path]:
    """A fresh empty directory beside `path` to fill (a saved model, say); when the block ends it takes the place
    of `path`, an existing `path` being moved aside first and deleted after. If the block or the swap fails, the
    new directory is removed and `path` is left as it was. Made by a plain mkdir, so it has the usual permissions."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        new = work / "new"
        new.mkdir()
        yield new
        if path.exists():
            old = work / "old"
            os.replace(path, old)
            try:
                os.replace(new, path)
            except BaseException:
                os.replace(old, path)
                raise
        else:
            os.replace(new, path)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def write_text_atomic(path: str | Path, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def write_json_atomic(path: str | Path, obj, indent: int | None = 2) -> None:
    write_text_atomic(path, json.dumps(obj, indent=indent))


def save_file_atomic(tensors: dict, path: str | Path, metadata: dict | None = None) -> None:
    """`safetensors.torch.save_file`, written under a temporary name and renamed."""
    from safetensors.torch import save_file

    with atomic_path(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)
