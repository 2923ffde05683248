"""`mmgen` command line.

Every command has `--help`; results go to stdout as JSON with `--json`. Bad input exits with code 2 and a
one-line error that names the argument; output files are written to a temporary name and renamed, so an
error never leaves a half-written image behind.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "zoo" / "shapes-nexttoken"


class CLIError(Exception):
    """A user error: printed on one line, exit code 2."""


def _positive_int(name):
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 1:
            raise argparse.ArgumentTypeError(f"{name} must be >= 1, got {v}")
        return v
    return parse


def _output_paths(out: Path, n: int) -> list[Path]:
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise CLIError(f"--out must end in .png, .jpg, .jpeg or .webp, got {str(out)!r}")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def _save_atomic(image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=path.suffix, dir=path.parent)
    os.close(fd)
    try:
        image.save(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# options that only some pipelines take: CLI flag -> pipeline argument (None on the command line = not given)
PARADIGM_OPTIONS = {"--sampler": "sampler", "--sjd-window": "sjd_window", "--sjd-init": "sjd_init",
                    "--watermark-key": "watermark_key", "--top-k": "top_k", "--top-p": "top_p",
                    "--steps": "num_inference_steps", "--flow-sampler": "flow_sampler",
                    "--cfg-schedule": "cfg_schedule"}


def _paradigm_kwargs(pipe, args) -> dict:
    """The paradigm-specific options the user gave, checked against what this model's pipeline accepts."""
    import inspect

    accepted = inspect.signature(pipe.__call__).parameters
    kwargs = {}
    for flag, name in PARADIGM_OPTIONS.items():
        value = getattr(args, flag[2:].replace("-", "_"))
        if value is None:
            continue
        if name not in accepted:
            takes = sorted(f for f, n in PARADIGM_OPTIONS.items() if n in accepted)
            raise CLIError(f"{flag} does not apply to {type(pipe).__name__} (model {args.model!r}); "
                           f"its options: {', '.join(takes) or 'none'}")
        kwargs[name] = value
    return kwargs


def cmd_generate(args) -> dict:
    from mmgen.pipelines import load_pipeline
    from mmgen.pipelines.base import generators_from_seed

    pipe = load_pipeline(args.model)
    kwargs = _paradigm_kwargs(pipe, args)
    if args.json:
        pipe.set_progress_bar_config(disable=True)
    n = args.num_images
    paths = _output_paths(Path(args.out), n)
    t0 = time.perf_counter()
    result = pipe(prompt=args.prompt, num_images_per_prompt=n, guidance_scale=args.guidance_scale,
                  temperature=args.temperature, generator=generators_from_seed(args.seed, n), **kwargs)
    seconds = time.perf_counter() - t0
    for image, path in zip(result.images, paths):
        _save_atomic(image, path)
    return {"prompt": args.prompt, "model": str(args.model), "pipeline": type(pipe).__name__,
            "images": [str(p) for p in paths], "seed": args.seed, "sampler": kwargs.get("sampler", "ar"),
            "watermarked": args.watermark_key is not None, "nfe_per_image": result.nfe,
            "step_compression": round(result.step_compression, 4),
            "mean_accepted_length": round(result.mean_accepted_length, 4), "seconds": round(seconds, 3),
            "seconds_per_image": round(seconds / n, 3)} | (
                {"model_evals_per_image": result.model_evals} if result.model_evals is not None else {})


def cmd_watermark_detect(args) -> dict:
    from PIL import Image, UnidentifiedImageError

    from mmgen.pipelines import load_pipeline

    if not args.key:
        raise CLIError("--key must be a non-empty string (the secret the images were generated with)")
    if not 0 < args.fpr < 1:
        raise CLIError(f"--fpr must be in (0, 1), got {args.fpr}")
    images = []
    for path in args.images:
        try:
            with Image.open(path) as im:
                im.load()
                images.append(im.copy())
        except FileNotFoundError:
            raise CLIError(f"IMAGE {path!r} does not exist") from None
        except (UnidentifiedImageError, OSError) as e:
            raise CLIError(f"IMAGE {path!r} is not a readable image ({e.__class__.__name__})") from None
    pipe = load_pipeline(args.model)
    results = pipe.detect_watermark(images, args.key, fpr=args.fpr)
    return {"model": str(args.model), "fpr": args.fpr, "method": pipe.watermark_config().method,
            "images": [{"image": p, **r} for p, r in zip(args.images, results)]}


