"""The sjd suite (`mmgen bench --suite sjd`): plain AR against every speculative Jacobi decoding mode on a saved
next-token pipeline, over 32 different held-out prompts per figure: forward passes, step compression, mean
accepted length and speedup at batch 1, 8 and 32; where one call's time goes (decoder passes against the rest);
window and tree-width sweeps; compositional accuracy with the same seeds; then the decode suite's block.
"""

from __future__ import annotations

import statistics
import time

from tqdm.auto import tqdm

from mmgen.bench.common import distinct_prompts, guidance
from mmgen.bench.decode import bench_hf_generate
from mmgen.data.shapes import CATEGORIES, heldout_prompts, train_prompts
from mmgen.eval.compositional import evaluate
from mmgen.paradigms.next_token import NextTokenBackend
from mmgen.pipelines import load_pipeline
from mmgen.pipelines.base import generators_from_seed, sjd_config, sjd_neighbours
from mmgen.sampling.logits import SamplingConfig
from mmgen.sampling.sjd import jacobi_sample
from mmgen.text import encode_prompts


def _sjd_modes(inits, window: int, lantern_delta: float, compiled: bool = True, tree_depth: int = 4) -> dict:
    """Plain AR (eager, and compiled with `compiled`) and every SJD mode the pipelines offer, with the call
    options that select it."""
    sjd = dict(sampler="sjd", sjd_window=window)
    modes = {"ar": dict(sampler="ar")}
    if compiled:
        modes["ar_compiled"] = dict(sampler="ar", compile_decode=True)
    modes["sjd"] = sjd
    modes |= {f"sjd_{init}": sjd | dict(sjd_init=init) for init in inits if init != "random"}
    modes["sjd_coupled"] = sjd | dict(sjd_coupled=True)
    modes["sjd_adaptive"] = sjd | dict(sjd_coupled=True, sjd_adaptive=True)
    modes["sjd_tree"] = sjd | dict(sjd_coupled=True, sjd_tree_width=3, sjd_tree_depth=tree_depth)
    modes["sjd_tree_adaptive"] = modes["sjd_tree"] | dict(sjd_adaptive=True)
    modes["sjd_lantern"] = sjd | dict(sjd_coupled=True, sjd_lantern_delta=lantern_delta)
    return modes


class _TimedBackend:
    """A `JacobiBackend` that times its decoder passes and records their widths (the profile of a call)."""

    def __init__(self, backend):
        self.backend, self.seconds, self.widths = backend, 0.0, []
        self.num_samples, self.vocab_size, self.device = backend.num_samples, backend.vocab_size, backend.device
        self.use_cfg, self.supports_leaves = backend.use_cfg, backend.supports_leaves

    def forward(self, window, n, **leaves):
        t0 = time.perf_counter()
        out = self.backend.forward(window, n, **leaves)
        self.seconds += time.perf_counter() - t0
        self.widths.append(window.shape[1])
        return out

    def keep(self, keep):
        self.backend.keep(keep)


def sjd_pass_profile(pipe, prompts, sjd_kw: dict, guidance_scale: float, seed: int = 0) -> dict:
    """Where one SJD call's time goes: the decoder's forward passes against everything else (drafting,
    verification, sampling), with the passes' mean width and time per pass."""
    layout = pipe.layout
    opts = pipe.call_options | sjd_kw  # the pipeline's own defaults for what the mode leaves out
    sjd = sjd_config("sjd", *(opts[f"sjd_{k}"] for k in ("window", "init", "coupled", "adaptive", "lantern_delta",
                                                          "lantern_k", "tree_width", "tree_depth")))
    text = encode_prompts(pipe.tokenizer, prompts, layout.max_text_len)
    backend = _TimedBackend(NextTokenBackend(pipe.transformer, layout, text, guidance_scale, sjd.window,
                                             leaves=sjd.tree_width * sjd.tree_depth))
    t0 = time.perf_counter()
    _, stats = jacobi_sample(backend, layout.num_image_tokens, SamplingConfig(guidance_scale), sjd,
                             generators_from_seed(seed, len(prompts)), grid_width=layout.grid[1],
                             neighbours=sjd_neighbours(pipe.visual_tokenizer, sjd))
    total = time.perf_counter() - t0
    return {"passes": stats.decoder_passes, "mean_width": round(statistics.mean(backend.widths), 2),
            "seconds": round(total, 4), "forward_seconds": round(backend.seconds, 4),
            "forward_share": round(backend.seconds / total, 3),
            "ms_per_pass": round(1000 * total / stats.decoder_passes, 3)}


