"""The shuffle suite (`mmgen bench --suite shuffle`): Token-Shuffle windows s = 1, 2, 4 on one token grid.

Freshly initialised `TokenShuffleTransformer`s of the same width and depth, built in this process, give decoder
tokens per image, forward passes, the time of one training step (forward + backward of one batch) and sampling
latency, each as a ratio against s = 1; with `models`, trained pipelines (plain or Token-Shuffle) also go through
the paradigms suite against the baseline. Anchor: Token-Shuffle cuts the token count by s^2 and reached 2048x2048
with a 2.7B model (arXiv 2504.17789).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmgen.bench.common import synchronize, timed
from mmgen.bench.paradigms import bench_paradigms
from mmgen.models.shuffle import TokenShuffleTransformer
from mmgen.paradigms import token_shuffle
from mmgen.pipelines.base import DEFAULT_GUIDANCE_SCALE, generators_from_seed
from mmgen.sampling.logits import SamplingConfig
from mmgen.text import UnifiedVocab


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
            synchronize(device)
        _, train_seconds = timed(train_step, repeats)
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
                synchronize(device)
                return out
            outs, seconds[b] = timed(call, repeats)
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