def cmd_bench(args) -> dict:
    from mmgen import bench

    suites = args.suite or list(bench.SUITES)
    if not Path(args.model).is_dir():
        raise CLIError(f"--model {args.model!r} does not exist or is not a directory")
    batch_sizes = tuple(args.batch_sizes)
    models = None
    if args.models:
        models = {}
        for item in args.models:
            name, sep, path = item.partition("=")
            if not sep or not name or not Path(path).is_dir():
                raise CLIError(f"--models takes NAME=DIR with an existing directory, got {item!r}")
            models[name] = path
    return bench.run(suites, model_dir=args.model, progress=not args.json, batch_sizes=batch_sizes,
                     window=args.sjd_window, repeats=args.repeats, eval_per_category=args.eval_per_category,
                     watermark_images=args.watermark_images, eval_split=args.eval_split, device=args.device,
                     models=models, paradigm_eval_per_category=args.paradigm_eval_per_category,
                     shuffle_windows=tuple(args.shuffle_windows), shuffle_grid=args.shuffle_grid)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmgen", description="Autoregressive visual generation.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    g = sub.add_parser("generate", help="generate images from a text prompt",
                       description="Generate images from a text prompt with a saved pipeline.")
    g.add_argument("prompt", help='text prompt, e.g. "a red circle above a blue square"')
    g.add_argument("--model", default=str(DEFAULT_MODEL), help="saved pipeline directory (default: shipped model)")
    g.add_argument("--out", default="out.png", help="output image path; with N>1 images, _0.._N-1 is appended")
    g.add_argument("--num-images", type=_positive_int("--num-images"), default=1, help="images to generate")
    g.add_argument("--seed", type=int, default=0, help="seed of the first image; image i uses seed+i (>= 0)")
    g.add_argument("--guidance-scale", type=float, default=3.0, help="classifier-free guidance scale (>= 0; 1 = off)")
    g.add_argument("--temperature", type=float, default=1.0, help="sampling temperature (> 0; 0 = greedy); flow "
                   "models: scale of the initial noise")
    discrete = g.add_argument_group("discrete tokens (next-token, next-scale)")
    discrete.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (>= 1)")
    discrete.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass in (0, 1]")
    nexttok = g.add_argument_group("next-token models only")
    nexttok.add_argument("--sampler", choices=("ar", "sjd"), default=None,
                         help="ar (default): one token per forward pass; sjd: speculative Jacobi decoding (same "
                         "distribution, fewer passes)")
    nexttok.add_argument("--sjd-window", type=_positive_int("--sjd-window"), default=None,
                         help="SJD draft tokens per pass (default 16)")
    nexttok.add_argument("--sjd-init", choices=("random", "repeat", "sample_left", "above"), default=None,
                         help="SJD draft initialization (default random; above: the token one image row up)")
    nexttok.add_argument("--watermark-key", default=None,
                         help="embed the distortion-free watermark under this secret key (detect with mmgen watermark detect)")
    flow = g.add_argument_group("continuous tokens (flow-head raster, FlowAR)")
    flow.add_argument("--steps", type=_positive_int("--steps"), default=None,
                      help="flow ODE steps per token or scale (default 25)")
    flow.add_argument("--flow-sampler", choices=("euler", "heun"), default=None, help="flow ODE solver (default euler)")
    g.add_argument("--cfg-schedule", choices=("constant", "linear"), default=None,
                   help="next-scale and flow models: guidance constant, or ramped linearly from 1 over the "
                        "scales/tokens (default: constant; FlowAR: linear)")
    g.add_argument("--json", action="store_true", help="print a JSON result instead of text")
    g.set_defaults(func=cmd_generate)

    w = sub.add_parser("watermark", help="watermark tools", description="Watermark tools.")
    wsub = w.add_subparsers(dest="watermark_command", required=True, metavar="ACTION")
    d = wsub.add_parser("detect", help="test images for the watermark",
                        description="Re-tokenize images and test them for the watermark of KEY. The p-value is "
                                    "exact under the hypothesis of no watermark; no decoder pass is needed.")
    d.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    d.add_argument("--key", required=True, help="the secret key used at generation")
    d.add_argument("--model", default=str(DEFAULT_MODEL), help="saved pipeline directory (its tokenizer and "
                   "watermark.json)")
    d.add_argument("--fpr", type=float, default=0.01, help="false-positive rate of the verdict, in (0, 1)")
    d.add_argument("--json", action="store_true", help="print a JSON result")
    d.set_defaults(func=cmd_watermark_detect)

    b = sub.add_parser("bench", help="measure sampling speed and quality as ratios against a baseline",
                       description="Benchmarks (see mmgen/bench.py): each figure is a ratio against a baseline run "
                                   "in the same process.")
    b.add_argument("--suite", action="append", choices=("sjd", "watermark", "paradigms", "shuffle"),
                   help="suite to run (repeatable; default: all)")
    b.add_argument("--model", default=str(DEFAULT_MODEL), help="saved pipeline directory (default: shipped model)")
    b.add_argument("--batch-sizes", type=_positive_int("--batch-sizes"), nargs="+", default=[1, 8],
                   help="batch sizes for the latency table")
    b.add_argument("--sjd-window", type=_positive_int("--sjd-window"), default=16, help="SJD draft tokens per pass")
    b.add_argument("--repeats", type=_positive_int("--repeats"), default=5, help="timed calls per measurement")
    b.add_argument("--eval-per-category", type=_positive_int("--eval-per-category"), default=16,
                   help="held-out prompts per category for compositional accuracy")
    b.add_argument("--watermark-images", type=_positive_int("--watermark-images"), default=100,
                   help="images per watermark method (and unwatermarked) in the attack suite")
    b.add_argument("--eval-split", choices=("train", "heldout"), default="train",
                   help="prompt split for the compositional accuracy column")
    b.add_argument("--models", nargs="+", metavar="NAME=DIR", default=None,
                   help="paradigms suite: models to compare with the --model baseline (default: the shipped zoo); "
                        "shuffle suite: trained models (e.g. s=1, 2, 4) to compare the same way (default: none)")
    b.add_argument("--paradigm-eval-per-category", type=int, default=0, metavar="N",
                   help="paradigms and shuffle suites: also compositional accuracy on N prompts per category "
                        "(default 0: off)")
    b.add_argument("--shuffle-windows", type=_positive_int("--shuffle-windows"), nargs="+", default=[1, 2, 4],
                   help="shuffle suite: Token-Shuffle windows s to compare (1, the baseline, is always run)")
    b.add_argument("--shuffle-grid", type=_positive_int("--shuffle-grid"), default=16,
                   help="shuffle suite: side of the token grid, the same for every s (must divide by each s)")
    b.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, ...)")
    b.add_argument("--json", action="store_true", help="print the JSON report")
    b.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except (CLIError, ValueError, FileNotFoundError) as e:
        parser.exit(2, f"mmgen {args.command}: error: {e}\n")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key}: {json.dumps(value, indent=2) if isinstance(value, dict) else value}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