def bench_sjd(model_dir, batch_sizes=(1, 8, 32), inits=(), window: int = 16, repeats: int = 2,
              num_prompts: int = 32, lantern_delta: float = 0.1, eval_per_category: int = 16,
              guidance_scale: float | None = None, seed: int = 0, sweep_windows=(4, 8, 16, 32),
              tree_widths=(0, 1, 3, 7), tree_depth: int = 4, eval_split: str = "train", device: str = "cpu",
              compiled: bool = True, progress: bool = True) -> dict:
    """Plain AR against every SJD mode on a saved next-token pipeline, at its own guidance scale unless
    `guidance_scale` is given. Each figure covers `num_prompts` different held-out prompts, generated in
    batches of each size (one seed per image); latency is the median over `repeats` passes over all of them,
    modes interleaved. `lossless` marks the exact modes; `sjd_lantern` is the lossy one (`lantern_delta`).
    `compiled`: also time AR through the compiled decode step (`ar_compiled`; its compile, once per batch size,
    falls in the untimed warm-up; its tokens are AR's, so it is left out of the accuracy check)."""
    pipe = load_pipeline(model_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    guidance_scale = guidance(pipe, guidance_scale)
    modes = _sjd_modes(inits, window, lantern_delta, compiled, tree_depth)
    tree_widths = (0,) + tuple(w for w in dict.fromkeys(tree_widths) if w)  # the chain first: the sweep's baseline
    n_img = pipe.layout.num_image_tokens
    prompts = distinct_prompts(heldout_prompts, num_prompts, seed)
    report = {"model": str(model_dir), "tokens_per_image": n_img, "window": window, "num_prompts": num_prompts,
              "guidance_scale": guidance_scale, "lantern_delta": lantern_delta, "latency": {}, "pass_profile": {},
              "accuracy": {}}

    def run(kw, b, r):
        outs = []
        for i in range(0, num_prompts, b):
            chunk = prompts[i:i + b]
            outs.append(pipe(prompt=chunk, guidance_scale=guidance_scale, output_type="pt",
                             generator=generators_from_seed(seed + 1000 * r + i, len(chunk)), **kw))
        return outs

    scored = [name for name in modes if name != "ar_compiled"]  # modes whose accuracy is checked
    steps = len(batch_sizes) * len(modes) * (repeats + 1) + len(sweep_windows) + len(tree_widths) + len(scored)
    bar = tqdm(total=steps, desc="bench sjd", disable=not progress)
    for b in batch_sizes:
        seconds = {name: [] for name in modes}
        outs = {}
        for name, kw in modes.items():  # warm-up
            pipe(prompt=prompts[:b], guidance_scale=guidance_scale, output_type="pt", **kw)
            bar.update()
        for r in range(repeats):
            for name, kw in modes.items():
                t0 = time.perf_counter()
                outs[name] = run(kw, b, r)
                seconds[name].append(time.perf_counter() - t0)
                bar.update()
        ar_seconds = statistics.median(seconds["ar"])
        rows = {}
        for name, kw in modes.items():
            sec = statistics.median(seconds[name])
            passes = statistics.mean(o.decoder_passes for o in outs[name])
            rows[name] = {"lossless": all(o.lossless for o in outs[name]), "passes_per_call": round(passes, 2),
                          "step_compression": round(n_img / passes, 3),
                          "mean_accepted_length": round(statistics.mean(o.mean_accepted_length for o in outs[name]), 3),
                          "seconds_per_image": round(sec / num_prompts, 4),
                          "speedup": round(ar_seconds / sec, 3)}
        report["latency"][f"batch_{b}"] = rows
        report["pass_profile"][f"batch_{b}"] = {
            name: sjd_pass_profile(pipe, prompts[:b], modes[name], guidance_scale, seed)
            for name in ("sjd", "sjd_adaptive", "sjd_tree")}

    # window sweep at batch 1 over the same prompts, coupled drafts
    sweep, ar_b1 = {}, report["latency"].get("batch_1", {}).get("ar")
    for w in sweep_windows:
        t0 = time.perf_counter()
        outs = run(dict(sampler="sjd", sjd_window=w, sjd_coupled=True), 1, 0)
        sec = time.perf_counter() - t0
        sweep[f"window_{w}"] = {
            "step_compression": round(n_img / statistics.mean(o.decoder_passes for o in outs), 3),
            "seconds_per_image": round(sec / num_prompts, 4),
            "speedup": round(ar_b1["seconds_per_image"] * num_prompts / sec, 3) if ar_b1 else None}
        bar.update()
    report["window_sweep_batch_1"] = sweep

    # token trees at batch 1: what each extra candidate per position buys against what it costs
    trees, chain = {}, None
    for width in tree_widths:
        t0 = time.perf_counter()
        outs = run(dict(sampler="sjd", sjd_window=window, sjd_coupled=True, sjd_tree_width=width,
                        sjd_tree_depth=tree_depth),
                   1, 0)
        sec = time.perf_counter() - t0
        row = {"step_compression": round(n_img / statistics.mean(o.decoder_passes for o in outs), 3),
               "seconds_per_image": round(sec / num_prompts, 4)}
        chain = chain or row
        row["compression_gain"] = round(row["step_compression"] / chain["step_compression"], 3)
        row["time_ratio"] = round(row["seconds_per_image"] / chain["seconds_per_image"], 3)
        trees[f"tree_width_{width}"] = row
        bar.update()
    report["tree_sweep_batch_1"] = trees
    report["tree_depth"] = tree_depth

    make_prompts = {"heldout": heldout_prompts, "train": train_prompts}[eval_split]
    eval_prompts = [p for c in CATEGORIES for p in make_prompts(eval_per_category, seed=seed, category=c)]
    report["accuracy_split"] = eval_split
    for name in scored:
        kw = modes[name]
        images = []
        for i in range(0, len(eval_prompts), 8):
            chunk = eval_prompts[i:i + 8]
            images.extend(pipe(prompt=chunk, guidance_scale=guidance_scale,
                               generator=generators_from_seed(seed + i, len(chunk)), **kw).images)
        scores = evaluate(images, eval_prompts)
        report["accuracy"][name] = {"accuracy": scores["accuracy"], "n": scores["n"],
                                    "per_category": scores["per_category"],
                                    "lossless": report["latency"][f"batch_{batch_sizes[0]}"][name]["lossless"]}
        bar.update()
    bar.close()
    report["hf_generate"] = bench_hf_generate(pipe, batch_sizes, repeats=max(repeats, 3), seed=seed)
    return report
