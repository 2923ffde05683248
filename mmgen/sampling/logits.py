"""Guidance, logits processors, per-row randomness and the categorical sampler shared by every paradigm and stage.

Classifier-free guidance as in Ho & Salimans (2022), `u + w (c - u)` (the LlamaGen convention), in one function,
`guide`, with its schedules in `guidance_at`; temperature; top-k; nucleus (top-p) filtering following Holtzman et
al. (2020). Randomness is per row (`RowRandom`): every image draws from its own `torch.Generator`, independent of
how images are batched, in plain AR and in speculative Jacobi decoding alike.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from mmgen.sampling.config import CFG_SCHEDULES, SamplingConfig, validate_sampling_args  # noqa: F401 (re-exported)

GUIDANCE_FORMS = ("lerp", "var")  # u + w (c - u); VAR's (1 + t) c - t u with t = w - 1


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


def guide(logits_R: torch.Tensor, scale: float | torch.Tensor, use_cfg: bool = True, *,
          form: str = "lerp") -> torch.Tensor:
    """Classifier-free guidance, for every paradigm and backend: rows [conditional; unconditional] (R = 2B, along
    dim 0) -> B guided rows.

    The one rule: without `use_cfg` every row is conditional and comes back as it is; with it, w = 1 gives the
    conditional rows exactly (a ramp's first step, LlamaGen after `cfg_interval`), any other w gives
    u + w (c - u). `scale` is a number or a tensor broadcastable to the conditional half (per-row or per-position
    weights), the rule then holding elementwise. `form="var"` computes the same guidance in VAR's arithmetic,
    (1 + t) c - t u with t = w - 1, so that greedy ties fall as in VAR's own code. Logits keep their dtype."""
    if not use_cfg:
        return logits_R
    if len(logits_R) % 2:
        raise ValueError(f"guidance needs [conditional; unconditional] rows, an even number; got {len(logits_R)}")
    return cfg_combine(*logits_R.chunk(2), scale, form=form)


def cfg_combine(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor, *,
                form: str = "lerp") -> torch.Tensor:
    """`guide` on the two halves held apart."""
    if form not in GUIDANCE_FORMS:
        raise ValueError(f"guidance form must be one of {', '.join(GUIDANCE_FORMS)}; got {form!r}")
    if not torch.is_tensor(scale) and scale == 1.0:
        return cond
    guided = uncond + scale * (cond - uncond) if form == "lerp" else scale * cond - (scale - 1) * uncond
    return torch.where(scale == 1, cond, guided) if torch.is_tensor(scale) else guided


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
    Exp(1) draws when the caller drew them ahead (`RowRandom.race_noise_steps`), instead of drawing from
    `generators` here (`RowRandom.race_noise`)."""
    if greedy:
        return logits_BV.argmax(-1)
    probs = logits_BV.float().softmax(-1)
    if noise_BV is None:
        noise_BV = RowRandom(generators, probs.shape[0], probs.device).race_noise(None, probs.shape[-1])
    return (probs / noise_BV).argmax(-1)


class RowRandom:
    """Per-row randomness for every sampler, plain AR and speculative Jacobi decoding alike: row r draws from
    generators[r] alone, on that generator's device (CPU generators drive GPU sampling too, so a seed draws the same
    anywhere), and each call draws the same amount for every row it names, so a row's stream never depends on its
    batch mates. Without generators the global generator draws for all rows at once. `rows`: the rows to draw for
    (indices into `generators`), None for all.

    Exp(1) noise comes two ways, which consume a generator differently; seeded outputs depend on each, so both stay:
    `race_noise` is torch's `exponential_` (AR's exponential race: `sample`, `race_noise_steps`), `exponential` is
    -log(1 - U) of `uniform` draws (speculative Jacobi decoding, whose acceptance tests draw the same uniforms)."""

    def __init__(self, generators: Sequence[torch.Generator] | None, num_rows: int, device):
        if generators is not None and len(generators) != num_rows:
            raise ValueError(f"need one generator per row: {num_rows} rows, {len(generators)} generators")
        self.generators, self.num_rows, self.device = generators, num_rows, device

    def _per_row(self, rows, draw) -> torch.Tensor:
        rows = range(self.num_rows) if rows is None else rows.tolist()
        return torch.stack([draw(self.generators[r]) for r in rows]).to(self.device)

    def uniform(self, rows: torch.Tensor | None, *shape: int) -> torch.Tensor:
        if self.generators is None:
            return torch.rand(self.num_rows if rows is None else len(rows), *shape, device=self.device)
        return self._per_row(rows, lambda g: torch.rand(shape, generator=g, device=g.device))

    def exponential(self, rows: torch.Tensor | None, *shape: int) -> torch.Tensor:
        return -torch.log1p(-self.uniform(rows, *shape))

    def uniforms(self, rows: torch.Tensor | None, *shapes: tuple[int, ...]) -> list[torch.Tensor]:
        """`uniform(rows, *shape)` for each shape in turn, the same values: a generator's stream comes out in the
        same order whether drawn in one call or several (tested), so each row draws once."""
        if self.generators is None:
            return [self.uniform(rows, *shape) for shape in shapes]
        sizes = [math.prod(shape) for shape in shapes]
        flat = self._per_row(rows, lambda g: torch.rand(sum(sizes), generator=g, device=g.device))
        return [part.view(len(flat), *shape) for part, shape in zip(flat.split(sizes, 1), shapes)]

    def race_noise(self, rows: torch.Tensor | None, *shape: int) -> torch.Tensor:
        if self.generators is None:
            n = self.num_rows if rows is None else len(rows)
            return torch.empty(n, *shape, device=self.device).exponential_()
        return self._per_row(rows, lambda g: torch.empty(shape, device=g.device).exponential_(generator=g))

    def race_noise_steps(self, steps: int, V: int, block_elems: int = 1 << 20) -> Iterator[torch.Tensor]:
        """`race_noise(None, V)` for each of `steps` steps, drawn ahead in blocks of steps: one call per row and block
        instead of one per row and step. A generator's stream comes out in the same order either way (a block of k
        steps is k single steps, tested), so tokens equal the step-by-step draws, and a loop that runs all `steps`
        leaves every generator in the same state. Without generators every step draws on its own."""
        if self.generators is None:
            for _ in range(steps):
                yield self.race_noise(None, V)
            return
        block = max(1, min(steps, block_elems // max(1, V * self.num_rows)))
        for start in range(0, steps, block):
            yield from self.race_noise(None, min(block, steps - start), V).unbind(1)  # (rows, k, V) -> k steps
