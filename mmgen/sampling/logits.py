"""Logits processors and the categorical sampler shared by every discrete paradigm and stage.

Classifier-free guidance as in Ho & Salimans (2022) on logits, `u + s (c - u)` (the LlamaGen convention);
temperature; top-k; nucleus (top-p) filtering following Holtzman et al. (2020). Sampling takes one
`torch.Generator` per row so every image has its own seed, independent of how images are batched.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmgen.sampling.config import CFG_SCHEDULES, SamplingConfig, validate_sampling_args  # noqa: F401 (re-exported)


def guidance_at(scale: float, k: int, K: int, schedule: str = "constant") -> float:
    """CFG scale for step k of K (0-based). "linear" ramps from 1 to `scale` over the steps (VAR and FlowAR
    over scales, xAR over entities): w_k = 1 + (scale - 1) k / (K - 1)."""
    if schedule not in CFG_SCHEDULES:
        raise ValueError(f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}; got {schedule!r}")
    if K < 1 or not 0 <= k < K:
        raise ValueError(f"need K >= 1 and 0 <= k < K, got k={k}, K={K}")
    if schedule == "constant" or K == 1:
        return float(scale)
    return 1.0 + (scale - 1.0) * k / (K - 1)


def cfg_combine(cond_BV: torch.Tensor, uncond_BV: torch.Tensor, scale: float) -> torch.Tensor:
    return uncond_BV + scale * (cond_BV - uncond_BV)


def top_k_filter(logits_BV: torch.Tensor, k: int) -> torch.Tensor:
    k = min(k, logits_BV.shape[-1])
    kth = torch.topk(logits_BV, k, dim=-1).values[..., -1:]
    return logits_BV.masked_fill(logits_BV < kth, float("-inf"))


def top_p_filter(logits_BV: torch.Tensor, p: float) -> torch.Tensor:
    """Keep the smallest set of most likely tokens whose probability mass reaches p."""
    if p >= 1.0:
        return logits_BV
    sorted_logits, order = torch.sort(logits_BV, dim=-1, descending=True)
    probs = sorted_logits.softmax(-1)
    mass_before = probs.cumsum(-1) - probs
    drop_sorted = mass_before >= p  # the top token always has mass_before 0, so it stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits_BV.masked_fill(drop, float("-inf"))


def process_logits(logits_BV: torch.Tensor, sampling: SamplingConfig) -> torch.Tensor:
    """Temperature, then top-k, then top-p (the order of transformers' generate)."""
    if sampling.temperature > 0 and sampling.temperature != 1.0:
        logits_BV = logits_BV / sampling.temperature
    if sampling.top_k is not None:
        logits_BV = top_k_filter(logits_BV, sampling.top_k)
    if sampling.top_p is not None:
        logits_BV = top_p_filter(logits_BV, sampling.top_p)
    return logits_BV


def sample(logits_BV: torch.Tensor, generators: Sequence[torch.Generator] | None, greedy: bool = False,
           noise_BV: torch.Tensor | None = None):
    """One token per row. Exponential-race sampling: argmax p / E with E ~ Exp(1) draws from p, and lets
    every row use its own generator without a per-row multinomial call or a host sync. `noise_BV`: this step's
    Exp(1) draws when the caller drew them ahead (`RowNoise`), instead of drawing from `generators` here."""
    if greedy:
        return logits_BV.argmax(-1)
    probs = logits_BV.float().softmax(-1)
    if noise_BV is not None:
        return (probs / noise_BV).argmax(-1)
    if generators is None:
        noise = torch.empty_like(probs).exponential_()
    else:
        if len(generators) != probs.shape[0]:
            raise ValueError(f"need one generator per row: {probs.shape[0]} rows, {len(generators)} generators")
        # noise comes from each generator on its own device (CPU generators drive GPU sampling too, so a
        # seed gives the same draws on any device)
        noise = torch.stack([torch.empty(probs.shape[-1], device=g.device).exponential_(generator=g)
                             for g in generators]).to(probs.device)
    return (probs / noise).argmax(-1)


class RowNoise:
    """The Exp(1) noise `sample` would draw over `steps` steps of (rows, V), drawn ahead in blocks of steps: one
    call per row and block instead of one per row and step. A generator's stream comes out in the same order
    either way (block of k steps == k single steps, tested), so tokens equal the step-by-step draws, and a
    loop that runs all `steps` leaves every generator in the same state."""

    def __init__(self, generators: Sequence[torch.Generator], steps: int, V: int, device, block_elems: int = 1 << 20):
        self.generators, self.steps, self.V, self.device = generators, steps, V, device
        self.block = max(1, min(steps, block_elems // max(1, V * len(generators))))
        self.step, self.buffer, self.offset = 0, None, 0

    def next(self) -> torch.Tensor:
        """(rows, V) noise for the next step."""
        if self.step >= self.steps:
            raise ValueError(f"RowNoise drew all of its {self.steps} steps")
        if self.buffer is None or self.offset == self.buffer.shape[1]:
            k = min(self.block, self.steps - self.step)
            self.buffer = torch.stack([torch.empty(k, self.V, device=g.device).exponential_(generator=g)
                                       for g in self.generators]).to(self.device)
            self.offset = 0
        out = self.buffer[:, self.offset]
        self.offset += 1
        self.step += 1
        return out
