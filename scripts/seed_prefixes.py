"""Decode held-out images from growing prefixes of their SEED tokens: the causality figure and numbers.

    python scripts/seed_prefixes.py --tokenizer runs/seed_stage2/final --out docs/seed_prefixes.png --json

Each row is one held-out shapes image: the original, then the decodes from its first k tokens for each k in
`--prefixes`. Later tokens are never read for a prefix (`SEEDTokenizer.decode_prefix`), so the row shows what
the first k tokens of a 1-D causal sequence already say about the image. With --json, the held-out PSNR of
each prefix length over `--images` images.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from mmgen.atomic import atomic_path
from mmgen.data.shapes import ShapesDataset
from mmgen.eval.image_metrics import psnr
from tokenizers_vis.seed import SEEDTokenizer


def to_pil(x_3HW: torch.Tensor) -> Image.Image:
    return Image.fromarray(((x_3HW.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


@torch.no_grad()  # a decorator, not set_grad_enabled(False): main() is also called in-process (tests)
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="a saved SEEDTokenizer directory (stage 2)")
    p.add_argument("--out", default=None, help="PNG grid to write (rows: images; columns: original, prefixes)")
    p.add_argument("--prefixes", type=int, nargs="+", default=None, help="prefix lengths (default N/8 ... N)")
    p.add_argument("--rows", type=int, default=6, help="images in the figure")
    p.add_argument("--images", type=int, default=256, help="held-out images for the PSNR per prefix")
    p.add_argument("--json", action="store_true", help="print PSNR per prefix length as JSON")
    args = p.parse_args(argv)

    tok = SEEDTokenizer.from_pretrained(args.tokenizer).eval()
    N = tok.num_tokens
    prefixes = args.prefixes or sorted({max(1, N // 8), max(1, N // 4), max(1, N // 2), N})
    bad = [k for k in prefixes if not 1 <= k <= N]
    if bad:
        p.error(f"--prefixes must lie in [1, {N}] (the tokenizer's tokens); got {bad}")
    data = ShapesDataset("heldout", size=max(args.images, args.rows), seed=0, image_size=tok.config.image_size)
    images = torch.stack([data[i]["image"] for i in range(max(args.images, args.rows))])
    ids = torch.cat([tok.encode(images[i:i + 64]) for i in range(0, len(images), 64)])
    result = {"tokenizer": args.tokenizer, "tokens": N, "images": args.images, "psnr_by_prefix": {}}
    decodes = {}
    for k in prefixes:
        rec = torch.cat([tok.decode_prefix(ids[i:i + 64], k) for i in range(0, len(ids), 64)])
        decodes[k] = rec[: args.rows]
        result["psnr_by_prefix"][str(k)] = round(psnr(rec[: args.images], images[: args.images]).item(), 3)
    if args.out:
        side = tok.config.image_size
        grid = Image.new("RGB", (side * (len(prefixes) + 1), side * args.rows))
        for r in range(args.rows):
            grid.paste(to_pil(images[r]), (0, r * side))
            for c, k in enumerate(prefixes, 1):
                grid.paste(to_pil(decodes[k][r]), (c * side, r * side))
        out = Path(args.out)
        with atomic_path(out) as tmp:
            grid.save(tmp)
        result["figure"] = str(out)
    print(json.dumps(result, indent=2) if args.json else
          "PSNR by prefix: " + ", ".join(f"{k} tokens {v:.2f} dB" for k, v in result["psnr_by_prefix"].items()))


if __name__ == "__main__":
    main()
