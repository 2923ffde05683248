"""A labelled grid of samples: one row per model, one column per prompt, the same seed per column.

    python scripts/sample_grid.py --out docs/samples_zoo.png              # every shipped model
    python scripts/sample_grid.py --models shapes-nexttoken runs/x/pipeline --prompts "a red circle" "two stars"

Flow models sample with `--steps` Euler steps; every model uses its pipeline's default guidance. The PNG is
written to a temporary name and renamed.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from PIL import Image, ImageDraw
from tqdm.auto import tqdm

from mmgen.atomic import atomic_path
from mmgen.pipelines.base import generators_from_seed
from mmgen.pipelines import load_pipeline
from mmgen.zoo import zoo_names

PROMPTS = ["a large red circle", "a small blue square in the top left", "two green triangles",
           "a yellow star left of a purple circle", "three orange squares", "a blue circle above a red star"]


def grid(models: list[str], prompts: list[str], seed: int, steps: int, scale: int, label_width: int = 150,
         labels: list[str] | None = None):
    rows = []
    for k, name in enumerate(tqdm(models, desc="models")):
        pipe = load_pipeline(name)
        pipe.set_progress_bar_config(disable=True)
        takes_steps = "num_inference_steps" in pipe.call_options  # flow models
        kw = {"num_inference_steps": steps} if takes_steps else {}
        out = pipe(prompt=prompts, generator=generators_from_seed(seed, len(prompts)), **kw)
        label = labels[k] if labels else Path(name).name if Path(name).is_dir() else name
        rows.append((label, out.images))
    side = rows[0][1][0].size[0] * scale
    canvas = Image.new("RGB", (label_width + side * len(prompts), 14 + side * len(rows)), "white")
    draw = ImageDraw.Draw(canvas)
    for j, p in enumerate(prompts):
        draw.text((label_width + j * side + 2, 1), p[:side // 6], fill="black")
    for i, (name, images) in enumerate(rows):
        draw.text((2, 14 + i * side + side // 2 - 5), name, fill="black")
        for j, img in enumerate(images):
            canvas.paste(img.resize((side, side), Image.NEAREST), (label_width + j * side, 14 + i * side))
    return canvas


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None, help="zoo names or pipeline directories (default: the zoo)")
    p.add_argument("--prompts", nargs="+", default=PROMPTS, help="one column per prompt")
    p.add_argument("--seed", type=int, default=0, help="column j uses seed + j")
    p.add_argument("--steps", type=int, default=25, help="flow models: Euler steps")
    p.add_argument("--scale", type=int, default=2, help="pixel upscaling of each image")
    p.add_argument("--labels", nargs="+", default=None, help="row labels, one per model (default: the names)")
    p.add_argument("--out", type=Path, required=True, help="PNG to write")
    args = p.parse_args(argv)
    if args.labels is not None and (args.models is None or len(args.labels) != len(args.models)):
        p.error(f"--labels needs one label per --models entry: got {len(args.labels)} labels for "
                f"{len(args.models or [])} models")
    if args.out.suffix.lower() != ".png":
        p.error(f"--out must end in .png, got {str(args.out)!r}")
    image = grid(args.models or zoo_names(), args.prompts, args.seed, args.steps, args.scale, labels=args.labels)
    with atomic_path(args.out) as tmp:
        image.save(tmp)
    print(f"wrote {args.out} ({image.size[0]}x{image.size[1]})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
