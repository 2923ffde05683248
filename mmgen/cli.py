"""`mmgen` command line.

Every command has `--help`; results go to stdout as JSON with `--json`. Bad input exits with code 2 and a
one-line error that names the argument; output files are written to a temporary name and renamed, so an
error never leaves a half-written image behind.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import os
import sys
import time
from contextlib import ExitStack
from pathlib import Path

from mmgen.atomic import atomic_path, write_json_atomic
from mmgen.convert import CONVERTERS
from mmgen.options import (MAX_IMAGES_PER_CALL, add_condition_args, add_sampling_args, check_count,
                           condition_kwargs, device, nonnegative_int, positive_float, positive_int, sampling_kwargs,
                           sampling_number, secret_key, seed, unit_interval)
from mmgen.watermark import METHODS
from mmgen.zoo import DEFAULT_MODEL, DEFAULT_MODEL_NAME, resolve_model, zoo_card, zoo_mb, zoo_names


class CLIError(Exception):
    """A user error: printed on one line, exit code 2."""


KEY_ENV = "MMGEN_WATERMARK_KEY"  # `mmgen watermark detect`'s key when neither --key nor --key-file is given
# `mmgen watermark detect` inputs: at least one pixel per token of an 8x8 grid; the pixel cap refuses
# decompression bombs from the header, before decoding
MIN_IMAGE_SIDE, MAX_IMAGE_PIXELS = 8, 4096 * 4096


def _model_dir(value: str) -> Path:
    """--model: a saved pipeline directory or a shipped model's name."""
    try:
        return resolve_model(value)
    except FileNotFoundError as e:
        raise CLIError(f"--model: {e}") from None


def _output_paths(out: Path, n: int) -> list[Path]:
    if out.suffix.lower() not in (".png", ".jpg", ".jpeg", ".webp"):
        raise CLIError(f"--out must end in .png, .jpg, .jpeg or .webp, got {str(out)!r}")
    parent = out.absolute().parent
    existing = next(p for p in (parent, *parent.parents) if p.exists())
    if not existing.is_dir():
        raise CLIError(f"--out {str(out)!r} cannot be written: {str(existing)!r} is a file, not a directory")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"--out {str(out)!r} cannot be written: directory {str(existing)!r} is not writable")
    if n == 1:
        return [out]
    return [out.with_name(f"{out.stem}_{i}{out.suffix}") for i in range(n)]


def _save_atomic(images, paths: list[Path]) -> None:
    """Write every image to a temporary name, then rename them all: an error leaves no image behind."""
    try:
        with ExitStack() as stack:  # each temporary is renamed when the stack closes, none if a save raised
            for image, path in zip(images, paths):
                image.save(stack.enter_context(atomic_path(path)))
    except OSError as e:
        raise CLIError(f"--out {str(paths[0])!r} cannot be written: {e.strerror or e}") from None


def cmd_generate(args) -> dict:
    from mmgen.pipelines import load_pipeline
    from mmgen.pipelines.base import generators_from_seed

    if args.prompt_option is not None:
        if args.prompt is not None:
            raise CLIError("give the prompt once: as PROMPT or as --prompt, not both")
        args.prompt = args.prompt_option
    n = args.num_images
    conditions = len(args.class_label or [None])  # --num-images of each --class-label
    check_count(n, conditions, "class label(s)" if args.class_label else "prompt(s)", "--num-images")
    n_images = n * conditions
    paths = _output_paths(Path(args.out), n_images)
    pipe = load_pipeline(_model_dir(args.model), device=args.device)
    condition = condition_kwargs(pipe, args.prompt, args.class_label, args.model)
    kwargs = sampling_kwargs(pipe, args, args.model)
    if args.json:
        pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    result = pipe(**condition, num_images_per_prompt=n, generator=generators_from_seed(args.seed, n_images),
                  **kwargs)
    seconds = time.perf_counter() - t0
    _save_atomic(result.images, paths)
    return {"prompt": args.prompt, **({"class_labels": args.class_label} if args.class_label else {}),
            "model": str(args.model), "pipeline": type(pipe).__name__,
            "images": [str(p) for p in paths], "seed": args.seed, "sampler": kwargs.get("sampler", "ar"),
            "watermarked": args.watermark_key is not None, "nfe_per_image": result.decoder_passes,
            "step_compression": round(result.step_compression, 4),
            "mean_accepted_length": round(result.mean_accepted_length, 4), "lossless": result.lossless,
            "seconds": round(seconds, 3),
            "seconds_per_image": round(seconds / n_images, 3)} | (
                {"model_evals_per_image": result.model_evals} if result.model_evals is not None else {})


