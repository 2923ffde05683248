"""Benchmarks behind `mmgen bench` and `scripts/benchmark.py`.

Every figure is a ratio against a baseline run in the same process on the same machine (plain AR sampling
for the sampling stages, mmgen's own decode loop for transformers' `generate()`), so the numbers travel
between machines better than raw seconds. Latencies are medians over repeated calls after a warm-up call.

Suites
  sjd: plain AR vs every speculative Jacobi decoding mode (plain, coupled drafts, adaptive widths, token
       trees, and the lossy LANTERN acceptance, each row marked `lossless`) on a saved next-token pipeline,
       over 32 different held-out prompts per figure: forward passes, step compression, mean accepted length
       and speedup at batch 1, 8 and 32; where one call's time goes (decoder passes vs the rest); window and
       tree-width sweeps; compositional accuracy with the same seeds; then mmgen's AR decode against
       transformers' `LlamaForCausalLM.generate()` on the same weights.
  decode: that last comparison alone (mmgen's AR decode, eager and compiled, against `generate()`; batch sizes
       default 1 8 32, 8 repeats each, a different held-out prompt per repeat).
  watermark: C-reweight vs token-reweight and KGW (token, cluster) under image attacks: TPR at 1% FPR,
       empirical FPR, AUC and re-tokenization match rates (`mmgen.bench.watermark.attack_suite`).
  paradigms: every saved model (default: the shipped zoo) against the raster next-token model on the same
       prompts and seeds: decoder forward passes per image, tokens per image, parameters, latency ratio at
       each batch size, and optionally compositional accuracy. Anchor: VAR needs 10 passes where raster
       next-token needs 256 (16x16 tokens); here 6 scales against 64 tokens.
  shuffle: Token-Shuffle windows s = 1, 2, 4 on one token grid: freshly initialised `TokenShuffleTransformer`s of
       the same width and depth, built in this process, give decoder tokens per image, forward passes, the
       time of one training step (forward + backward of one batch) and sampling latency, each as a ratio
       against s = 1; with `--models`, trained pipelines (plain or Token-Shuffle) also go through the
       paradigms suite against `--model` for compositional accuracy. Anchor: Token-Shuffle cuts the token
       count by s^2 and reached 2048x2048 with a 2.7B model (arXiv 2504.17789).
  memory: peak resident memory (RSS, MB) of generating with a saved next-token pipeline (default: the shipped
       model) at each batch size and of a few training steps of its decoder, each job in a fresh process so
       peaks never mix, beside the baseline of a process that only imports torch. CPU only. The issue's
       requirement: generating with the default model stays under 2 GB (`MEMORY_LIMIT_MB`).

Every suite samples at each model's own guidance scale (`default_guidance_scale` in its model_index.json, see
`mmgen models`) unless `guidance_scale` is given; the freshly initialised decoders of the shuffle suite have no
scale of their own and use the pipelines' `DEFAULT_GUIDANCE_SCALE`.
"""

from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmgen.zoo import DEFAULT_MODEL, zoo_models

SUITES = ("sjd", "decode", "watermark", "paradigms", "shuffle", "memory")


def _timed(fn, repeats: int):
    fn()  # warm-up
    results, seconds = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        results.append(fn(r))
        seconds.append(time.perf_counter() - t0)
    return results, statistics.median(seconds)


def _guidance(pipe, guidance_scale: float | None) -> float:
    """The scale a suite samples `pipe` at: the one given, else the model's own."""
    return pipe.config.default_guidance_scale if guidance_scale is None else guidance_scale


def distinct_prompts(make, n: int, seed: int = 0) -> list[str]:
    """The first n different prompts `make(k, seed)` draws (the caption generators can repeat a caption)."""
    for k in (n, 2 * n, 8 * n, 64 * n):
        unique = list(dict.fromkeys(make(k, seed=seed)))
        if len(unique) >= n:
            return unique[:n]
    raise ValueError(f"asked for {n} different prompts; the split has only {len(unique)}")


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
        self.use_cfg, self.supports_leaves = backend.use_cfg, getattr(backend, "supports_leaves", False)

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
    from mmgen.paradigms.next_token import NextTokenBackend
    from mmgen.pipelines.base import generators_from_seed, sjd_config, sjd_neighbours
    from mmgen.sampling.logits import SamplingConfig
    from mmgen.sampling.sjd import jacobi_sample
    from mmgen.text import encode_prompts

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
    from mmgen.data.shapes import CATEGORIES, heldout_prompts, train_prompts
    from mmgen.eval.compositional import evaluate
    from mmgen.pipelines import load_pipeline
    from mmgen.pipelines.base import generators_from_seed

    pipe = load_pipeline(model_dir).to(device)
    pipe.set_progress_bar_config(disable=True)
    guidance_scale = _guidance(pipe, guidance_scale)
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


