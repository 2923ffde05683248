"""Pack a folder of real images into a reference batch in ADM's `.npz` format (`arr_0` uint8 (N, S, S, 3); with
--labels, `arr_1` class ids from ImageNet-style class folders), for `mmgen eval --samples ... --reference`.

    python scripts/images_to_npz.py /data/imagenet/val --size 256 --labels --out ref.npz

Each image is resized and center-cropped to S x S as ADM prepares ImageNet (Dhariwal & Nichol, 2021): halved
with a box filter while its short side is at least 2S, resized bicubically so the short side is S, then the
center S x S is cut. Images are read in sorted path order; class ids number the sorted class folders. For
ImageNet 256 prefer ADM's own `VIRTUAL_imagenet256_labeled.npz`, which is what published numbers use.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from tqdm.auto import tqdm

from mmgen.eval.adm_npz import LABELS, write_npz
from mmgen.options import positive_int

EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".JPEG")


def center_crop(image: Image.Image, size: int) -> np.ndarray:
    """ADM's preparation: box-halve while the short side >= 2 * size, bicubic to short side = size, center crop."""
    image = image.convert("RGB")
    while min(image.size) >= 2 * size:
        image = image.resize((image.width // 2, image.height // 2), Image.Resampling.BOX)
    scale = size / min(image.size)
    image = image.resize((round(image.width * scale), round(image.height * scale)), Image.Resampling.BICUBIC)
    arr = np.asarray(image)
    top, left = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[top:top + size, left:left + size]


def find_images(root: Path, labels: bool) -> tuple[list[Path], list[int] | None, list[str] | None]:
    if not root.is_dir():
        raise FileNotFoundError(f"DIR {str(root)!r} is not a directory")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in EXTENSIONS)
    if not files:
        raise ValueError(f"DIR {str(root)!r} holds no images ({', '.join(sorted(set(e.lower() for e in EXTENSIONS)))})")
    if not labels:
        return files, None, None
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    loose = [p for p in files if len(p.relative_to(root).parts) == 1]
    if loose or not classes:
        raise ValueError(f"--labels needs ImageNet-style class folders DIR/<class>/<image>; {str(root)!r} has "
                         f"{len(loose)} image(s) directly inside it")
    ids = {c: i for i, c in enumerate(classes)}
    return files, [ids[p.relative_to(root).parts[0]] for p in files], classes


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="images_to_npz.py", description=__doc__.split("\n\n")[0],
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]),
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="DIR", help="folder of images (searched recursively)")
    p.add_argument("--out", required=True, help="the .npz to write")
    p.add_argument("--size", type=positive_int("--size"), default=256, help="side S of the square images")
    p.add_argument("--labels", action="store_true", help="class ids from DIR/<class>/ folders as arr_1")
    p.add_argument("--limit", type=positive_int("--limit"), default=None,
                   help="at most this many images, the first in path order")
    p.add_argument("--json", action="store_true", help="print a JSON report")
    args = p.parse_args(argv)
    try:
        out = Path(args.out)
        if out.suffix != ".npz":
            raise ValueError(f"--out must end in .npz (ADM's format), got {str(out)!r}")
        files, labels, classes = find_images(Path(args.dir), args.labels)
        files, labels = files[:args.limit], labels and labels[:args.limit]

        def batches():
            for path in tqdm(files, desc="images", unit="img", disable=args.json):
                try:
                    with Image.open(path) as im:
                        yield center_crop(im, args.size)[None]
                except (UnidentifiedImageError, OSError) as e:
                    raise ValueError(f"DIR: {str(path)!r} is not a readable image ({type(e).__name__})") from None

        write_npz(out, (len(files), args.size, args.size, 3), batches(),
                  {LABELS: np.array(labels, np.int64)} if labels else None)
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"images_to_npz.py: error: {e}\n")
    report = {"out": str(out), "shape": [len(files), args.size, args.size, 3],
              "labels": LABELS if labels else None, "classes": classes}
    print(json.dumps(report, indent=2) if args.json else f"wrote {out}: {report['shape']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