def cmd_watermark_detect(args) -> dict:
    from PIL import Image, UnidentifiedImageError

    from mmgen.pipelines import load_pipeline
    from mmgen.pipelines.base import IMAGE_MODES  # 8-bit modes that convert to RGB without loss of meaning

    args.key = secret_key(args.key, args.key_file, "--key", env=KEY_ENV)
    if not args.key:
        raise CLIError(f"--key must be a non-empty string (the secret the images were generated with); give it as "
                       f"--key, --key-file or ${KEY_ENV}")
    if not 0 < args.fpr < 1:
        raise CLIError(f"--fpr must be in (0, 1), got {args.fpr}")
    model = _model_dir(args.model)
    images = []
    for path in args.images:
        try:
            with Image.open(path) as im:
                w, h = im.size
                if im.mode not in IMAGE_MODES:
                    raise CLIError(f"IMAGE {path!r} has mode {im.mode}; accepted: {', '.join(IMAGE_MODES)} "
                                   f"(convert it to 8-bit RGB first)")
                if min(w, h) < MIN_IMAGE_SIDE or w * h > MAX_IMAGE_PIXELS:
                    raise CLIError(f"IMAGE {path!r} is {w}x{h}; accepted: sides >= {MIN_IMAGE_SIDE} and at most "
                                   f"{MAX_IMAGE_PIXELS} pixels")
                im.load()
                images.append(im.copy())
        except FileNotFoundError:
            raise CLIError(f"IMAGE {path!r} does not exist") from None
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError) as e:
            raise CLIError(f"IMAGE {path!r} is not a readable image ({e.__class__.__name__})") from None
    pipe = load_pipeline(model)
    if not hasattr(pipe, "detect_watermark"):
        raise CLIError(f"--model {str(args.model)!r} is a {type(pipe).__name__}, which embeds no watermark: the "
                       f"watermark reweights one token per decoder pass given the tokens before it, so only "
                       f"next-token models (mmgen's next-token family, Janus, Emu3, LlamaGen) carry and detect it")
    results = pipe.detect_watermark(images, args.key, fpr=args.fpr, combine=args.combine, method=args.method)
    per_image = results["images"] if args.combine else results
    report = {"model": str(args.model), "fpr": args.fpr, "method": pipe.watermark_config(args.method).method,
              "images": [{"image": p, **r} for p, r in zip(args.images, per_image)]}
    if args.combine:
        report["combined"] = results["combined"]
    return report


def cmd_bench(args) -> dict:
    from mmgen import bench

    suites = args.suite or list(bench.SUITES)
    model = _model_dir(args.model)
    models = None
    if args.models:
        models = {}
        for item in args.models:
            name, sep, path = item.partition("=")
            if not sep or not name or not Path(path).is_dir():
                raise CLIError(f"--models takes NAME=DIR with an existing directory, got {item!r}")
            models[name] = path
    given = {k: v for k, v in (("batch_sizes", args.batch_sizes and tuple(args.batch_sizes)),
                                ("repeats", args.repeats)) if v is not None}  # else each suite's own default
    if args.sjd_modes:  # the latency table (and pass times) of these modes alone
        known = bench.sjd_modes()
        if set(args.sjd_modes) - set(known):
            raise CLIError(f"--sjd-modes must be among {', '.join(known)}; got {' '.join(args.sjd_modes)}")
        given |= dict(modes=tuple(args.sjd_modes), sweep_windows=(), accept_widths=(), profile=False,
                      hf_generate=False)
    return bench.run(suites, model_dir=model, progress=not args.json, guidance_scale=args.guidance_scale,
                     window=args.sjd_window, num_prompts=args.sjd_prompts, lantern_delta=args.sjd_lantern_delta,
                     tree_widths=tuple(args.sjd_tree_widths) if not args.sjd_modes else (),
                     tree_depth=args.sjd_tree_depth,
                     eval_per_category=args.eval_per_category if not args.sjd_modes else 0, **given,
                     watermark_images=args.watermark_images, watermark_delta=args.watermark_delta,
                     watermark_fpr_images=args.watermark_fpr_images,
                     watermark_set_sizes=tuple(args.watermark_set_sizes), eval_split=args.eval_split,
                     device=args.device,
                     models=models, paradigm_eval_per_category=args.paradigm_eval_per_category,
                     shuffle_windows=tuple(args.shuffle_windows), shuffle_grid=args.shuffle_grid)


