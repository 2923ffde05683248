"""PEP 517 backend of the mmgen-zoo distribution: a wheel holding `mmgen_zoo/<name>/...` for every model directory
(one with a model_index.json) of the repository's `mmgen/zoo/`, or of `models/` in this distribution's sdist.

It writes the files as they are and refuses what would make the wheel unfit to publish: a symbolic link (a wheel
stores the file it points to, a second copy; share a component with shared.json instead, `tokenizers_vis.shared`),
the same weights stored twice, or a wheel over PyPI's default 100 MB limit. `wheel_files` lists what goes in
without building anything (tests/test_packaging.py).
"""

from __future__ import annotations

import base64
import hashlib
import io
import os
import re
import tarfile
import zipfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACKAGE = "mmgen_zoo"
MAX_WHEEL_BYTES = 100 * 10**6  # PyPI's default file-size limit
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
SKIP = ("__pycache__",)
INIT = '''"""The files of mmgen's shipped models, one saved pipeline directory per model; `mmgen.zoo` finds this directory
(`mmgen.zoo.find_zoo`) without importing anything from it."""
'''


def project() -> dict[str, str]:
    text = (HERE / "pyproject.toml").read_text()
    try:
        import tomllib
        table = tomllib.loads(text)["project"]
    except ImportError:  # Python 3.10: the three plain strings this backend reads
        table = dict(re.findall(r'^(name|version|description|requires-python) = "([^"]*)"', text, re.M))
    return {k: table[k] for k in ("name", "version", "description", "requires-python")}


def models_dir() -> Path:
    """The repository's mmgen/zoo/ (a checkout), else models/ (this distribution's sdist)."""
    checkout = HERE.parent / "mmgen" / "zoo"
    return checkout if checkout.is_dir() else HERE / "models"


def wheel_files(zoo: Path | None = None) -> list[tuple[str, Path]]:
    """(path in the wheel, file) for every file of every model directory of `zoo`, sorted. Raises ValueError naming
    a symbolic link, or a weights file whose bytes another one already holds."""
    zoo = zoo or models_dir()
    models = sorted(d for d in zoo.iterdir() if d.is_dir() and (d / "model_index.json").is_file())
    if not models:
        raise ValueError(f"{zoo} holds no model directory (none has a model_index.json)")
    out, weights = [], {}
    for model in models:
        for f in sorted(model.rglob("*")):
            if any(part in SKIP for part in f.relative_to(zoo).parts) or f.suffix == ".pyc":
                continue
            if f.is_symlink():
                raise ValueError(f"{f} is a symbolic link: a wheel would store the file it points to a second time; "
                                 f"name the shared component in a shared.json instead (tokenizers_vis.shared)")
            if not f.is_file():
                continue
            if f.suffix in WEIGHT_SUFFIXES:
                digest = hashlib.sha256(f.read_bytes()).hexdigest()
                if digest in weights:
                    raise ValueError(f"{f} holds the same bytes as {weights[digest]}: store it once and name it in "
                                     f"a shared.json (tokenizers_vis.shared)")
                weights[digest] = f
            out.append((f"{PACKAGE}/{f.relative_to(zoo).as_posix()}", f))
    return out


def _dist_info(meta: dict[str, str]) -> dict[str, bytes]:
    name = f"{PACKAGE}-{meta['version']}.dist-info"
    metadata = (f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n"
                f"Summary: {meta['description']}\nLicense: Apache-2.0\nRequires-Python: {meta['requires-python']}\n")
    wheel = "Wheel-Version: 1.0\nGenerator: mmgen zoo_backend\nRoot-Is-Purelib: true\nTag: py3-none-any\n"
    return {f"{name}/METADATA": metadata.encode(), f"{name}/WHEEL": wheel.encode(),
            f"{name}/top_level.txt": f"{PACKAGE}\n".encode()}


def _record_line(arcname: str, data: bytes) -> str:
    digest = base64.urlsafe_b64encode(hashlib.sha256(data).digest()).rstrip(b"=").decode()
    return f"{arcname},sha256={digest},{len(data)}"


def _zip_write(zf: zipfile.ZipFile, arcname: str, data: bytes) -> None:
    info = zipfile.ZipInfo(arcname, date_time=(1980, 1, 1, 0, 0, 0))
    info.external_attr = 0o644 << 16
    info.compress_type = zipfile.ZIP_DEFLATED
    zf.writestr(info, data)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    meta = project()
    filename = f"{PACKAGE}-{meta['version']}-py3-none-any.whl"
    path = Path(wheel_directory) / filename
    records = []
    with zipfile.ZipFile(path, "w") as zf:
        entries = [(f"{PACKAGE}/__init__.py", INIT.encode())]
        for arcname, data in entries:
            _zip_write(zf, arcname, data)
            records.append(_record_line(arcname, data))
        for arcname, f in wheel_files():
            data = f.read_bytes()
            _zip_write(zf, arcname, data)
            records.append(_record_line(arcname, data))
        for arcname, data in _dist_info(meta).items():
            _zip_write(zf, arcname, data)
            records.append(_record_line(arcname, data))
        record = f"{PACKAGE}-{meta['version']}.dist-info/RECORD"
        _zip_write(zf, record, ("\n".join(records + [f"{record},,"]) + "\n").encode())
    if path.stat().st_size > MAX_WHEEL_BYTES:
        size = path.stat().st_size
        path.unlink()
        raise ValueError(f"{filename} would be {size / 1e6:.1f} MB, over PyPI's {MAX_WHEEL_BYTES / 1e6:.0f} MB limit: "
                         f"split the zoo into more distributions or ship fewer models")
    return filename


def prepare_metadata_for_build_wheel(metadata_directory, config_settings=None):
    meta = project()
    for arcname, data in _dist_info(meta).items():
        target = Path(metadata_directory) / arcname
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(data)
    return f"{PACKAGE}-{meta['version']}.dist-info"


def build_sdist(sdist_directory, config_settings=None):
    """pyproject.toml, this file and the model directories (under models/), so the sdist builds the same wheel."""
    meta = project()
    base = f"{PACKAGE}-{meta['version']}"
    filename = f"{base}.tar.gz"
    pkg_info = _dist_info(meta)[f"{PACKAGE}-{meta['version']}.dist-info/METADATA"]
    with tarfile.open(Path(sdist_directory) / filename, "w:gz") as tar:
        def add(arcname: str, data: bytes) -> None:
            info = tarfile.TarInfo(f"{base}/{arcname}")
            info.size, info.mode = len(data), 0o644
            tar.addfile(info, io.BytesIO(data))

        add("PKG-INFO", pkg_info)
        add("pyproject.toml", (HERE / "pyproject.toml").read_bytes())
        add("zoo_backend.py", Path(__file__).read_bytes())
        for arcname, f in wheel_files():
            add("models/" + arcname.removeprefix(f"{PACKAGE}/"), f.read_bytes())
    return filename


def get_requires_for_build_wheel(config_settings=None):
    return []


def get_requires_for_build_sdist(config_settings=None):
    return []


__all__ = ["build_sdist", "build_wheel", "get_requires_for_build_sdist", "get_requires_for_build_wheel",
           "prepare_metadata_for_build_wheel", "wheel_files"]
