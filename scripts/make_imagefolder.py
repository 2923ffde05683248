"""Write real labelled images as an ImageNet-style class folder for class-conditional training.

    python scripts/make_imagefolder.py --source fashion_mnist --out data/fashion-folder --per-class 500
    python scripts/make_imagefolder.py --source emoji --out data/emoji-folder          # Twemoji categories
    python scripts/train_generator.py --config configs/generator_shapes.yaml data.name=imagefolder \
        data.root=data/fashion-folder condition.kind=class

Fashion-MNIST comes from the Debian package, Twemoji from the npm package (`bash scripts/install_data.sh`).
`--split test` writes `<out>/val`. See `mmgen.data.labelled`.
"""

from __future__ import annotations

import argparse
import json

from mmgen.data.labelled import SOURCES, write_class_folder
from mmgen.options import positive_int


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--source", choices=SOURCES, required=True, help="labelled data to write")
    parser.add_argument("--out", required=True, help="folder root; images go to <out>/train/<class>/ (or val)")
    parser.add_argument("--split", choices=("train", "test"), default="train")
    parser.add_argument("--per-class", type=positive_int("--per-class"), default=None,
                        help="at most this many images per class, a seeded random choice (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        counts = write_class_folder(args.source, args.out, args.split, args.per_class, args.seed)
    except (ValueError, FileNotFoundError) as e:
        parser.exit(2, f"make_imagefolder: error: {e}\n")
    print(json.dumps({"out": args.out, "split": args.split, "images": sum(counts.values()), "classes": counts}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