def cmd_serve(args) -> dict:
    try:
        from mmgen.serve import serve
    except ImportError as e:
        if e.name != "gradio":
            raise
        raise CLIError("mmgen serve needs the serve extra: pip install 'mmgen[serve]' (gradio)") from None

    if args.model and len(set(args.model)) != len(args.model):
        raise CLIError(f"--model names a model twice: {' '.join(args.model)}")
    # a model is listed under what the user typed (a zoo name or a path), so two runs' `pipeline` dirs differ
    models = {value: _model_dir(value) for value in args.model} if args.model else None  # None: the zoo
    try:
        demo = serve(models, host=args.host, port=args.port, share=args.share, device=args.device)
    except OSError as e:  # port taken, host not ours
        raise CLIError(f"--host {args.host} --port {args.port}: cannot serve there ({e})") from None
    return {"url": demo.local_url, "models": {name: cls.__name__ for name, cls in demo.models.classes.items()}}


def cmd_models(args) -> dict:
    rows = [zoo_card(name) | {"default": name == DEFAULT_MODEL_NAME} for name in zoo_names()]
    if args.json:
        return {"models": rows, "total_mb": round(zoo_mb(), 1)}  # shared files counted once
    for r in rows:
        res = r.get("results", {})
        acc = (f"acc {res['heldout_accuracy']:.0%}/{res['train_accuracy']:.0%}"
               if "heldout_accuracy" in res and "train_accuracy" in res else "acc -")
        fd = f"FD-ENL0 {res['fd_enl0']:.0f}" if "fd_enl0" in res else "FD-ENL0 -"
        print(f"{r['name'] + (' (default)' if r['default'] else ''):28s} {r['pipeline']:18s} "
              f"{r.get('paradigm', '?'):13s} {r['conditioning']:13s} "
              f"{sum(r['parameters'].values()) / 1e6:5.1f} M {r['size_mb']:5.1f} MB  "
              f"cfg {r['guidance_scale']:g}  {acc}  {fd}  {r.get('description', '')}")
    print("cfg: the model's default guidance scale; acc: held-out / train compositional accuracy (mmgen eval) at "
          "that scale; train commands: mmgen models --json")
    return {}


def _count_or_off(name):
    """0 (off) or a number of images >= 2 (a Frechet distance needs a covariance on each side)."""
    def parse(s):
        try:
            v = int(s)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{name} must be an integer, got {s!r}") from None
        if v < 0 or v == 1:
            raise argparse.ArgumentTypeError(f"{name} must be 0 (off) or >= 2, got {v}")
        return v
    return parse


def _eval_out(value: str | None) -> Path | None:
    """--out, checked before the run, so a long evaluation is never lost to a bad path."""
    if value is None:
        return None
    out = Path(value)
    if out.suffix.lower() != ".json":
        raise CLIError(f"--out must end in .json, got {str(out)!r}")
    existing = next(p for p in (out.absolute().parent, *out.absolute().parent.parents) if p.exists())
    if not existing.is_dir() or not os.access(existing, os.W_OK | os.X_OK):
        raise CLIError(f"--out {str(out)!r} cannot be written: {str(existing)!r} is not a writable directory")
    return out


def _eval_samples(args) -> dict:
    """FID / IS / precision-recall of an ADM sample batch (`mmgen.eval.fid`)."""
    from mmgen.eval.fid import evaluate_npz

    if args.model is not None:
        raise CLIError("--samples scores an existing sample batch and takes no --model (write one with "
                       "scripts/sample_npz.py --model ...)")
    if args.inception_weights is None:
        raise CLIError("--samples needs --inception-weights FILE: the FID Inception weights (e.g. "
                       "pt_inception-2015-12-05-6726825d.pth); nothing is downloaded")
    try:
        return evaluate_npz(args.samples, args.reference, args.inception_weights, metrics=args.metrics,
                            reference_stats=args.reference_stats, batch_size=args.batch_size or 100,
                            is_splits=args.is_splits, device=args.device, progress=not args.json)
    except ImportError as e:  # the optional extra
        raise CLIError(str(e)) from None