def bench_hf_generate(pipe, batch_sizes=(1, 8), repeats: int = 5, seed: int = 0) -> dict:
    """mmgen's AR decode, eager and compiled (`compile=True`), vs `LlamaForCausalLM.generate()` holding the same
    weights, without CFG (transformers' own CFG runs a separate unconditional pass). The compile itself is timed
    apart (`compile_seconds`: once per batch size, less where inductor's disk cache has the kernels). Each timed
    repeat takes the next held-out prompt (a batch holds b images of it: the decode's cost does not depend on the
    words), the three interleaved; greedy tokens are compared on two prompts; latency is for sampling, the median
    over repeats."""
    from mmgen.data.shapes import heldout_prompts
    from mmgen.models.hf_llama import to_llama
    from mmgen.paradigms import next_token
    from mmgen.pipelines.base import generators_from_seed
    from mmgen.sampling.logits import SamplingConfig
    from mmgen.text import encode_prompts

    layout, vocab = pipe.layout, pipe.vocab
    hf = to_llama(pipe.transformer, grid_width=layout.grid[1])
    prompts = distinct_prompts(heldout_prompts, repeats + 1, seed)
    texts = encode_prompts(pipe.tokenizer, prompts, layout.max_text_len)
    off, n_img = vocab.image_offset, layout.num_image_tokens
    suppress = [i for i in range(vocab.size) if not off <= i < off + vocab.image_vocab_size]

    def hf_call(text, b, r, greedy=False):
        ids = torch.tensor([text + [vocab.boi]] * b, device=hf.device)
        if hasattr(hf.model.rotary_emb, "prefix_len"):
            hf.model.rotary_emb.prefix_len = len(text) + 1
        torch.manual_seed(seed + r)
        with torch.no_grad():
            out = hf.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=n_img,
                              min_new_tokens=n_img, do_sample=not greedy, top_k=0, top_p=1.0, temperature=1.0,
                              suppress_tokens=suppress, pad_token_id=vocab.pad)
        return out[:, ids.shape[1]:] - off

    def ours(text, b, r, greedy=False, compile=False):
        sampling = SamplingConfig(guidance_scale=1.0, temperature=0 if greedy else 1.0)
        codes, _ = next_token.generate(pipe.transformer, layout, [text] * b, sampling,
                                       generators_from_seed(seed + r, b), compile=compile)
        return codes.flatten(1)

    def compiled(text, b, r, greedy=False):
        return ours(text, b, r, greedy, compile=True)

    report = {"prompts": prompts[1:]}
    for b in batch_sizes:
        t0 = time.perf_counter()
        compiled(texts[0], b, 0)  # compiles the step for this batch size (kept on the model)
        compile_seconds = time.perf_counter() - t0
        same = {name: all(torch.equal(hf_call(t, b, 0, True), fn(t, b, 0, True)) for t in (texts[1], texts[-1]))
                for name, fn in (("eager", ours), ("compiled", compiled))}
        hf_call(texts[0], b, 0), ours(texts[0], b, 0)  # warm-up
        times = {hf_call: [], ours: [], compiled: []}
        for r, text in enumerate(texts[1:]):
            for fn, t in times.items():
                t0 = time.perf_counter()
                fn(text, b, r)
                t.append(time.perf_counter() - t0)
        t_hf, t_ours, t_comp = (statistics.median(t) for t in times.values())
        report[f"batch_{b}"] = {"greedy_tokens_identical": same["eager"],
                                "compiled_greedy_tokens_identical": same["compiled"],
                                "mmgen_seconds": round(t_ours, 4), "mmgen_compiled_seconds": round(t_comp, 4),
                                "compile_seconds": round(compile_seconds, 1),
                                "transformers_generate_seconds": round(t_hf, 4),
                                "generate_over_mmgen": round(t_hf / t_ours, 3),
                                "generate_over_mmgen_compiled": round(t_hf / t_comp, 3)}
    return report


