"""Flow-matching helpers shared by the continuous paradigms: FlowAR (Ren et al., 2024, arXiv 2412.15205),
xAR (Ren et al., 2025, arXiv 2502.20388) and the MAR-style per-token head (Li et al., 2024, arXiv 2406.11838).

Convention (rectified flow, as in FlowAR / xAR): x_t = (1 - t) x0 + t noise with t in [0, 1], t = 0 is data and
t = 1 is noise; the network predicts the velocity v = noise - x0 and sampling integrates dx/dt = v from t = 1
down to t = 0. Training times follow xAR's logit-normal draw (SD3's sigmoid of a normal).

Shape letters: N rows (samples, or tokens of all samples flattened), D trailing data dims.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from mmgen.sampling.config import FLOW_SAMPLERS, SamplingConfig
from mmgen.sampling.logits import cfg_combine


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


# guidance on velocities is the same combination as on logits (`mmgen.sampling.logits.guide`, which the paradigms call)
cfg_velocity = cfg_combine


def flow_generators(sampling: SamplingConfig, generators: Sequence[torch.Generator] | None,
                    n: int) -> list[torch.Generator]:
    """One generator per sample for a flow paradigm's `generate` (fresh ones seeded from the global RNG when None,
    so torch.manual_seed still makes runs repeatable)."""
    if not isinstance(sampling, SamplingConfig):
        raise ValueError(f"sampling must be a SamplingConfig, got {type(sampling).__name__}")
    if generators is None:
        return [torch.Generator().manual_seed(int(s)) for s in torch.randint(2**62, (n,))]
    if len(generators) != n:
        raise ValueError(f"need one generator per prompt: {n} prompts, {len(generators)} generators")
    return list(generators)


def initial_noise(shape_per_sample: Sequence[int], generators: Sequence[torch.Generator], temperature: float = 1.0,
                  device=None) -> torch.Tensor:
    """(N, *shape) Gaussian noise, row n from generators[n] (drawn on that generator's device, so a CPU seed gives
    the same image on any device), scaled by `temperature` (MAR's sampling temperature)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    rows = [torch.randn(*shape_per_sample, generator=g, device=g.device) for g in generators]
    return temperature * torch.stack(rows).to(device)