def cmd_eval(args) -> dict:
    out = _eval_out(args.out)
    if args.samples is not None:
        result = _eval_samples(args)
    else:
        from mmgen.eval.harness import evaluate_model
        from mmgen.pipelines import load_pipeline

        given = [f for f, v in (("--reference", args.reference), ("--inception-weights", args.inception_weights),
                                ("--metrics", args.metrics)) if v is not None]
        if given:
            raise CLIError(f"{', '.join(given)} score a sample batch: pass --samples NPZ (and no --model)")
        if args.model is None:
            raise CLIError("one of --model (evaluate a saved model) or --samples (FID / IS of an ADM .npz batch) "
                           "is required")
        model = _model_dir(args.model)
        pipe = load_pipeline(model)
        kwargs = sampling_kwargs(pipe, args, args.model)
        result = evaluate_model(model, data=args.data, per_category=args.per_category, splits=args.splits,
                                fd=args.fd, tokenizer_images=args.tokenizer_images,
                                batch_size=args.batch_size or 25, seed=args.seed, device=args.device,
                                progress=not args.json, pipeline=pipe, **kwargs)
    if out is not None:
        write_json_atomic(out, result, indent=2)
    return result


def cmd_convert(args) -> dict:
    return args.convert(args)


def _add_generate(sub) -> None:
    """`mmgen generate`: images from a prompt, a class label or nothing."""
    g = sub.add_parser("generate", help="generate images from a text prompt or a class label",
                       description="Generate images with a saved pipeline: from a text PROMPT (caption models), "
                                   "--class-label (class-conditional models) or neither (unconditional models).")
    g.add_argument("prompt", nargs="?", default=None,
                   help='text prompt, e.g. "a red circle above a blue square" (caption and text-encoder models)')
    g.add_argument("--prompt", dest="prompt_option", default=None, metavar="PROMPT",
                   help="the text prompt as an option (the same as the positional PROMPT)")
    g.add_argument("--model", default=str(DEFAULT_MODEL),
                   help=f"saved pipeline directory or shipped model name, e.g. shapes-flowar (default: "
                        f"{DEFAULT_MODEL_NAME})")
    g.add_argument("--out", default="out.png", help="output image path; with N>1 images, _0.._N-1 is appended")
    g.add_argument("--num-images", type=int, default=1,  # its range: check_count in cmd_generate
                   help=f"images to generate, of each --class-label (at most {MAX_IMAGES_PER_CALL} in all)")
    g.add_argument("--seed", type=seed, default=0, help="seed of the first image; image i uses seed+i (>= 0), so "
                   "an image's tokens do not depend on --num-images")
    add_condition_args(g)
    add_sampling_args(g, watermark=True)
    g.add_argument("--json", action="store_true", help="print a JSON result instead of text")
    g.add_argument("--device", type=device, default="cpu", help="torch device to run on (cpu, cuda, ...)")
    g.set_defaults(func=cmd_generate)

def _add_watermark(sub) -> None:
    """`mmgen watermark detect`."""
    w = sub.add_parser("watermark", help="watermark tools", description="Watermark tools.")
    wsub = w.add_subparsers(dest="watermark_command", required=True, metavar="ACTION")
    d = wsub.add_parser("detect", help="test images for the watermark",
                        description="Re-tokenize images and test them for the watermark of KEY. The p-value is "
                                    "exact under the hypothesis of no watermark; no decoder pass is needed.")
    d.add_argument("images", nargs="+", metavar="IMAGE", help="image files")
    d.add_argument("--key", default=None, help=f"the secret key used at generation (or --key-file, or ${KEY_ENV})")
    d.add_argument("--key-file", default=None, metavar="FILE", help="read the key from FILE (kept out of ps and "
                                                                    "shell history)")
    d.add_argument("--model", default=str(DEFAULT_MODEL),
                   help="saved pipeline directory or shipped model name (its tokenizer and watermark.json)")
    d.add_argument("--fpr", type=float, default=0.01, help="false-positive rate of the verdict, in (0, 1)")
    d.add_argument("--method", choices=METHODS, default=None,
                   help="the method the images were made with (--watermark-method at generation; default: the "
                        "model's own, watermark.json)")
    d.add_argument("--combine", action="store_true",
                   help="also test the images as one set made with one key: one pooled, calibrated p-value")
    d.add_argument("--json", action="store_true", help="print a JSON result")
    d.set_defaults(func=cmd_watermark_detect)

