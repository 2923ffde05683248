"""Training checkpoints as safetensors + JSON only: nothing is pickled, nothing is unpickled.

A checkpoint is a directory `step-XXXXXXX/` holding, per named module, `<name>.safetensors`; per optimizer,
`<name>.optim.safetensors` (state tensors, flattened) plus its non-tensor structure in `state.json`; and the
RNG state. It is written into a temporary directory and renamed into place, so a killed run never leaves a
half-written checkpoint behind; `latest` names the newest complete one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def file_sha256(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints and saved pipelines both record it)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _optimizer_to_flat(opt: torch.optim.Optimizer):
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{pid}.{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}.{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def _optimizer_from_flat(opt: torch.optim.Optimizer, tensors: dict, meta: dict) -> None:
    state: dict = {}
    for key, v in tensors.items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    for key, v in meta["scalars"].items():
        pid, k = key.split(".", 1)
        state.setdefault(int(pid), {})[k] = v
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})


def save_checkpoint(run_dir: str | Path, step: int, modules: dict, optimizers: dict, extra: dict | None = None,
                    keep: int = 2, rng_states: torch.Tensor | None = None) -> Path:
    """`rng_states` (world, S): every process's CPU RNG state, gathered by the caller in a distributed run so
    that each rank resumes its own random stream; by default this process's state."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step-{step:07d}"
    tmp = run_dir / f".tmp-step-{step:07d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    meta = {"step": step, "extra": extra or {}, "optimizers": {}, "files": {}}
    for name, module in modules.items():
        sd = {k: v.detach().cpu().contiguous() for k, v in module.state_dict().items()}
        save_file(sd, tmp / f"{name}.safetensors")
    for name, opt in optimizers.items():
        tensors, opt_meta = _optimizer_to_flat(opt)
        save_file(tensors, tmp / f"{name}.optim.safetensors")
        meta["optimizers"][name] = opt_meta
    states = torch.get_rng_state()[None] if rng_states is None else rng_states.cpu().contiguous()
    save_file({"torch_cpu": states}, tmp / "rng.safetensors")
    for f in sorted(tmp.iterdir()):
        meta["files"][f.name] = file_sha256(f)
    (tmp / "state.json").write_text(json.dumps(meta, indent=1))
    if final.exists():
        shutil.rmtree(final)
    os.replace(tmp, final)
    latest_tmp = run_dir / ".latest.tmp"
    latest_tmp.write_text(final.name)
    os.replace(latest_tmp, run_dir / "latest")
    ckpts = sorted(p for p in run_dir.glob("step-*") if p.is_dir())
    for old in ckpts[:-keep]:
        shutil.rmtree(old)
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(ckpt: str | Path, modules: dict, optimizers: dict, rank: int = 0) -> dict:
    """Restore modules/optimizers/RNG in place; returns {"step", "extra"}. Corrupt files give a clear error.

    Process `rank` takes its own saved RNG state; the random stream continues exactly when the world size is
    the one that wrote the checkpoint (with another world size, rank r takes state r mod the old size)."""
    ckpt = Path(ckpt)
    state_file = ckpt / "state.json"
    try:
        meta = json.loads(state_file.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ValueError(f"checkpoint {str(ckpt)!r} is unreadable or incomplete ({e})") from None
    for fname, digest in meta["files"].items():
        f = ckpt / fname
        if not f.is_file() or file_sha256(f) != digest:
            raise ValueError(f"checkpoint file {str(f)!r} is missing or corrupt (checksum mismatch)")
    for name, module in modules.items():
        module.load_state_dict(load_file(ckpt / f"{name}.safetensors"))
    for name, opt in optimizers.items():
        _optimizer_from_flat(opt, load_file(ckpt / f"{name}.optim.safetensors"), meta["optimizers"][name])
    states = load_file(ckpt / "rng.safetensors")["torch_cpu"]
    states = states[None] if states.dim() == 1 else states  # checkpoints written before per-rank states
    torch.set_rng_state(states[rank % len(states)])
    return {"step": meta["step"], "extra": meta["extra"]}
