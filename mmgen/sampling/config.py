"""What one generation call samples with, for every paradigm: guidance, the token distribution (discrete
paradigms) and the flow ODE (continuous paradigms). One frozen dataclass, validated once, passed to every
paradigm's `generate`."""

from __future__ import annotations

import math
from dataclasses import dataclass

from tokenizers_vis.flow import FLOW_SAMPLERS  # the ODE integrators sample_flow offers

CFG_SCHEDULES = ("constant", "linear")
DEFAULT_GUIDANCE_SCALE = 3.0  # a model's guidance scale when its saved config sets none


@dataclass(frozen=True)
class SamplingConfig:
    guidance_scale: float = 1.0
    temperature: float = 1.0  # 0 means greedy (argmax); continuous paradigms scale the initial noise by it (MAR)
    top_k: int | None = None
    top_p: float | None = None
    cfg_schedule: str | None = None  # constant | linear (ramp from 1); None: the paradigm's own default
    num_inference_steps: int = 25  # flow ODE steps per token / scale / entity
    flow_sampler: str = "euler"  # euler | heun

    def __post_init__(self):
        validate_sampling_args(self.guidance_scale, self.temperature, self.top_k, self.top_p)
        if self.cfg_schedule is not None and self.cfg_schedule not in CFG_SCHEDULES:
            raise ValueError(f"cfg_schedule must be one of {', '.join(CFG_SCHEDULES)}; got {self.cfg_schedule!r}")
        steps = self.num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be an integer >= 1, got {steps!r}")
        if self.flow_sampler not in FLOW_SAMPLERS:
            raise ValueError(f"flow_sampler must be one of {', '.join(FLOW_SAMPLERS)}; got {self.flow_sampler!r}")

    def schedule(self, default: str = "constant") -> str:
        """The guidance schedule to use: the call's, else the paradigm's `default`."""
        return self.cfg_schedule or default


def validate_sampling_args(guidance_scale=1.0, temperature=1.0, top_k=None, top_p=None) -> None:
    if not isinstance(guidance_scale, (int, float)) or not math.isfinite(guidance_scale) or guidance_scale < 0:
        raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {guidance_scale}")
    if not isinstance(temperature, (int, float)) or not math.isfinite(temperature) or temperature < 0:
        raise ValueError(f"temperature must be a finite number >= 0 (0 = greedy), got {temperature}")
    if top_k is not None and (isinstance(top_k, bool) or not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be an integer >= 1 or None, got {top_k}")
    if top_p is not None and (not isinstance(top_p, (int, float)) or not 0 < top_p <= 1):
        raise ValueError(f"top_p must be in (0, 1] or None, got {top_p}")