def _add_bench(sub) -> None:
    """`mmgen bench`: the suites of mmgen/bench."""
    b = sub.add_parser("bench", help="measure sampling speed and quality as ratios against a baseline",
                       description="Benchmarks (see mmgen/bench/): each figure is a ratio against a baseline run "
                                   "in the same process.")
    b.add_argument("--suite", action="append",
                   choices=("sjd", "decode", "watermark", "paradigms", "shuffle", "memory"),
                   help="suite to run (repeatable; default: all)")
    b.add_argument("--model", default=str(DEFAULT_MODEL),
                   help=f"saved pipeline directory or shipped model name, e.g. shapes-flowar (default: "
                        f"{DEFAULT_MODEL_NAME})")
    b.add_argument("--guidance-scale", type=sampling_number("--guidance-scale", "guidance_scale"), default=None,
                   help="classifier-free guidance scale of every suite (default: each model's own, see "
                        "`mmgen models`)")
    b.add_argument("--batch-sizes", type=positive_int("--batch-sizes"), nargs="+", default=None,
                   help="batch sizes for the latency tables (default: sjd and decode 1 8 32, the other suites 1 8)")
    b.add_argument("--sjd-window", type=positive_int("--sjd-window"), default=16, help="SJD draft tokens per pass")
    b.add_argument("--sjd-prompts", type=positive_int("--sjd-prompts"), default=32,
                   help="sjd suite: different held-out prompts behind every latency figure")
    b.add_argument("--sjd-lantern-delta", type=unit_interval("--sjd-lantern-delta"), default=0.1,
                   help="sjd suite: total-variation budget of the lossy LANTERN row (0 < delta < 1)")
    b.add_argument("--sjd-tree-widths", type=nonnegative_int("--sjd-tree-widths"), nargs="+", default=[0, 1, 3, 7],
                   help="sjd suite: extra candidates per position of the batch-1 token-tree sweep (0: the chain, "
                        "always run first as its baseline)")
    b.add_argument("--sjd-tree-depth", type=positive_int("--sjd-tree-depth"), default=4,
                   help="sjd suite: window positions that get the tree's extra candidates, in the sweep and the "
                        "sjd_tree row")
    b.add_argument("--sjd-modes", nargs="+", default=None, metavar="MODE",
                   help="sjd suite: only these modes' latency table and pass times beside the AR baselines (eager "
                        "and compiled), no sweeps, accuracy or transformers block (modes as named in the report, "
                        "e.g. sjd_shared sjd_compiled sjd_compiled_adaptive)")
    b.add_argument("--repeats", type=positive_int("--repeats"), default=None,
                   help="timed calls per measurement (default: sjd 2 passes over all its prompts, others 5)")
    b.add_argument("--eval-per-category", type=positive_int("--eval-per-category"), default=16,
                   help="held-out prompts per category for compositional accuracy")
    b.add_argument("--watermark-images", type=nonnegative_int("--watermark-images"), default=100,
                   help="images per watermark method (and unwatermarked) in the attack suite; 0: only the "
                        "watermark's overhead (watermarked against plain sampling, eager and compiled AR, SJD)")
    b.add_argument("--watermark-delta", type=positive_float("--watermark-delta"), default=None,
                   help="strength of the KGW rows of the attack suite (default: the model's watermark.json)")
    b.add_argument("--watermark-fpr-images", type=_count_or_off("--watermark-fpr-images"), default=1000,
                   metavar="N", help="clean images whose detection under 10 keys gives each method's empirical "
                                     "false-positive rate (0: skip)")
    b.add_argument("--watermark-set-sizes", type=positive_int("--watermark-set-sizes"), nargs="+", default=[16, 64],
                   metavar="N", help="watermark suite: also detect over sets of N images pooled (consecutive images "
                                     "of one key; sizes above --watermark-images are left out)")
    b.add_argument("--eval-split", choices=("train", "heldout"), default="train",
                   help="prompt split for the compositional accuracy column")
    b.add_argument("--models", nargs="+", metavar="NAME=DIR", default=None,
                   help="paradigms suite: models to compare with the --model baseline (default: the shipped zoo); "
                        "shuffle suite: trained models (e.g. s=1, 2, 4) to compare the same way (default: none)")
    b.add_argument("--paradigm-eval-per-category", type=int, default=0, metavar="N",
                   help="paradigms and shuffle suites: also compositional accuracy on N prompts per category "
                        "(default 0: off)")
    b.add_argument("--shuffle-windows", type=positive_int("--shuffle-windows"), nargs="+", default=[1, 2, 4],
                   help="shuffle suite: Token-Shuffle windows s to compare (1, the baseline, is always run)")
    b.add_argument("--shuffle-grid", type=positive_int("--shuffle-grid"), default=16,
                   help="shuffle suite: side of the token grid, the same for every s (must divide by each s)")
    b.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, ...)")
    b.add_argument("--json", action="store_true", help="print the JSON report")
    b.set_defaults(func=cmd_bench)

