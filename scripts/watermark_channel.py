"""The retokenization channel of a next-token pipeline, and the cluster table built from it.

C-reweight (Wu et al., arXiv 2506.11371) watermarks clusters of codes so that a code re-encoded as another
code of the same cluster keeps its signal. k-means on the code vectors groups codes that are close where the
quantizer assigns, but what matters is which codes the decode -> encode round trip actually swaps. This
module measures that: codes of real shapes images (encoded) and of generated images go through
decode -> 8-bit image -> encode, and the counts of (code sent, code read back) form the confusion matrix that
`mmgen.watermark.cluster_by_confusion` clusters.

`python scripts/watermark_channel.py MODEL_DIR` writes MODEL_DIR/watermark.json with such a table; it is how the
shipped default model's table was built. (It drives a pipeline, so it is a script above the pipelines; the
pure pieces, `confusion_matrix` and `cluster_by_confusion`, stay in `mmgen.watermark`.)
"""

from __future__ import annotations

import argparse
import json

import torch
from tqdm.auto import tqdm

from mmgen.data.shapes import ShapesDataset, train_prompts
from mmgen.pipelines.base import generators_from_seed
from mmgen.watermark import WatermarkConfig, cluster_by_confusion, confusion_matrix
from mmgen.pipelines import load_pipeline
from mmgen.zoo import resolve_model


@torch.no_grad()
def retokenization_confusion(pipe, n_real: int = 512, n_generated: int = 256, seed: int = 0,
                             guidance_scale: float | None = None, batch_size: int = 64,
                             progress: bool = True) -> torch.Tensor:
    """Confusion counts (V, V) of `pipe` (a `NextTokenPipeline`) over n_real held-out shapes images and
    n_generated images sampled for training-split prompts (neither overlaps the attack suite's prompts), at
    `guidance_scale` (None: the model's own)."""
    if n_real < 0 or n_generated < 0 or n_real + n_generated == 0:
        raise ValueError(f"n_real and n_generated must be >= 0 and not both 0, got {n_real}, {n_generated}")
    vq, V = pipe.vq_model, pipe.vq_model.vocab_size
    codes = []
    data = ShapesDataset("heldout", size=max(n_real, 1), seed=seed)
    for i in tqdm(range(0, n_real, batch_size), desc="encode real images", disable=not progress):
        images = torch.stack([data[j]["image"] for j in range(i, min(i + batch_size, n_real))])
        codes.append(pipe.retokenize(pipe.image_processor.postprocess(images, output_type="pil")).cpu())
    prompts = train_prompts(n_generated, seed=seed)
    pipe.set_progress_bar_config(disable=True)
    for i in tqdm(range(0, n_generated, batch_size), desc="generate", disable=not progress):
        chunk = prompts[i:i + batch_size]
        out = pipe(prompt=chunk, guidance_scale=guidance_scale, generator=generators_from_seed(seed + i, len(chunk)))
        codes.append(out.tokens.flatten(1).cpu())
    counts = torch.zeros(V, V)
    for c in tqdm(codes, desc="decode -> encode", disable=not progress):
        # through 8-bit PIL images, as a detector receives them
        images = pipe.image_processor.postprocess(vq.decode(c.view(-1, *vq.grid_size).to(vq.device)),
                                                  output_type="pil")
        counts += confusion_matrix(c, pipe.retokenize(images).cpu(), V)
    return counts


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(
        prog="python scripts/watermark_channel.py",
        description="Measure a next-token pipeline's decode -> encode confusion and write its C-reweight cluster "
                    "table (MODEL_DIR/watermark.json, clustering='confusion'); other watermark settings keep "
                    "their defaults.")
    parser.add_argument("model", help="saved NextTokenPipeline directory or shipped model name")
    parser.add_argument("--clusters", type=int, default=16, help="number of clusters K (default 16)")
    parser.add_argument("--mass-cap", type=float, default=2.0,
                        help="largest cluster share of the generated mass, in units of 1/K (default 2)")
    parser.add_argument("--real", type=int, default=512, help="held-out shapes images to round-trip (default 512)")
    parser.add_argument("--generated", type=int, default=256, help="generated images to round-trip (default 256)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance-scale", type=float, default=None,
                        help="guidance of the generated images (default: the model's own, see `mmgen models`)")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    pipe_dir = resolve_model(args.model)
    pipe = load_pipeline(pipe_dir)
    codebook = pipe.visual_tokenizer.codebook.detach().cpu()
    if not 1 <= args.clusters <= len(codebook):
        parser.error(f"--clusters must be in [1, {len(codebook)}], got {args.clusters}")
    if args.mass_cap < 1:
        parser.error(f"--mass-cap must be >= 1, got {args.mass_cap}")
    counts = retokenization_confusion(pipe, args.real, args.generated, args.seed, args.guidance_scale)
    table = cluster_by_confusion(counts, codebook, args.clusters, mass_cap=args.mass_cap, seed=args.seed)
    config = WatermarkConfig(num_clusters=args.clusters, clustering="confusion", clusters=table)
    config.save(pipe_dir / "watermark.json")
    labels = torch.as_tensor(table)
    match = float(counts[labels[:, None] == labels[None, :]].sum() / counts.sum())
    print(json.dumps({"model": args.model, "num_clusters": args.clusters, "token_match": round(float(
        counts.diag().sum() / counts.sum()), 4), "cluster_match": round(match, 4)}))


if __name__ == "__main__":
    main()
