"""Benchmarks behind `mmgen bench` and `scripts/benchmark.py`, one module per suite:

    sjd.py        plain AR (eager and compiled) against every speculative Jacobi decoding mode
    decode.py     mmgen's AR decode (eager, compiled) against transformers' `generate()` on the same weights
    watermark.py  watermark methods under image attacks
    paradigms.py  every saved model against the raster next-token baseline
    shuffle.py    Token-Shuffle windows against s = 1
    memory.py     peak resident memory of generation and training, a fresh process per job

Every figure is a ratio against a baseline run in the same process on the same machine, so the numbers travel
between machines better than raw seconds. Every suite samples at each model's own guidance scale
(`default_guidance_scale` in its model_index.json) unless `guidance_scale` is given.
"""

from __future__ import annotations

import platform

import torch

from mmgen.bench.decode import bench_hf_generate
from mmgen.bench.memory import MEMORY_LIMIT_MB, bench_memory
from mmgen.bench.paradigms import bench_paradigms
from mmgen.bench.shuffle import bench_shuffle
from mmgen.bench.sjd import bench_sjd, sjd_modes
from mmgen.bench.watermark import attack_suite, clean_fpr
from mmgen.pipelines import load_pipeline
from mmgen.zoo import DEFAULT_MODEL

__all__ = ["SUITES", "MEMORY_LIMIT_MB", "run", "bench_sjd", "sjd_modes", "bench_hf_generate", "bench_paradigms",
           "bench_shuffle", "bench_memory"]

SUITES = ("sjd", "decode", "watermark", "paradigms", "shuffle", "memory")


def _pick(kw: dict, *names: str) -> dict:
    return {k: kw[k] for k in names if k in kw}


def run(suites=SUITES, model_dir=None, progress: bool = True, watermark_images: int = 100, models=None,
        shuffle_windows=(1, 2, 4), shuffle_grid: int = 16, guidance_scale: float | None = None,
        watermark_delta: float | None = None, watermark_fpr_images: int = 0, watermark_set_sizes=(), **kw) -> dict:
    """The suites `suites` (of `SUITES`) on `model_dir` (default: the shipped default model), at
    `guidance_scale` (None: each model's own), as one report with the machine they ran on."""
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"--suite must be one of {', '.join(SUITES)}; got {', '.join(unknown)}")
    model_dir = model_dir or DEFAULT_MODEL
    device = kw.get("device", "cpu")
    report = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
                          "accelerator": torch.cuda.get_device_name() if device.startswith("cuda") else None}}
    if "sjd" in suites:
        sjd_kw = {k: v for k, v in kw.items() if k != "paradigm_eval_per_category"}
        report["sjd"] = bench_sjd(model_dir, progress=progress, guidance_scale=guidance_scale, **sjd_kw)
    if "decode" in suites and "sjd" in report:  # the sjd suite measured the same block already: not twice
        report["decode"] = report["sjd"]["hf_generate"]
    elif "decode" in suites:
        report["decode"] = bench_hf_generate(load_pipeline(model_dir).to(device), kw.get("batch_sizes", (1, 8, 32)),
                                             repeats=kw.get("repeats", 8))
    if "watermark" in suites:
        pipe = load_pipeline(model_dir).to(device)
        report["watermark"] = attack_suite(pipe, n_images=watermark_images, guidance_scale=guidance_scale,
                                           delta=watermark_delta, progress=progress,
                                           set_sizes=tuple(watermark_set_sizes))
        if watermark_fpr_images:
            report["watermark"]["clean_fpr"] = clean_fpr(pipe, watermark_fpr_images, guidance_scale=guidance_scale,
                                                         progress=progress)
    paradigm_kw = dict(progress=progress, guidance_scale=guidance_scale,
                       **_pick(kw, "batch_sizes", "repeats", "device"),
                       eval_per_category=kw.get("paradigm_eval_per_category", 0),
                       eval_split=kw.get("eval_split", "heldout"))
    if "paradigms" in suites:
        report["paradigms"] = bench_paradigms(models, baseline=model_dir, **paradigm_kw)
    if "memory" in suites:
        report["memory"] = bench_memory(model_dir, batch_sizes=kw.get("batch_sizes", (1, 8)), progress=progress)
    if "shuffle" in suites:
        report["shuffle"] = bench_shuffle(shuffle_windows, grid=shuffle_grid, models=models, baseline=model_dir,
                                          **paradigm_kw)
    return report