def _add_eval(sub) -> None:
    """`mmgen eval`: a saved model, or FID / IS of a sample batch."""
    e = sub.add_parser("eval", help="evaluate a saved model, or FID / IS of a sample batch",
                       description="Evaluate a saved model (--model; see mmgen/eval/harness.py). shapes: "
                                   "compositional accuracy per category on the held-out and train splits; "
                                   "fashion_mnist: class accuracy by the shipped classifier; emoji, flags, icons: "
                                   "FD-ENL0 only. FD-ENL0 is a Frechet distance on EfficientNet-Lite0 features, not "
                                   "Inception FID. The tokenizer is scored by PSNR, SSIM, rFD-ENL0 and codebook "
                                   "usage on held-out images. "
                                   "Or score a sample batch in ADM's .npz format (--samples, written by "
                                   "scripts/sample_npz.py) against a reference batch (--reference, e.g. ADM's "
                                   "VIRTUAL_imagenet256_labeled.npz): FID, Inception Score and precision / recall "
                                   "by torch-fidelity's FID Inception on the weights file given by "
                                   "--inception-weights (see mmgen/eval/fid.py; pip install 'mmgen[fid]'). A torch "
                                   "port: close to ADM's TensorFlow numbers, not identical.")
    e.add_argument("--model", default=None, help="saved pipeline directory or shipped model name")
    e.add_argument("--data", choices=("shapes", "fashion_mnist", "emoji", "flags", "icons"), default=None,
                   help="what to evaluate on (default: the data the model directory records, else shapes)")
    e.add_argument("--per-category", type=positive_int("--per-category"), default=50,
                   help="shapes: prompts per category and split; fashion_mnist: images per class")
    e.add_argument("--splits", nargs="+", choices=("heldout", "train"), default=["heldout", "train"],
                   help="shapes: prompt splits to score")
    e.add_argument("--fd", type=_count_or_off("--fd"), default=0, metavar="N",
                   help="FD-ENL0 between N real images and N generated from their captions (default 0: off; "
                        "emoji needs it)")
    e.add_argument("--tokenizer-images", type=_count_or_off("--tokenizer-images"), default=256, metavar="N",
                   help="held-out images for the tokenizer's PSNR / SSIM / rFD-ENL0 (0: skip)")
    e.add_argument("--batch-size", type=positive_int("--batch-size"), default=None,
                   help="images per pipeline call (default 25); with --samples: images per Inception batch "
                        "(default 100)")
    e.add_argument("--seed", type=seed, default=0, help="image i of each prompt list uses seed+i")
    add_sampling_args(e, watermark=True)  # the watermark's quality cost: eval with and without
    # the name before the sampling flags were shared with `mmgen generate`; kept so old commands still run
    e.add_argument("--cfg", dest="guidance_scale", type=sampling_number("--cfg", "guidance_scale"),
                   help=argparse.SUPPRESS)
    fid = e.add_argument_group("FID / IS / precision-recall of a sample batch (ADM .npz)")
    fid.add_argument("--samples", default=None, metavar="NPZ",
                     help="sample batch: arr_0 = uint8 images (N, H, W, 3) (scripts/sample_npz.py writes one)")
    fid.add_argument("--reference", default=None, metavar="NPZ",
                     help="reference batch in ADM's format: arr_0 images and/or stored mu / sigma")
    fid.add_argument("--inception-weights", default=None, metavar="FILE",
                     help="FID Inception weights (e.g. pt_inception-2015-12-05-6726825d.pth, as torch-fidelity and "
                          "torchmetrics load it); never downloaded")
    fid.add_argument("--metrics", nargs="+", choices=("fid", "is", "pr"), default=None,
                     help="what to compute (default: fid and is, and pr when the reference holds images; 'is' "
                          "alone needs no --reference)")
    fid.add_argument("--reference-stats", choices=("auto", "stored", "images"), default="auto",
                     help="FID's reference mu / sigma: stored in the .npz (ADM's were made by the TensorFlow graph), "
                          "computed from its images, or auto (stored when present)")
    fid.add_argument("--is-splits", type=positive_int("--is-splits"), default=10,
                     help="Inception Score splits (default 10, as the field reports it)")
    e.add_argument("--device", default="cpu", help="torch device to run on (cpu, cuda, ...)")
    e.add_argument("--out", default=None, help="also write the JSON report to this .json file")
    e.add_argument("--json", action="store_true", help="print the JSON report")
    e.set_defaults(func=cmd_eval)

