"""Reading other projects' released `torch.save` files: never unpickling code, weights found where the
trainers of this field put them."""

from __future__ import annotations

import argparse
import pickle
from pathlib import Path

import torch

WEIGHT_KEYS = ("model", "module", "state_dict")  # DDP, DeepSpeed, Lightning-style; else the top level (FSDP)
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP / torch.compile wrappers left in parameter names
# training scripts (LlamaGen's, VAR's) save their argparse arguments beside the weights: a plain attribute holder,
# safe to rebuild, so it is the one class allowed besides weights_only's tensors and containers
SAFE_GLOBALS = [argparse.Namespace]


def load_state_dict(path: str | Path, option: str) -> dict[str, torch.Tensor]:
    """The tensors of a released checkpoint file, by name. `option` names the argument in errors (`--gpt`)."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{option} {str(path)!r} is not a file")
    try:
        with torch.serialization.safe_globals(SAFE_GLOBALS):
            ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{option} {str(path)!r} is not a checkpoint torch.load can read with weights_only=True "
                         f"({first})") from None
    if not isinstance(ckpt, dict):
        raise ValueError(f"{option} {str(path)!r} holds a {type(ckpt).__name__}, not a dict of weights")
    found = next((ckpt[k] for k in WEIGHT_KEYS if isinstance(ckpt.get(k), dict)), ckpt)
    tensors = {k: v for k, v in found.items() if isinstance(k, str) and torch.is_tensor(v)}
    if not tensors:
        raise ValueError(f"{option} {str(path)!r} holds no weights under {', '.join(map(repr, WEIGHT_KEYS))} or at "
                         f"its top level (keys: {', '.join(map(str, list(ckpt)[:8]))})")
    for prefix in WRAPPER_PREFIXES:
        if all(k.startswith(prefix) for k in tensors):
            tensors = {k[len(prefix):]: v for k, v in tensors.items()}
    return tensors


def check_shapes(model: torch.nn.Module, tensors: dict[str, torch.Tensor], option: str, what: str) -> None:
    """Every tensor the model has is in the file with its shape, and nothing else is: else a ValueError that
    names the first tensor that does not fit."""
    expected = model.state_dict()
    for name, t in expected.items():
        if name not in tensors:
            raise ValueError(f"{option}: tensor {name!r} of {what} is missing from the file")
        if tuple(tensors[name].shape) != tuple(t.shape):
            raise ValueError(f"{option}: tensor {name!r} has shape {tuple(tensors[name].shape)} but {what} needs "
                             f"{tuple(t.shape)}")
    extra = sorted(set(tensors) - set(expected))
    if extra:
        raise ValueError(f"{option}: the file has tensors {what} does not: {', '.join(extra[:5])}"
                         f"{' ...' if len(extra) > 5 else ''}")
