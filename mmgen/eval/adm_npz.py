"""ADM's sample-batch format (Dhariwal & Nichol, 2021, `guided-diffusion/evaluations`): an `.npz` whose `arr_0`
holds uint8 images (N, H, W, 3), `arr_1` the class labels of class-conditional samples, and, in ADM's reference
batches, `mu` / `sigma` (Inception pool statistics of the reference images).

Images are read and written in batches, as ADM's evaluator reads them: 50,000 samples at 256 x 256 are 9.8 GB,
more than should sit in memory at once. Files are plain `np.savez` archives (stored, not compressed); compressed
ones read too.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

from mmgen.atomic import atomic_path

IMAGES, LABELS = "arr_0", "arr_1"


def _read_header(f) -> tuple[tuple[int, ...], bool, np.dtype]:
    major, _ = np.lib.format.read_magic(f)
    read = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    return read(f)


def _zip(path: Path, what: str) -> zipfile.ZipFile:
    if not path.is_file():
        raise FileNotFoundError(f"{what} {str(path)!r} does not exist")
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile:
        raise ValueError(f"{what} {str(path)!r} is not an .npz archive (np.savez), as ADM's sample batches are") \
            from None


def npz_arrays(path: str | Path, what: str = "npz") -> dict[str, tuple[tuple[int, ...], np.dtype]]:
    """{key: (shape, dtype)} of every array in the archive, read from the headers only."""
    path = Path(path)
    out = {}
    with _zip(path, what) as zf:
        for name in zf.namelist():
            if name.endswith(".npy"):
                with zf.open(name) as f:
                    try:
                        shape, _, dtype = _read_header(f)
                    except ValueError as e:
                        raise ValueError(f"{what} {str(path)!r}: {name} is not a readable .npy array ({e})") \
                            from None
                out[name[:-4]] = (shape, dtype)
    return out


def image_shape(path: str | Path, what: str = "npz") -> tuple[int, int, int, int]:
    """(N, H, W, 3) of the archive's images, checked to be ADM's layout."""
    arrays = npz_arrays(path, what)
    if IMAGES not in arrays:
        raise ValueError(f"{what} {str(path)!r} has no {IMAGES} (arrays: {', '.join(sorted(arrays)) or 'none'}); "
                         f"accepted: an ADM sample batch with {IMAGES} = uint8 images (N, H, W, 3)")
    shape, dtype = arrays[IMAGES]
    if dtype != np.uint8 or len(shape) != 4 or shape[3] != 3 or 0 in shape:
        raise ValueError(f"{what} {str(path)!r}: {IMAGES} must be uint8 images (N, H, W, 3) with N >= 1, as in "
                         f"ADM's sample batches; got {dtype} {tuple(shape)}")
    return tuple(shape)


def iter_images(path: str | Path, batch_size: int, what: str = "npz") -> Iterator[np.ndarray]:
    """The archive's images in order, `batch_size` at a time, each batch uint8 (b, H, W, 3)."""
    path = Path(path)
    n, h, w, c = image_shape(path, what)
    row = h * w * c
    with _zip(path, what) as zf, zf.open(IMAGES + ".npy") as f:
        _, fortran, _ = _read_header(f)
        if fortran:
            raise ValueError(f"{what} {str(path)!r}: {IMAGES} is stored in Fortran order; save it C-contiguous "
                             f"(np.ascontiguousarray) as np.savez does by default")
        for start in range(0, n, batch_size):
            b = min(batch_size, n - start)
            buf = f.read(b * row)
            if len(buf) != b * row:
                raise ValueError(f"{what} {str(path)!r}: {IMAGES} is truncated at image {start + len(buf) // row}")
            yield np.frombuffer(buf, np.uint8).reshape(b, h, w, c)


def read_array(path: str | Path, key: str, what: str = "npz") -> np.ndarray:
    """One (small) array of the archive, e.g. `mu`, `sigma` or `arr_1`; pickled objects are refused."""
    with np.load(path, allow_pickle=False) as data:
        if key not in data.files:
            raise ValueError(f"{what} {str(path)!r} has no array {key!r} (arrays: {', '.join(data.files)})")
        return data[key]


def write_npz(path: str | Path, shape: tuple[int, int, int, int], batches: Iterable[np.ndarray],
              extra: dict[str, np.ndarray] | None = None) -> None:
    """Write an ADM batch: `arr_0` of `shape` streamed from uint8 `batches` (in order), then the `extra` arrays
    (e.g. {"arr_1": labels}). Written under a temporary name and renamed: a failure (too few or too many images)
    leaves no file."""
    shape = tuple(int(s) for s in shape)
    header = {"descr": np.lib.format.dtype_to_descr(np.dtype(np.uint8)), "fortran_order": False, "shape": shape}
    with atomic_path(path) as tmp:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open(IMAGES + ".npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, header)
                written = 0
                for batch in batches:
                    batch = np.ascontiguousarray(batch)
                    if batch.dtype != np.uint8 or batch.shape[1:] != shape[1:]:
                        raise ValueError(f"image batch must be uint8 (b, {', '.join(map(str, shape[1:]))}), got "
                                         f"{batch.dtype} {batch.shape}")
                    written += len(batch)
                    if written > shape[0]:
                        raise ValueError(f"more than the {shape[0]} images announced")
                    f.write(batch.tobytes())
                if written != shape[0]:
                    raise ValueError(f"{written} images written, {shape[0]} announced")
            for key, value in (extra or {}).items():
                with zf.open(key + ".npy", "w", force_zip64=True) as f:
                    np.lib.format.write_array(f, np.asarray(value), allow_pickle=False)