def bench_paradigms(models: dict | None = None, baseline=None, batch_sizes=(1, 8), repeats: int = 5,
                    guidance_scale: float | None = None, seed: int = 0, eval_per_category: int = 0,
                    eval_split: str = "heldout", device: str = "cpu", progress: bool = True) -> dict:
    """Each model's sampling cost as ratios against the raster next-token `baseline` (default: the shipped
    default model), same prompts, seeds and batch sizes; each pipeline samples with its own defaults (its own
    guidance scale unless `guidance_scale` is given; flow models: 25 Euler steps per token / scale). With
    `eval_per_category`, compositional accuracy too."""
    from mmgen.data.shapes import CATEGORIES, heldout_prompts, train_prompts
    from mmgen.eval.compositional import evaluate
    from mmgen.pipelines import load_pipeline, paradigm_name
    from mmgen.pipelines.base import generators_from_seed

    models = {k: Path(v) for k, v in (models or zoo_models()).items()}
    baseline = Path(baseline or DEFAULT_MODEL)
    pipes = {}
    for name, d in {"baseline": baseline, **models}.items():
        pipes[name] = load_pipeline(d).to(device)
        pipes[name].set_progress_bar_config(disable=True)
    if paradigm_name(pipes["baseline"]) not in ("next_token", "token_shuffle"):
        raise ValueError(f"baseline {str(baseline)!r} must be a next_token model, got paradigm "
                         f"{paradigm_name(pipes['baseline'])!r}")
    report = {"baseline": str(baseline), "guidance_scale": guidance_scale, "models": {}}
    bar = tqdm(total=len(pipes) * (len(batch_sizes) + (1 if eval_per_category else 0)), desc="bench paradigms",
               disable=not progress)
    base_seconds = {}
    for name, pipe in pipes.items():
        scale = _guidance(pipe, guidance_scale)
        row = {"model": str(baseline if name == "baseline" else models[name]), "pipeline": type(pipe).__name__,
               "guidance_scale": scale, "decoder_parameters": sum(p.numel() for p in pipe.transformer.parameters()),
               "tokens_per_image": pipe.layout.num_image_tokens, "latency": {}}
        for b in batch_sizes:
            prompts = heldout_prompts(b, seed=seed)

            def call(r=0, pipe=pipe, prompts=prompts, b=b, scale=scale):
                return pipe(prompt=prompts, guidance_scale=scale, output_type="pt",
                            generator=generators_from_seed(seed + 1000 * r, b))
            outs, seconds = _timed(call, repeats)
            base_seconds.setdefault(b, seconds)  # the baseline runs first
            row["nfe_per_image"] = outs[0].decoder_passes
            if getattr(outs[0], "model_evals", None) is not None:  # xAR: the decoder also integrates the flow
                row["model_evals_per_image"] = outs[0].model_evals
            row["latency"][f"batch_{b}"] = {"seconds_per_call": round(seconds, 4),
                                            "latency_ratio": round(seconds / base_seconds[b], 3),
                                            "speedup": round(base_seconds[b] / seconds, 3)}
            bar.update()
        row["nfe_ratio"] = round(row["nfe_per_image"] / report["models"].get("baseline", row)["nfe_per_image"], 4)
        if eval_per_category:
            make = {"heldout": heldout_prompts, "train": train_prompts}[eval_split]
            prompts = [p for c in CATEGORIES for p in make(eval_per_category, seed=seed + 1, category=c)]
            images = []
            for i in range(0, len(prompts), 25):
                chunk = prompts[i:i + 25]
                images += pipe(prompt=chunk, guidance_scale=scale,
                               generator=generators_from_seed(seed + i, len(chunk))).images
            scores = evaluate(images, prompts)
            row["accuracy"] = {"split": eval_split, "accuracy": scores["accuracy"], "n": scores["n"],
                               "per_category": scores["per_category"]}
            bar.update()
        report["models"][name] = row
    bar.close()
    return report


