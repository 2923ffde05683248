"""Compositional accuracy of a text-to-image pipeline on the shapes data (GenEval-style).

    python scripts/evaluate.py --model mmgen/zoo/shapes-nexttoken --per-category 50 --json

For each prompt category, prompts are drawn from the held-out split (attribute combinations never seen in
training) and, for comparison, from the training split; one image per prompt is generated with its own seed
and judged by `mmgen.eval.compositional`. Also reports sampling time per image. The logic lives in
`mmgen.eval.harness` (`mmgen eval` adds the other data sets, tokenizer metrics and parameter counts); this
script keeps its JSON keys for the commands quoted in the README. Its sampling flags are `mmgen generate`'s and
`mmgen eval`'s (`mmgen.options`): --guidance-scale defaults to the model's own.
"""

from __future__ import annotations

import argparse
import json

import torch

from mmgen.eval.harness import evaluate_pipeline
from mmgen.options import OptionError, add_sampling_args, sampling_kwargs
from mmgen.pipelines import load_pipeline


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", required=True, help="saved pipeline directory or shipped model name")
    p.add_argument("--per-category", type=int, default=50, help="prompts per category and split")
    p.add_argument("--splits", default="heldout,train", help="comma list of heldout,train")
    p.add_argument("--batch-size", type=int, default=25)
    p.add_argument("--seed", type=int, default=0)
    add_sampling_args(p)
    p.add_argument("--fd", type=int, default=0, metavar="N",
                   help="also FD-ENL0 between N generated images and the N real training scenes they caption")
    p.add_argument("--device", default="cpu", help="torch device for generation (cpu, cuda)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args(argv)
    torch.set_grad_enabled(False)

    try:
        pipe = load_pipeline(args.model)
        # only the options given, so each paradigm's pipeline keeps its own defaults (flow models take no top-k)
        sampling = sampling_kwargs(pipe, args, args.model)
    except (FileNotFoundError, OptionError) as e:
        p.error(str(e))
    # the report names the scale used: the model's own unless given
    sampling = {"guidance_scale": pipe.config.default_guidance_scale, **sampling}
    scores = evaluate_pipeline(pipe, "shapes", per_category=args.per_category, splits=args.splits.split(","),
                               fd=args.fd, batch_size=args.batch_size, seed=args.seed, device=args.device, **sampling)
    result = {"model": args.model, "sampling": sampling, "splits": scores["splits"]}
    if "fd_enl0" in scores:
        result["fd_enl0"] = scores["fd_enl0"]
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for split, s in result["splits"].items():
            print(f"{split}: accuracy {s['accuracy']:.3f} over {s['n']} images; per category "
                  + ", ".join(f"{k} {v:.3f}" for k, v in s["per_category"].items()))


if __name__ == "__main__":
    main()
