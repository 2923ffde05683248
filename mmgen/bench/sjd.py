"""The sjd suite (`mmgen bench --suite sjd`): every speculative Jacobi decoding mode against plain AR, eager and
through the compiled decode step, on a saved next-token pipeline over `num_prompts` different held-out prompts per
figure, at each batch size: forward passes, step compression, mean accepted length, speedup against both
baselines, and whether each exact mode's greedy tokens are AR's. Then: the verify pass's time against its width,
eager and compiled (`pass_time`); tokens committed per pass against a fixed width (`accepted_by_width`); where a
call's time goes (`pass_profile`); window and tree-width sweeps; compositional accuracy with the same seeds; and
the decode suite's block (mmgen's AR decode against transformers' `generate()`).
"""

from __future__ import annotations

import statistics
import time

import torch
from tqdm.auto import tqdm

from mmgen.bench.common import distinct_prompts, guidance
from mmgen.bench.decode import bench_hf_generate
from mmgen.data.shapes import CATEGORIES, heldout_prompts, train_prompts
from mmgen.eval.compositional import evaluate
from mmgen.models.compiled_decode import compiled_decode_step
from mmgen.paradigms.next_token import NextTokenBackend, decode_step, window_pass_cost
from mmgen.pipelines import load_pipeline
from mmgen.pipelines.base import generators_from_seed, sjd_config, sjd_neighbours
from mmgen.sampling.logits import SamplingConfig
from mmgen.sampling.sjd import jacobi_sample, speculation_pays
from mmgen.text import encode_prompts

BASELINES = {"ar": "speedup", "ar_compiled": "speedup_vs_compiled"}  # baseline mode -> its ratio's name


def sjd_modes(inits=(), window: int = 16, lantern_delta: float = 0.1, compiled: bool = True,
              tree_depth: int = 4) -> dict:
    """Plain AR (eager, and compiled with `compiled`) and every SJD mode the pipelines offer, with the call options
    that select it: the SJD acceptance's (plain, coupled, adaptive, tree, LANTERN) and shared-noise verification's
    (`sjd_shared`); with `compiled`, also shared noise through the compiled verify pass, fixed and adaptive."""
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
    modes["sjd_shared"] = sjd | dict(sjd_shared_noise=True)
    if compiled:
        modes["sjd_compiled"] = modes["sjd_shared"] | dict(compile_decode=True)
        modes["sjd_compiled_adaptive"] = modes["sjd_compiled"] | dict(sjd_adaptive=True)
    return modes


def _calls(pipe, prompts, b: int, kw: dict, guidance_scale: float, seed: int, **extra) -> list:
    """The pipeline's outputs for `prompts` in batches of b, one seed per image."""
    return [pipe(prompt=prompts[i:i + b], guidance_scale=guidance_scale, output_type="pt",
                 generator=generators_from_seed(seed + i, len(prompts[i:i + b])), **kw, **extra)
            for i in range(0, len(prompts), b)]


def latency_rows(pipe, prompts, modes: dict, b: int, guidance_scale: float, repeats: int, seed: int,
                 bar=None) -> dict:
    """Each mode over all prompts in batches of b after an untimed warm-up call (compiles happen there): passes,
    compression, accepted length, seconds per image (median of `repeats` passes over the prompts, modes
    interleaved) and its speedup against each baseline present."""
    seconds, outs = {name: [] for name in modes}, {}
    for kw in modes.values():
        pipe(prompt=prompts[:b], guidance_scale=guidance_scale, output_type="pt", **kw)
        if bar is not None:
            bar.update()
    for r in range(repeats):
        for name, kw in modes.items():
            t0 = time.perf_counter()
            outs[name] = _calls(pipe, prompts, b, kw, guidance_scale, seed + 1000 * r)
            seconds[name].append(time.perf_counter() - t0)
            if bar is not None:
                bar.update()
    n_img, rows = pipe.layout.num_image_tokens, {}
    median = {name: statistics.median(s) for name, s in seconds.items()}
    for name in modes:
        passes = statistics.mean(o.decoder_passes for o in outs[name])
        rows[name] = {"lossless": all(o.lossless for o in outs[name]), "passes_per_call": round(passes, 2),
                      "step_compression": round(n_img / passes, 3),
                      "mean_accepted_length": round(statistics.mean(o.mean_accepted_length for o in outs[name]), 3),
                      "seconds_per_image": round(median[name] / len(prompts), 4)}
        rows[name] |= {ratio: round(median[base] / median[name], 3) for base, ratio in BASELINES.items()
                       if base in median}
        kw = modes[name]
        if name != "ar" and (kw.get("sampler") == "ar" or kw.get("sjd_shared_noise")):
            # these sample AR's own tokens for the same seeds (up to float rounding where compiled)
            same = [torch.equal(a, b) for o, r in zip(outs[name], outs["ar"]) for a, b in zip(o.tokens, r.tokens)]
            rows[name]["tokens_equal_ar"] = round(sum(same) / len(same), 3)
    return rows