def _synchronize(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def bench_shuffle(windows=(1, 2, 4), grid: int = 16, dim: int = 128, n_layers: int = 4, n_heads: int = 4,
                  image_vocab_size: int = 1024, max_text_len: int = 8, train_batch: int = 8, batch_sizes=(1, 8),
                  repeats: int = 5, guidance_scale: float | None = None, seed: int = 0, models: dict | None = None,
                  baseline=None, eval_per_category: int = 0, eval_split: str = "heldout", device: str = "cpu",
                  progress: bool = True) -> dict:
    """Token-Shuffle cost at windows `windows` (s = 1 added when missing) on a `grid` x `grid` token grid, as
    ratios against s = 1.

    Each window gets a freshly initialised `TokenShuffleTransformer` of the same width and depth (random
    weights: the figures are costs, not quality). With `models` (name -> saved pipeline directory), those go
    through `bench_paradigms` against `baseline` as well, with compositional accuracy when
    `eval_per_category` > 0, and each row records its shuffle window. `guidance_scale` None: the pipelines'
    `DEFAULT_GUIDANCE_SCALE` for the fresh decoders, each trained model's own for `models`."""
    import json

    from mmgen.models.shuffle import TokenShuffleTransformer
    from mmgen.paradigms import token_shuffle
    from mmgen.pipelines.base import DEFAULT_GUIDANCE_SCALE, generators_from_seed
    from mmgen.sampling.logits import SamplingConfig
    from mmgen.text import UnifiedVocab

    windows = (1,) + tuple(dict.fromkeys(s for s in windows if s != 1))  # s = 1, the baseline, runs first
    vocab = UnifiedVocab(text_vocab_size=32, image_vocab_size=image_vocab_size)
    g = torch.Generator().manual_seed(seed)
    n = max(train_batch, *batch_sizes)
    text_ids = [torch.randint(2, 32, (max_text_len // 2,), generator=g).tolist() for _ in range(n)]
    codes = torch.randint(0, image_vocab_size, (train_batch, grid, grid), generator=g).to(device)
    fresh_scale = DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale
    sampling = SamplingConfig(guidance_scale=fresh_scale)
    report = {"grid": [grid, grid], "codes_per_image": grid * grid, "dim": dim, "n_layers": n_layers,
              "train_batch": train_batch, "guidance_scale": fresh_scale, "windows": {}}
    bar = tqdm(total=len(windows) * (1 + len(batch_sizes)), desc="bench shuffle", disable=not progress)
    base = base_seconds = None
    for s in windows:
        layout = token_shuffle.TokenShuffleLayout.for_tokens(vocab, max_text_len, (grid, grid), s)
        torch.manual_seed(seed)
        model = TokenShuffleTransformer(vocab.size, image_vocab_size, shuffle_window=s, dim=dim, n_layers=n_layers,
                                        n_heads=n_heads, max_seq_len=layout.seq_len).to(device)
        batch = token_shuffle.build_batch(layout, text_ids[:train_batch], codes)

        def train_step(r=0, model=model, batch=batch, layout=layout):
            model.zero_grad(set_to_none=True)
            token_shuffle.loss_fn(model, batch, layout).backward()
            _synchronize(device)
        _, train_seconds = _timed(train_step, repeats)
        bar.update()
        model.eval()
        row = {"window": s, "tokens_per_image": layout.num_image_tokens, "sequence_length": layout.seq_len,
               "decoder_parameters": sum(p.numel() for p in model.parameters()),
               "train_step_seconds": round(train_seconds, 4), "latency": {}}
        seconds = {"train": train_seconds}  # unrounded, for the ratios
        for b in batch_sizes:
            def call(r=0, model=model, layout=layout, b=b):
                out = token_shuffle.generate(model, layout, text_ids[:b], sampling,
                                             generators_from_seed(seed + 1000 * r, b))
                _synchronize(device)
                return out
            outs, seconds[b] = _timed(call, repeats)
            row["nfe_per_image"] = outs[0][1].decoder_passes
            row["latency"][f"batch_{b}"] = {"seconds_per_call": round(seconds[b], 4)}
            bar.update()
        base, base_seconds = base or row, base_seconds or seconds  # s = 1 runs first
        row["token_ratio"] = round(row["tokens_per_image"] / base["tokens_per_image"], 4)
        row["nfe_ratio"] = round(row["nfe_per_image"] / base["nfe_per_image"], 4)
        row["train_step_ratio"] = round(seconds["train"] / base_seconds["train"], 3)
        row["train_speedup"] = round(base_seconds["train"] / seconds["train"], 3)
        for b in batch_sizes:
            lat = row["latency"][f"batch_{b}"]
            lat["latency_ratio"] = round(seconds[b] / base_seconds[b], 3)  # < 1: faster than s = 1
            lat["speedup"] = round(base_seconds[b] / seconds[b], 3)
        report["windows"][f"s{s}"] = row
        del model, batch
    bar.close()
    if models:
        trained = bench_paradigms(models, baseline=baseline, batch_sizes=batch_sizes, repeats=repeats,
                                  guidance_scale=guidance_scale, seed=seed, eval_per_category=eval_per_category,
                                  eval_split=eval_split, device=device, progress=progress)
        for row in trained["models"].values():
            config = json.loads((Path(row["model"]) / "transformer" / "config.json").read_text())
            row["shuffle_window"] = config.get("shuffle_window", 1)
        report["trained"] = trained
    return report


MEMORY_LIMIT_MB = 2048
# Runs in a fresh interpreter per job. On Linux the peak is VmHWM from /proc/self/status: the high-water mark of
# this process image alone. ru_maxrss would not do: Linux carries it across exec, so a child forked from a large
# parent (a test runner with torch loaded) reports the parent's size. Elsewhere ru_maxrss (bytes on macOS).
# The baseline job imports torch and nothing else.
_MEMORY_CHILD = """
import json, resource, sys
job = json.loads(sys.argv[1])
import torch
torch.set_num_threads(job["threads"])
if job["kind"] != "baseline":
    from mmgen.bench import _memory_workload
    _memory_workload(job)
try:
    with open("/proc/self/status") as f:
        peak = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) * 1024
except OSError:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * (1 if sys.platform == "darwin" else 1024)
print(json.dumps({"peak_rss_mb": peak / 2**20}))
"""


def _memory_workload(job: dict) -> None:
    """The work of one memory job, in the child process: generate `batch` images, or `steps` AdamW steps of the
    pipeline's decoder on random codes (batch `batch`, captions from the shapes prompts)."""
    from mmgen.data.shapes import heldout_prompts
    from mmgen.paradigms import next_token
    from mmgen.pipelines import load_pipeline, paradigm_name
    from mmgen.pipelines.base import generators_from_seed
    from mmgen.text import encode_prompts

    pipe = load_pipeline(job["model"])
    pipe.set_progress_bar_config(disable=True)
    b = job["batch"]
    prompts = heldout_prompts(b, seed=0)
    if job["kind"] == "generate":
        pipe(prompt=prompts, generator=generators_from_seed(0, b))
        return
    if paradigm_name(pipe) != "next_token":
        raise ValueError(f"the memory suite trains a plain next-token decoder; {job['model']!r} holds paradigm "
                         f"{paradigm_name(pipe)!r}")
    model, layout = pipe.transformer.train().requires_grad_(True), pipe.layout
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    g = torch.Generator().manual_seed(0)
    text_ids = encode_prompts(pipe.tokenizer, prompts, layout.max_text_len)
    for _ in range(job["steps"]):
        codes = torch.randint(0, layout.vocab.image_vocab_size, (b, *layout.grid), generator=g)
        loss = next_token.loss_fn(model, next_token.build_batch(layout, text_ids, codes, cond_drop_prob=0.1,
                                                                generator=g), layout)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def bench_memory(model_dir, batch_sizes=(1, 8), train_steps: int = 5, train_batch: int = 32, threads: int = 1,
                 progress: bool = True) -> dict:
    """Peak RSS (MB) of each job in its own process: torch import alone (baseline), generating at each batch
    size, and `train_steps` training steps at `train_batch`; `over_baseline_mb` is what the job itself adds."""
    import json
    import subprocess
    import sys

    jobs = {"baseline": dict(kind="baseline")}
    jobs |= {f"generate_batch_{b}": dict(kind="generate", batch=b) for b in batch_sizes}
    if train_steps:
        jobs["train"] = dict(kind="train", batch=train_batch, steps=train_steps)
    report = {"model": str(model_dir), "threads": threads, "limit_mb": MEMORY_LIMIT_MB, "jobs": {}}
    for name, job in tqdm(jobs.items(), desc="bench memory", disable=not progress):
        job = {**job, "model": str(model_dir), "threads": threads}
        proc = subprocess.run([sys.executable, "-c", _MEMORY_CHILD, json.dumps(job)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory job {name} failed:\n{proc.stderr[-2000:]}")
        peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        row = {k: job[k] for k in ("batch", "steps") if k in job}
        row["peak_rss_mb"] = round(peak, 1)
        if name != "baseline":
            row["over_baseline_mb"] = round(peak - report["jobs"]["baseline"]["peak_rss_mb"], 1)
        report["jobs"][name] = row
    report["generate_under_limit"] = all(r["peak_rss_mb"] < MEMORY_LIMIT_MB for n, r in report["jobs"].items()
                                         if n.startswith("generate"))
    return report


def run(suites=SUITES, model_dir=None, progress: bool = True, watermark_images: int = 100, models=None,
        shuffle_windows=(1, 2, 4), shuffle_grid: int = 16, guidance_scale: float | None = None,
        watermark_delta: float | None = None, watermark_fpr_images: int = 0, **kw) -> dict:
    """The suites `suites` (of `SUITES`) on `model_dir` (default: the shipped default model), at
    `guidance_scale` (None: each model's own), as one report with the machine they ran on."""
    unknown = [s for s in suites if s not in SUITES]
    if unknown:
        raise ValueError(f"--suite must be one of {', '.join(SUITES)}; got {', '.join(unknown)}")
    device = kw.get("device", "cpu")
    report = {"machine": {"platform": platform.platform(), "python": platform.python_version(),
                          "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
                          "accelerator": torch.cuda.get_device_name() if device.startswith("cuda") else None}}
    if "sjd" in suites:
        sjd_kw = {k: v for k, v in kw.items() if k != "paradigm_eval_per_category"}
        report["sjd"] = bench_sjd(model_dir or DEFAULT_MODEL, progress=progress, guidance_scale=guidance_scale,
                                  **sjd_kw)
    if "decode" in suites and "sjd" in report:  # the sjd suite measured the same block already: not twice
        report["decode"] = report["sjd"]["hf_generate"]
    elif "decode" in suites:
        from mmgen.pipelines import load_pipeline

        report["decode"] = bench_hf_generate(load_pipeline(model_dir or DEFAULT_MODEL).to(device),
                                             kw.get("batch_sizes", (1, 8, 32)), repeats=kw.get("repeats", 8))
    if "watermark" in suites:
        from mmgen.bench.watermark import attack_suite, clean_fpr
        from mmgen.pipelines import load_pipeline

        pipe = load_pipeline(model_dir or DEFAULT_MODEL).to(device)
        report["watermark"] = attack_suite(pipe, n_images=watermark_images, guidance_scale=guidance_scale,
                                           delta=watermark_delta, progress=progress)
        if watermark_fpr_images:
            report["watermark"]["clean_fpr"] = clean_fpr(pipe, watermark_fpr_images, guidance_scale=guidance_scale,
                                                         progress=progress)
    if "paradigms" in suites:
        report["paradigms"] = bench_paradigms(models, baseline=model_dir, progress=progress,
                                              guidance_scale=guidance_scale,
                                              **{k: kw[k] for k in ("batch_sizes", "repeats", "device") if k in kw},
                                              eval_per_category=kw.get("paradigm_eval_per_category", 0),
                                              eval_split=kw.get("eval_split", "heldout"))
    if "memory" in suites:
        report["memory"] = bench_memory(model_dir or DEFAULT_MODEL, batch_sizes=kw.get("batch_sizes", (1, 8)),
                                        progress=progress)
    if "shuffle" in suites:
        report["shuffle"] = bench_shuffle(shuffle_windows, grid=shuffle_grid, models=models, baseline=model_dir,
                                          progress=progress, guidance_scale=guidance_scale,
                                          **{k: kw[k] for k in ("batch_sizes", "repeats", "device") if k in kw},
                                          eval_per_category=kw.get("paradigm_eval_per_category", 0),
                                          eval_split=kw.get("eval_split", "heldout"))
    return report
