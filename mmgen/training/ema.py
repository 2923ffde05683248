"""Exponential moving average of the weights (Polyak & Juditsky 1992; the EMA that DiT, LlamaGen and VAR sample
with), kept by torch's own `AveragedModel` with `get_ema_multi_avg_fn`.

`train.ema_decay` > 0 turns it on: after every optimisation step ema = decay * ema + (1 - decay) * weights (the
first step copies the weights). The average is saved in each checkpoint as `ema.safetensors` and restored on
resume, so a resumed run's average equals an uninterrupted one's; `train.ema_for_sampling` puts it into the saved
pipeline in place of the last weights.
"""

from __future__ import annotations

import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn


def check_ema(decay: float) -> None:
    if not 0.0 <= decay < 1.0:
        raise ValueError(f"train.ema_decay must be in [0, 1) (0: off), got {decay!r}")


def make_ema(module: torch.nn.Module, decay: float) -> AveragedModel:
    """The average of `module`'s parameters (a copy; buffers are copied once and not averaged)."""
    return AveragedModel(module, multi_avg_fn=get_ema_multi_avg_fn(decay))


@torch.no_grad()
def copy_ema_into(ema: AveragedModel, module: torch.nn.Module) -> torch.nn.Module:
    """`module` with its parameters replaced by the average's (in place); returns it."""
    for p, q in zip(module.parameters(), ema.module.parameters(), strict=True):
        p.copy_(q)
    return module
