"""Which checkpoint a run resumes from (`--resume latest|PATH|none`) and whether the new config may continue it.

A resumed run must mean the same run: its config is compared with the one the checkpoint was written under (kept
in the checkpoint's state.json), and any difference outside the keys that only say how long, how often or where
(`SAFE`) is a ValueError naming each key with both values. To change such a key, start a new run from the
weights (`init_from`) or pass `--resume none`.
"""

from __future__ import annotations

import json
from pathlib import Path

from mmgen.training.checkpoint import latest_checkpoint

# train.* keys a resumed run may change: length, log/checkpoint cadence, output place, trackers, and switches that
# compute the same steps (checkpointing recomputes activations, data workers only load, FSDP shards the same
# update and its checkpoints read back either way)
SAFE = frozenset({"steps", "log_every", "ckpt_every", "out_dir", "resume", "snapshots", "data_workers", "report_to",
                  "gradient_checkpointing", "ema_for_sampling", "fsdp", "fsdp_state_dict"})


def resolve_resume(resume: str, out_dir: str | Path) -> Path | None:
    """The checkpoint directory to resume from: `latest` (the run directory's newest, or none), `none` (start
    fresh), or a path to a checkpoint directory (holding state.json) or to a run directory (its newest)."""
    if resume == "none":
        return None
    if resume == "latest":
        return latest_checkpoint(out_dir)
    path = Path(resume)
    if (path / "state.json").is_file():
        return path
    ckpt = latest_checkpoint(path) if path.is_dir() else None
    if ckpt is None:
        raise ValueError(f"--resume must be latest, none or a checkpoint directory (holding state.json) or a run "
                         f"directory with one; {resume!r} is neither")
    return ckpt


def _flat(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out |= _flat(v, f"{prefix}{k}.")
        else:
            out[prefix + k] = v
    return out


def check_resumable(saved: dict | None, new: dict, defaults: dict | None = None) -> None:
    """Refuse to continue a checkpoint written under `saved` (a run config as JSON) with config `new` when a key
    that changes the run's meaning differs. Nothing to compare (`saved` None, older checkpoints): allowed. A key the
    checkpoint predates is allowed at its value in `defaults` (the config class's defaults: a switch added since,
    left off)."""
    if saved is None:
        return
    a, b = _flat(saved), _flat(json.loads(json.dumps(new)))  # tuples as lists, as saved
    d = _flat(json.loads(json.dumps(defaults))) if defaults is not None else {}
    changed = [k for k in sorted(set(a) | set(b))
               if a.get(k) != b.get(k) and not (k.startswith("train.") and k[len("train."):] in SAFE)
               and not (k not in a and k in d and b.get(k) == d[k])]
    if changed:
        raise ValueError("cannot resume: the checkpoint was trained under another config (" +
                         "; ".join(f"{k}: {a.get(k)!r} -> {b.get(k)!r}" for k in changed) +
                         "). Keys that may change on resume: " + ", ".join(f"train.{k}" for k in sorted(SAFE)) +
                         "; start anew with --resume none or from the weights with init_from")
