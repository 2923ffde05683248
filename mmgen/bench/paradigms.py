"""The paradigms suite (`mmgen bench --suite paradigms`): every saved model against the raster next-token baseline
on the same prompts and seeds: decoder forward passes per image, tokens per image, parameters, latency ratio at
each batch size, optionally compositional accuracy. Anchor: VAR needs 10 passes where raster next-token needs 256
(16x16 tokens); here 6 scales against 64 tokens.

The models compared are `default_models()` (the shipped zoo) unless the caller names others (`--models
NAME=DIR`); a new paradigm joins the suite by shipping a zoo model or by being named there. Until a paradigm of
`STANDIN_PARADIGMS` ships, an untrained stand-in of it on the default model's parts is timed instead (its costs are
the trained model's; its samples are noise). A paradigm whose decoder does more than one kind of evaluation per pass
reports it through its output's `model_evals`.
"""

from __future__ import annotations

import atexit
import json
import shutil
import tempfile
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmgen.bench.common import guidance, timed
from mmgen.data.shapes import CATEGORIES, heldout_prompts, train_prompts
from mmgen.eval.compositional import evaluate
from mmgen.paradigms.protocol import ModelConfig
from mmgen.pipelines import get_paradigm, load_pipeline, paradigm_name, save_pipeline
from mmgen.pipelines.base import generators_from_seed
from mmgen.zoo import DEFAULT_MODEL, zoo_models

BASELINE_PARADIGMS = ("next_token", "token_shuffle")  # one token (or one shuffled window) per pass
STANDIN_PARADIGMS = ("next_neighbor", "next_block")  # run on the default model's parts; zoo models to come


def default_models() -> dict[str, Path]:
    """The models the suite compares when none are named: every shipped model, and an untrained stand-in for each
    paradigm of `STANDIN_PARADIGMS` that no shipped model runs yet."""
    models = {name: Path(d) for name, d in zoo_models().items()}
    shipped = {json.loads((d / "card.json").read_text()).get("paradigm") for d in models.values()
               if (d / "card.json").is_file()}
    missing = [p for p in STANDIN_PARADIGMS if p not in shipped]
    return {**models, **standin_models(missing)} if missing else models


def standin_models(paradigms, base=DEFAULT_MODEL) -> dict[str, Path]:
    """"<paradigm>-untrained" -> a saved pipeline of each paradigm with a freshly initialised (seeded) decoder of
    `base`'s width and depth over `base`'s visual tokenizer and condition: what its passes and latency cost,
    not what it draws. Saved under a temporary directory removed at exit."""
    root = Path(tempfile.mkdtemp(prefix="mmgen-bench-standins-"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    pipe = load_pipeline(base)
    c = pipe.transformer.config
    backbone = ModelConfig(dim=c.dim, n_layers=c.n_layers, n_heads=c.n_heads, n_kv_heads=c.n_kv_heads,
                           mlp_hidden=c.mlp_hidden, rope_2d=c.rope_2d)
    out = {}
    for name in paradigms:
        entry = get_paradigm(name)
        layout = entry.module.make_layout(pipe.visual_tokenizer, pipe.vocab, pipe.config.max_text_len, backbone)
        torch.manual_seed(0)
        decoder = entry.module.make_model(layout, backbone).eval()
        extra = {"conditioning": pipe.config.conditioning} if "conditioning" in pipe.config else {}
        standin = entry.pipeline(transformer=decoder, tokenizer=pipe.tokenizer, max_text_len=pipe.config.max_text_len,
                                 default_guidance_scale=pipe.config.default_guidance_scale,
                                 **{entry.component: getattr(pipe, entry.component)}, **extra)
        out[f"{name}-untrained"] = save_pipeline(standin, root / name)
    return out


def _latency(pipe, prompts, scale: float, repeats: int, seed: int):
    """The pipeline's outputs over `repeats` calls on `prompts` and the median seconds per call."""
    def call(r=0):
        return pipe(prompt=prompts, guidance_scale=scale, output_type="pt",
                    generator=generators_from_seed(seed + 1000 * r, len(prompts)))
    return timed(call, repeats)


def _accuracy(pipe, scale: float, per_category: int, split: str, seed: int) -> dict:
    make = {"heldout": heldout_prompts, "train": train_prompts}[split]
    prompts = [p for c in CATEGORIES for p in make(per_category, seed=seed + 1, category=c)]
    images = []
    for i in range(0, len(prompts), 25):
        chunk = prompts[i:i + 25]
        images += pipe(prompt=chunk, guidance_scale=scale, generator=generators_from_seed(seed + i, len(chunk))).images
    scores = evaluate(images, prompts)
    return {"split": split, "accuracy": scores["accuracy"], "n": scores["n"], "per_category": scores["per_category"]}


def bench_paradigms(models: dict | None = None, baseline=None, batch_sizes=(1, 8), repeats: int = 5,
                    guidance_scale: float | None = None, seed: int = 0, eval_per_category: int = 0,
                    eval_split: str = "heldout", device: str = "cpu", progress: bool = True) -> dict:
    """Each model's sampling cost as ratios against the raster next-token `baseline` (default: the shipped
    default model), same prompts, seeds and batch sizes; each pipeline samples with its own defaults (its own
    guidance scale unless `guidance_scale` is given; flow models: 25 Euler steps per token / scale). With
    `eval_per_category`, compositional accuracy too."""
    models = {k: Path(v) for k, v in (models or default_models()).items()}
    baseline = Path(baseline or DEFAULT_MODEL)
    pipes = {}
    for name, d in {"baseline": baseline, **models}.items():
        pipes[name] = load_pipeline(d).to(device)
        pipes[name].set_progress_bar_config(disable=True)
    if paradigm_name(pipes["baseline"]) not in BASELINE_PARADIGMS:
        raise ValueError(f"baseline {str(baseline)!r} must be a next_token model, got paradigm "
                         f"{paradigm_name(pipes['baseline'])!r}")
    report = {"baseline": str(baseline), "guidance_scale": guidance_scale, "models": {}}
    bar = tqdm(total=len(pipes) * (len(batch_sizes) + (1 if eval_per_category else 0)), desc="bench paradigms",
               disable=not progress)
    base_seconds = {}
    for name, pipe in pipes.items():
        scale = guidance(pipe, guidance_scale)
        row = {"model": str(baseline if name == "baseline" else models[name]), "pipeline": type(pipe).__name__,
               "guidance_scale": scale, "decoder_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
               "tokens_per_image": pipe.layout.num_image_tokens, "latency": {}}
        for b in batch_sizes:
            outs, seconds = _latency(pipe, heldout_prompts(b, seed=seed), scale, repeats, seed)
            base_seconds.setdefault(b, seconds)  # the baseline runs first
            row["nfe_per_image"] = outs[0].decoder_passes
            if getattr(outs[0], "model_evals", None) is not None:  # xAR: the decoder also integrates the flow
                row["model_evals_per_image"] = outs[0].model_evals
            row["latency"][f"batch_{b}"] = {"seconds_per_call": round(seconds, 4),
                                            "seconds_per_image": round(seconds / b, 4),
                                            "latency_ratio": round(seconds / base_seconds[b], 3),
                                            "speedup": round(base_seconds[b] / seconds, 3)}
            bar.update()
        row["nfe_ratio"] = round(row["nfe_per_image"] / report["models"].get("baseline", row)["nfe_per_image"], 4)
        if eval_per_category:
            row["accuracy"] = _accuracy(pipe, scale, eval_per_category, eval_split, seed)
            bar.update()
        report["models"][name] = row
    bar.close()
    return report
