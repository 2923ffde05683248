"""Flow-matching helpers shared by the continuous paradigms: FlowAR (Ren et al., 2024, arXiv 2412.15205),
xAR (Ren et al., 2025, arXiv 2502.20388) and the MAR-style per-token head (Li et al., 2024, arXiv 2406.11838).

Convention (rectified flow, as in FlowAR / xAR): x_t = (1 - t) x0 + t noise with t in [0, 1], t = 0 is data and
t = 1 is noise; the network predicts the velocity v = noise - x0 and sampling integrates dx/dt = v from t = 1
down to t = 0. Training times follow xAR's logit-normal draw (SD3's sigmoid of a normal). The time draw, the
interpolation and the ODE integration live in `tokenizers_vis.flow` (the PCA tokenizer's flow decoder uses
them too, and tokenizers_vis sits below mmgen); this module re-exports them.

Shape letters: N rows (samples, or tokens of all samples flattened), D trailing data dims.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mmgen.sampling.config import SamplingConfig
from mmgen.sampling.logits import cfg_combine
from tokenizers_vis.flow import interpolate, logit_normal_t, sample_flow  # re-exported: the paradigms import them here


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