def greedy_check(pipe, prompts, modes: dict, b: int, guidance_scale: float) -> dict:
    """Whether each exact mode's greedy tokens (temperature 0) equal plain AR's on `prompts` in one batch of b: an
    exact sampler commits the argmax AR would, whatever its drafts."""
    ar = torch.cat([o.tokens for o in _calls(pipe, prompts, b, modes["ar"], guidance_scale, 0, temperature=0)])
    same = {}
    for name, kw in modes.items():
        if name != "ar" and "sjd_lantern_delta" not in kw:
            out = torch.cat([o.tokens for o in _calls(pipe, prompts, b, kw, guidance_scale, 0, temperature=0)])
            same[name] = torch.equal(out, ar)
    return same


def _sjd_of(pipe, kw: dict):
    opts = pipe.call_options | kw  # the pipeline's own defaults for what the mode leaves out
    return sjd_config("sjd", *(opts[f"sjd_{k}"] for k in ("window", "init", "coupled", "adaptive", "lantern_delta",
                                                           "lantern_k", "tree_width", "tree_depth", "shared_noise")))


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
    verification, sampling), with the passes' mean width and time per pass. A compiled adaptive call that would
    go to plain AR (`ar_fallback`) is profiled as SJD all the same."""
    layout, sjd, compiled = pipe.layout, _sjd_of(pipe, sjd_kw), sjd_kw.get("compile_decode", False)
    text = encode_prompts(pipe.tokenizer, prompts, layout.max_text_len)
    backend = _TimedBackend(NextTokenBackend(pipe.transformer, layout, text, guidance_scale, sjd.window,
                                             leaves=sjd.tree_width * sjd.tree_depth, compile=compiled))
    cost = None
    if compiled and sjd.adaptive:
        cost = window_pass_cost(pipe.transformer, sjd, backend.backend, backend.backend.prefix + 1 +
                                layout.num_image_tokens)
    t0 = time.perf_counter()
    _, stats = jacobi_sample(backend, layout.num_image_tokens, SamplingConfig(guidance_scale), sjd,
                             generators_from_seed(seed, len(prompts)), grid_width=layout.grid[1],
                             neighbours=sjd_neighbours(pipe.visual_tokenizer, sjd), cost=cost)
    total = time.perf_counter() - t0
    rows = len(prompts) * (2 if backend.use_cfg else 1)
    return {"passes": stats.decoder_passes, "mean_width": round(statistics.mean(backend.widths), 2),
            "seconds": round(total, 4), "forward_seconds": round(backend.seconds, 4),
            "forward_share": round(backend.seconds / total, 3),
            "ms_per_pass": round(1000 * total / stats.decoder_passes, 3),
            "ar_fallback": cost is not None and not speculation_pays(cost, sjd, len(prompts), rows,
                                                                     layout.num_image_tokens)}


@torch.no_grad()
def pass_time(pipe, b: int, guidance_scale: float, widths=(1, 2, 4, 8, 16), repeats: int = 10,
              compiled: bool = True) -> dict:
    """Milliseconds of one verify pass at each width for b samples (their rows a third into the image), eager and
    through the compiled window step, beside one AR decode step, eager and compiled (same rows, same cache slot);
    medians over `repeats`, everything interleaved."""
    model, layout = pipe.transformer, pipe.layout
    text = encode_prompts(pipe.tokenizer, heldout_prompts(b, seed=0), layout.max_text_len)
    window, n = max(widths), torch.full((b,), layout.num_image_tokens // 3, device=model.device)
    backends = {"eager": NextTokenBackend(model, layout, text, guidance_scale, window)}
    if compiled:
        backends["compiled"] = NextTokenBackend(model, layout, text, guidance_scale, window, compile=True)
    for be in backends.values():  # the prompt pass
        be.forward(torch.zeros(b, 1, dtype=torch.long, device=model.device), torch.zeros_like(n))
    be = backends["eager"]
    rows, (cos, sin), slot = be.cache.batch_size, be.rope, be.prefix + int(n[0])
    cache = model.new_cache(rows, be.capacity)
    bias = torch.zeros(rows, be.capacity, device=model.device)
    bias[:, slot + 1:] = float("-inf")
    token = torch.full((rows,), layout.vocab.image_offset, device=model.device)
    image_rows = (layout.vocab.image_offset, layout.vocab.image_vocab_size)

    compiled_step = compiled_decode_step(model) if compiled else None

    def ar_step(kind):  # as `next_token.generate` runs it
        cache.length = slot
        rope = cos[slot: slot + 1], sin[slot: slot + 1]
        if kind == "compiled":
            compiled_step(token, *rope, bias, cache, head_rows=image_rows)
        else:
            decode_step(model, token, None, bias, cache, rope=(rope[0][None], rope[1][None]))[:, image_rows[0]:]

    steps = ("eager", "compiled") if compiled else ("eager",)
    times = {(kind, w): [] for kind in backends for w in widths} | {("ar", kind): [] for kind in steps}
    for r in range(repeats + 1):  # the first round warms up (and compiles)
        for w in widths:
            drafts = torch.randint(0, layout.vocab.image_vocab_size, (b, w), device=model.device)
            for kind, backend in backends.items():
                t0 = time.perf_counter()
                backend.forward(drafts, n)
                if r:
                    times[kind, w].append(time.perf_counter() - t0)
        for kind in steps:
            t0 = time.perf_counter()
            ar_step(kind)
            if r:
                times["ar", kind].append(time.perf_counter() - t0)
    ms = {key: round(1000 * statistics.median(t), 3) for key, t in times.items()}
    return {"rows": rows, "ar_step_ms": {kind: ms["ar", kind] for kind in steps},
            "verify_pass_ms": {f"width_{w}": {kind: ms[kind, w] for kind in backends} for w in widths}}


# what each lossless drafting / verification scheme commits per pass at a fixed width: SJD's acceptance with coupled
# drafts (random or the token above as the new slots' drafts: drafting from the previous image row), and shared noise
DRAFTING = {"coupled": dict(sjd_coupled=True), "coupled_above": dict(sjd_coupled=True, sjd_init="above"),
            "shared": dict(sjd_shared_noise=True), "shared_above": dict(sjd_shared_noise=True, sjd_init="above")}


def accepted_by_width(pipe, prompts, widths, guidance_scale: float, seed: int) -> dict:
    """Tokens committed per pass (= step compression at batch 1) at each fixed width for each scheme of `DRAFTING`,
    eager (acceptance does not depend on compilation)."""
    table = {}
    for name, kw in DRAFTING.items():
        for w in widths:
            outs = _calls(pipe, prompts, 1, dict(sampler="sjd", sjd_window=w) | kw, guidance_scale, seed)
            table[f"{name}_width_{w}"] = round(statistics.mean(o.mean_accepted_length for o in outs), 3)
    return table


def _sweeps(pipe, prompts, window: int, windows, tree_widths, tree_depth: int, guidance_scale: float, seed: int,
            ar_seconds_per_image: float | None) -> dict:
    """Batch-1 sweeps over the window width and over the extra candidates of a token tree (the chain first, as its
    baseline), coupled drafts, eager."""
    n_img, report = pipe.layout.num_image_tokens, {"window_sweep_batch_1": {}, "tree_sweep_batch_1": {}}

    def timed(kw):
        t0 = time.perf_counter()
        outs = _calls(pipe, prompts, 1, kw, guidance_scale, seed)
        sec = (time.perf_counter() - t0) / len(prompts)
        return {"step_compression": round(n_img / statistics.mean(o.decoder_passes for o in outs), 3),
                "seconds_per_image": round(sec, 4)}, sec

    for w in windows:
        row, sec = timed(dict(sampler="sjd", sjd_window=w, sjd_coupled=True))
        row["speedup"] = round(ar_seconds_per_image / sec, 3) if ar_seconds_per_image else None
        report["window_sweep_batch_1"][f"window_{w}"] = row
    chain = None
    for width in (0,) + tuple(w for w in dict.fromkeys(tree_widths) if w) if tree_widths else ():
        row, _ = timed(dict(sampler="sjd", sjd_window=window, sjd_coupled=True, sjd_tree_width=width,
                            sjd_tree_depth=tree_depth))
        chain = chain or row
        row["compression_gain"] = round(row["step_compression"] / chain["step_compression"], 3)
        row["time_ratio"] = round(row["seconds_per_image"] / chain["seconds_per_image"], 3)
        report["tree_sweep_batch_1"][f"tree_width_{width}"] = row
    return report


def accuracy(pipe, modes: dict, per_category: int, split: str, guidance_scale: float, seed: int) -> dict:
    """Compositional accuracy of each mode with the same seeds (the compiled modes sample what their eager twins do,
    up to float rounding, and are left out)."""
    make = {"heldout": heldout_prompts, "train": train_prompts}[split]
    prompts = [p for c in CATEGORIES for p in make(per_category, seed=seed, category=c)]
    report = {}
    for name, kw in modes.items():
        if kw.get("compile_decode"):
            continue
        images = []
        for i in range(0, len(prompts), 8):
            chunk = prompts[i:i + 8]
            images.extend(pipe(prompt=chunk, guidance_scale=guidance_scale,
                               generator=generators_from_seed(seed + i, len(chunk)), **kw).images)
        scores = evaluate(images, prompts)
        report[name] = {"accuracy": scores["accuracy"], "n": scores["n"], "per_category": scores["per_category"],
                        "lossless": "sjd_lantern_delta" not in kw}
    return report


def bench_sjd(model_dir, batch_sizes=(1, 8, 32), inits=(), window: int = 16, repeats: int = 2,
              num_prompts: int = 32, lantern_delta: float = 0.1, eval_per_category: int = 16,
              guidance_scale: float | None = None, seed: int = 0, sweep_windows=(4, 8, 16, 32),
              tree_widths=(0, 1, 3, 7), tree_depth: int = 4, eval_split: str = "train", device: str = "cpu",
              compiled: bool = True, pass_widths=(1, 2, 4, 8, 16), accept_widths=(2, 4, 8, 16),
              profile: bool = True, hf_generate: bool = True, modes=None, progress: bool = True) -> dict:
    """Plain AR against every SJD mode on a saved next-token pipeline, at its own guidance scale unless
    `guidance_scale` is given; each figure covers `num_prompts` different held-out prompts in batches of each size.
    `lossless` marks the exact modes; `sjd_lantern` is the lossy one (`lantern_delta`). `compiled`: also the
    compiled AR step (`ar_compiled`, the second baseline) and the compiled SJD modes (their compiles, once per
    shape, fall in untimed warm-ups). `modes`: the names of `sjd_modes` to run (default all; the baselines always
    run).
    Empty `pass_widths` / `accept_widths` / `sweep_windows` / `tree_widths`, and `eval_per_category` 0, `profile` /
    `hf_generate` False, leave those blocks out."""
    pipe = load_pipeline(model_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    guidance_scale = guidance(pipe, guidance_scale)
    all_modes = sjd_modes(inits, window, lantern_delta, compiled, tree_depth)
    unknown = sorted(set(modes or ()) - set(all_modes))
    if unknown:
        raise ValueError(f"modes must be among {', '.join(all_modes)}; got {', '.join(unknown)}")
    modes = {k: v for k, v in all_modes.items() if modes is None or k in BASELINES or k in modes}
    n_img = pipe.layout.num_image_tokens
    prompts = distinct_prompts(heldout_prompts, num_prompts, seed)
    report = {"model": str(model_dir), "tokens_per_image": n_img, "window": window, "num_prompts": num_prompts,
              "guidance_scale": guidance_scale, "lantern_delta": lantern_delta, "baselines": BASELINES,
              "latency": {}, "greedy_equals_ar": {}, "pass_time": {}, "pass_profile": {}}
    bar = tqdm(total=len(batch_sizes) * len(modes) * (repeats + 1), desc="bench sjd", disable=not progress)
    for b in batch_sizes:
        key = f"batch_{b}"
        report["latency"][key] = latency_rows(pipe, prompts, modes, b, guidance_scale, repeats, seed, bar)
        report["greedy_equals_ar"][key] = greedy_check(pipe, prompts[:b], modes, b, guidance_scale)
        if pass_widths:
            report["pass_time"][key] = pass_time(pipe, b, guidance_scale, pass_widths, compiled=compiled)
        if profile:
            report["pass_profile"][key] = {name: sjd_pass_profile(pipe, prompts[:b], modes[name], guidance_scale, seed)
                                           for name in ("sjd", "sjd_adaptive", "sjd_compiled_adaptive")
                                           if name in modes}
    bar.close()
    if accept_widths:
        report["accepted_by_width_batch_1"] = accepted_by_width(pipe, prompts, accept_widths, guidance_scale, seed)
    ar_b1 = report["latency"].get("batch_1", {}).get("ar", {}).get("seconds_per_image")
    report |= _sweeps(pipe, prompts, window, sweep_windows, tree_widths, tree_depth, guidance_scale, seed, ar_b1)
    report["tree_depth"] = tree_depth
    if eval_per_category:
        report["accuracy_split"] = eval_split
        report["accuracy"] = accuracy(pipe, modes, eval_per_category, eval_split, guidance_scale, seed)
    if hf_generate:
        report["hf_generate"] = bench_hf_generate(pipe, batch_sizes, repeats=max(repeats, 3), seed=seed)
    return report
