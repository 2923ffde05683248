"""Experiment trackers beside the JSONL log, through Accelerate's own (`Accelerator(log_with=...)`,
`init_trackers`, `accelerator.log`): `train.report_to` = none | tensorboard | wandb. TensorBoard writes under
`<out_dir>/trackers/`; wandb runs as its own settings say (`WANDB_MODE=offline` for no network)."""

from __future__ import annotations

import importlib.util
import json

REPORT_TO = ("none", "tensorboard", "wandb")
PACKAGES = {"tensorboard": "tensorboard", "wandb": "wandb"}


def check_report_to(report_to: str) -> str | None:
    """The Accelerate tracker name for `train.report_to` (None: none); a missing package is an ImportError
    naming the extra that installs it."""
    if report_to not in REPORT_TO:
        raise ValueError(f"train.report_to must be one of {', '.join(REPORT_TO)}, got {report_to!r}")
    if report_to == "none":
        return None
    if importlib.util.find_spec(PACKAGES[report_to]) is None:
        raise ImportError(f"train.report_to={report_to} needs the {PACKAGES[report_to]!r} package: "
                          f"pip install 'mmgen[track]' (or pip install {PACKAGES[report_to]})")
    return report_to


def tracker_config(cfg: dict) -> dict:
    """A run config flattened to `a.b` keys of scalars, as trackers' hyperparameter tables take them."""
    flat = {}

    def walk(d, prefix):
        for k, v in d.items():
            if isinstance(v, dict):
                walk(v, f"{prefix}{k}.")
            else:
                flat[prefix + k] = v if isinstance(v, (int, float, str, bool)) else json.dumps(v)

    walk(cfg, "")
    return flat
