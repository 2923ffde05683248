"""Rectified flow (Liu et al., 2022; the flow-matching convention of FlowAR, arXiv 2412.15205, and xAR,
arXiv 2502.20388): the few pieces a flow-matching network and its sampler need, shared by the PCA tokenizer's
decoder (tokenizers_vis/pca.py) and mmgen's continuous paradigms (re-exported by `mmgen.sampling.flow` and
`mmgen.models.heads`). They live in the lowest layer so that a tokenizer can use them: tokenizers_vis does not
import mmgen.

Convention: x_t = (1 - t) x0 + t noise with t in [0, 1], t = 0 is data and t = 1 is noise; the network predicts
the velocity v = noise - x0 and sampling integrates dx/dt = v from t = 1 down to t = 0. Training times follow
xAR's logit-normal draw (SD3's sigmoid of a normal).

Shape letters: N rows (samples, or tokens of all samples flattened), D trailing data dims.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn as nn

FLOW_SAMPLERS = ("euler", "heun")


def logit_normal_t(n: int, generator: torch.Generator | None = None, device=None, mean: float = 0.0,
                   std: float = 1.0) -> torch.Tensor:
    """(n,) times sigmoid(N(mean, std)); drawn on the generator's device so a seed gives the same times anywhere."""
    gen_device = generator.device if generator is not None else device
    u = torch.randn(n, generator=generator, device=gen_device)
    return torch.sigmoid(mean + std * u).to(device)


def interpolate(x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """Noisy sample x_t and target velocity; t has x0's leading dims (e.g. (N,)) and broadcasts over the rest."""
    t = t.to(x0.dtype).reshape(*t.shape, *([1] * (x0.dim() - t.dim())))
    return (1 - t) * x0 + t * noise, noise - x0


def sample_flow(velocity_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], noise: torch.Tensor, steps: int,
                method: str = "euler"):
    """Integrate dx/dt = velocity_fn(x, t) from t = 1 (noise) to t = 0 on `steps` uniform steps.

    Heun is Euler's predictor plus a trapezoid corrector; like EDM's Heun sampler (Karras et al., 2022) the
    last step, which lands on t = 0, is plain Euler, so Heun costs 2 * steps - 1 evaluations.
    Returns (x0, number of velocity evaluations)."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps}")
    if method not in FLOW_SAMPLERS:
        raise ValueError(f"method must be one of {FLOW_SAMPLERS}, got {method!r}")
    N = noise.shape[0]
    ts = torch.linspace(1.0, 0.0, steps + 1, device=noise.device, dtype=noise.dtype)
    x, evals = noise, 0
    for i in range(steps):
        t, t_next = ts[i], ts[i + 1]
        dt = t_next - t  # negative: time runs backwards
        v = velocity_fn(x, t.expand(N))
        evals += 1
        x_next = x + dt * v
        if method == "heun" and i + 1 < steps:
            v_next = velocity_fn(x_next, t_next.expand(N))
            evals += 1
            x_next = x + dt * 0.5 * (v + v_next)
        x = x_next
    return x, evals


class TimestepEmbedder(nn.Module):
    """DiT's sinusoidal time embedding (Peebles & Xie, 2023) followed by an MLP: t in [0, 1] (N,) -> (N, dim).
    t is scaled by 1000 first so the sinusoid frequencies, chosen by DiT for integer diffusion steps 0..1000,
    resolve small differences in t."""

    def __init__(self, dim: int, freq_dim: int = 256, max_period: float = 10000.0, t_scale: float = 1000.0):
        super().__init__()
        self.freq_dim, self.max_period, self.t_scale = freq_dim, max_period, t_scale
        self.mlp = nn.Sequential(nn.Linear(freq_dim, dim), nn.SiLU(), nn.Linear(dim, dim))

    def sinusoid(self, t_N: torch.Tensor) -> torch.Tensor:
        half = self.freq_dim // 2
        freqs = torch.exp(-math.log(self.max_period) * torch.arange(half, device=t_N.device) / half)
        angles = self.t_scale * t_N.float()[:, None] * freqs[None]
        emb = torch.cat([angles.cos(), angles.sin()], -1)
        if self.freq_dim % 2:
            emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], -1)
        return emb

    def forward(self, t_N: torch.Tensor) -> torch.Tensor:
        return self.mlp(self.sinusoid(t_N).to(self.mlp[0].weight.dtype))