def _add_models(sub) -> None:
    """`mmgen models`: the shipped zoo."""
    m = sub.add_parser("models", help="list the shipped models",
                       description="List the shipped models (mmgen/zoo): pipeline, paradigm, parameters, size, "
                                   "headline results from their eval.json and, with --json, the commands that "
                                   "train each one.")
    m.add_argument("--json", action="store_true", help="print the list as JSON")
    m.set_defaults(func=cmd_models)

def _add_convert(sub) -> None:
    """`mmgen convert FAMILY`: one subcommand per converter."""
    c = sub.add_parser("convert", help="convert another project's released checkpoint into a pipeline directory",
                       description="Convert released checkpoints of projects that are not in transformers "
                                   "(read with weights_only=True) into an mmgen pipeline directory.")
    families = c.add_subparsers(dest="family", required=True, metavar="FAMILY")
    for family, (add_args, run) in CONVERTERS.items():
        doc = sys.modules[run.__module__].__doc__ or family
        f = families.add_parser(family, help=doc.splitlines()[0], description=doc,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
        add_args(f)
        f.add_argument("--out", required=True, metavar="DIR",
                       help="pipeline directory to write (new, or a saved pipeline to replace)")
        f.add_argument("--json", action="store_true", help="print what was written as JSON")
        f.set_defaults(func=cmd_convert, convert=run)

def _add_serve(sub) -> None:
    """`mmgen serve`: the Gradio demo."""
    s = sub.add_parser("serve", help="web demo (Gradio) in the browser",
                       description="Serve a web demo: prompt, model/paradigm, sampler (AR/SJD), seed, guidance, "
                                   "watermark. Pipelines load on first use. Stop with Ctrl-C.")
    s.add_argument("--model", action="append", metavar="NAME_OR_DIR", default=None,
                   help="shipped model name or saved pipeline directory (repeatable; default: every shipped model)")
    s.add_argument("--host", default="127.0.0.1", help="address to listen on (0.0.0.0: every interface)")
    s.add_argument("--port", type=positive_int("--port", 65535), default=7860, help="port to listen on")
    s.add_argument("--share", action="store_true", help="also publish a temporary public gradio.live link")
    s.add_argument("--device", type=device, default="cpu", help="torch device the models run on (cpu, cuda, ...)")
    s.add_argument("--json", action="store_true", help="on exit, print what was served as JSON")
    s.set_defaults(func=cmd_serve)

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mmgen", description="Autoregressive visual generation.")
    parser.add_argument("--version", action="version", version=f"mmgen {importlib.metadata.version('mmgen')}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_generate(sub)
    _add_watermark(sub)
    _add_bench(sub)
    _add_eval(sub)
    _add_models(sub)
    _add_convert(sub)
    _add_serve(sub)
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
