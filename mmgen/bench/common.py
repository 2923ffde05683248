"""What every benchmark suite shares: timing a call, the guidance scale a suite samples at, distinct prompts."""

from __future__ import annotations

import statistics
import time

import torch


def timed(fn, repeats: int):
    """`fn(r)` for r in range(repeats) after one warm-up call `fn()`: the results and the median seconds."""
    fn()
    results, seconds = [], []
    for r in range(repeats):
        t0 = time.perf_counter()
        results.append(fn(r))
        seconds.append(time.perf_counter() - t0)
    return results, statistics.median(seconds)


def guidance(pipe, guidance_scale: float | None) -> float:
    """The scale a suite samples `pipe` at: the one given, else the model's own."""
    return pipe.config.default_guidance_scale if guidance_scale is None else guidance_scale


def distinct_prompts(make, n: int, seed: int = 0) -> list[str]:
    """The first n different prompts `make(k, seed)` draws (the caption generators can repeat a caption)."""
    for k in (n, 2 * n, 8 * n, 64 * n):
        unique = list(dict.fromkeys(make(k, seed=seed)))
        if len(unique) >= n:
            return unique[:n]
    raise ValueError(f"asked for {n} different prompts; the split has only {len(unique)}")


def synchronize(device) -> None:
    """Wait for queued CUDA work, so a timer stops when the work is done."""
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()
