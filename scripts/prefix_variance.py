"""Explained variance per prefix length of a 1-D causal tokenizer (the PCA-ordered tokenizer, SEED), and its
prefix decodes.

    python scripts/prefix_variance.py --tokenizer runs/pca_shapes/final --json
    python scripts/prefix_variance.py --tokenizer runs/pca_shapes/final --num-tokens 16 --out pca16.png

Held-out images are encoded once and decoded from their first k tokens for each k in `--num-tokens` (default
every k = 1..K; later tokens are never read, `decode_prefix`), each with the tokenizer's fixed default noise.
EV(k) = 1 - sum ||x - x_hat_k||^2 / sum ||x - mean||^2 over the images (the mean image's error is the variance),
and gain(k) = EV(k) - EV(previous k): a PCA-like order explains most with the first tokens, so its gain falls.
`--out` writes a grid: one row per image, the original, then the decode of each prefix.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from PIL import Image

from mmgen.atomic import atomic_path
from mmgen.eval.harness import DATASETS, real_dataset
from mmgen.eval.image_metrics import psnr
from mmgen.eval.tokenizer_metrics import prefix_explained_variance
from tokenizers_vis.protocol import load_tokenizer_component


def to_pil(x_3HW: torch.Tensor) -> Image.Image:
    return Image.fromarray(((x_3HW.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy())


@torch.no_grad()  # a decorator, not set_grad_enabled(False): main() is also called in-process (tests)
def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--tokenizer", required=True, help="a saved 1-D tokenizer directory (PCATokenizer, SEEDTokenizer)")
    p.add_argument("--num-tokens", type=int, nargs="+", default=None, metavar="K",
                   help="prefix lengths to decode from (default: every k = 1..K)")
    p.add_argument("--data", choices=DATASETS, default="shapes", help="held-out images of this data set")
    p.add_argument("--images", type=int, default=64, help="held-out images for the explained variance (>= 2)")
    p.add_argument("--out", default=None, help="PNG grid to write (rows: images; columns: original, prefixes)")
    p.add_argument("--rows", type=int, default=6, help="images in the figure")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)

    tok = load_tokenizer_component(args.tokenizer)
    if not hasattr(tok, "decode_prefix"):
        p.error(f"--tokenizer holds a {type(tok).__name__}, which has no prefix decoding (a 1-D tokenizer does)")
    K = tok.num_tokens
    prefixes = sorted(set(args.num_tokens or range(1, K + 1)))
    bad = [k for k in prefixes if not 1 <= k <= K]
    if bad:
        p.error(f"--num-tokens must lie in [1, {K}] (the tokenizer's tokens); got {bad}")
    if args.images < 2 or args.rows < 1:
        p.error(f"--images must be >= 2 and --rows >= 1; got {args.images} and {args.rows}")
    n = max(args.images, args.rows)
    data = real_dataset(args.data, "heldout", tok.image_size, size=n)
    images = torch.stack([data[i]["image"] for i in range(min(n, len(data)))])
    ev = prefix_explained_variance(tok, images[: args.images], prefixes)
    result = {"tokenizer": args.tokenizer, "tokens": K, "images": ev["images"],
              "explained_variance": {str(k): round(v, 4) for k, v in ev["explained_variance"].items()},
              "gain": {str(k): round(v, 4) for k, v in ev["gain"].items()}}
    if args.out:
        ids = tok.encode(images[: args.rows])
        side = tok.image_size
        grid = Image.new("RGB", (side * (len(prefixes) + 1), side * len(ids)))
        for c, k in enumerate(prefixes, 1):
            rec = tok.decode_prefix(ids, k)
            result.setdefault("psnr_rows", {})[str(k)] = round(psnr(rec, images[: len(ids)]).item(), 3)
            for r in range(len(ids)):
                grid.paste(to_pil(rec[r]), (c * side, r * side))
        for r in range(len(ids)):
            grid.paste(to_pil(images[r]), (0, r * side))
        out = Path(args.out)
        with atomic_path(out) as tmp:
            grid.save(tmp)
        result["figure"] = str(out)
    print(json.dumps(result, indent=2) if args.json else
          "explained variance by prefix: " + ", ".join(f"{k}: {v:.3f} (+{result['gain'][k]:.3f})"
                                                       for k, v in result["explained_variance"].items()))


if __name__ == "__main__":
    main()
