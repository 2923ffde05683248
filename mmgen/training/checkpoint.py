"""Training checkpoints as safetensors + JSON only: nothing is pickled, nothing is unpickled.

A checkpoint is a directory `step-XXXXXXX/` holding, per named module, `<name>.safetensors`; per optimizer,
`<name>.optim.safetensors` (state tensors, flattened) plus its non-tensor structure in `state.json`; and the
RNG state of every process. The training loop (`mmgen.training.loop`) gathers whole state dicts keyed by
parameter name through `torch.distributed.checkpoint.state_dict` (`gather_training_state`), the one call that
also unshards FSDP and strips DDP's wrapper, so a checkpoint does not depend on how many processes wrote it
or how they were sharded; `restore_optimizer` puts such a state back into a prepared (wrapped or sharded)
optimizer. It is written into a temporary directory and renamed into place, so a killed run never leaves a
half-written checkpoint behind; `latest` names the newest complete one.

A sharded run may instead write a sharded checkpoint (`train.fsdp_state_dict=sharded`, Accelerate's
SHARDED_STATE_DICT): `save_sharded_checkpoint` has every rank write its own shards through
`torch.distributed.checkpoint` in the safetensors layout of its `HuggingFaceStorageWriter` (`<name>/shard-*.safetensors`
per module and per optimizer), so no rank ever holds the whole state. Readers take either layout: `read_tensors`
reassembles whole tensors from the shards (any number of processes wrote them, any number reads them).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from mmgen.atomic import atomic_dir, write_text_atomic
from mmgen.safe_save import file_sha256


def _full(distributed: bool):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, cpu_offload=distributed)


def gather_training_state(module: torch.nn.Module, optimizers: dict) -> tuple[dict, dict]:
    """Whole (unsharded) model state dict and optimizer states (name -> state) keyed by parameter name, for
    `module` as prepared (DDP's wrapper stripped, FSDP shards gathered) and optimizers over its parameters. In a
    distributed run this is a collective: every rank calls it, rank 0 receives the tensors on the CPU (the
    others get empty dicts). An optimizer that has not stepped yet (a discriminator before its start) is saved
    as it is, by index: gathering it by name would first initialise its state with a zero step."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
    states = {}
    for name, opt in optimizers.items():
        inner = getattr(opt, "optimizer", opt)  # Accelerate's AcceleratedOptimizer wraps the torch one
        states[name] = inner if not inner.state else get_optimizer_state_dict(module, inner,
                                                                              options=_full(distributed))
    return get_model_state_dict(module, options=_full(distributed)), states


def gather_sharded_state(module: torch.nn.Module, optimizers: dict) -> tuple[dict, dict]:
    """As `gather_training_state`, but each rank keeps its own shards (DTensors): the model state dict and, per
    optimizer, its tensors flattened by name (`fqn::key`) plus its non-tensor structure. A collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    optims = {}
    for name, opt in optimizers.items():
        inner = getattr(opt, "optimizer", opt)
        if not inner.state:
            raise ValueError(f"optimizer {name!r} has not stepped: a sharded checkpoint holds stepped optimizers only")
        optims[name] = _optimizer_to_flat(get_optimizer_state_dict(module, inner))
    return get_model_state_dict(module), optims


def read_tensors(ckpt: str | Path, name: str) -> dict[str, torch.Tensor]:
    """Whole tensors of file `name` of checkpoint `ckpt` (e.g. "model", "opt.optim"): `<name>.safetensors`, or the
    shards of a sharded checkpoint's `<name>/` reassembled by `torch.distributed.checkpoint` (read by this
    process alone, in or outside a distributed run)."""
    ckpt = Path(ckpt)
    if (ckpt / f"{name}.safetensors").is_file():
        return load_file(ckpt / f"{name}.safetensors")
    import torch.distributed.checkpoint as dcp

    reader = dcp.HuggingFaceStorageReader(str(ckpt / name))
    meta = reader.read_metadata().state_dict_metadata
    tensors = {k: torch.empty(tuple(m.size), dtype=m.properties.dtype) for k, m in meta.items()}
    dcp.load(tensors, storage_reader=dcp.HuggingFaceStorageReader(str(ckpt / name)), no_dist=True)
    return tensors


def restore_optimizer(ckpt: str | Path, name: str, module: torch.nn.Module, optimizer: torch.optim.Optimizer) -> None:
    """Load optimizer `name` of checkpoint `ckpt` into a prepared optimizer (after `accelerator.prepare`, so
    FSDP can shard the state as it shards the parameters). Every rank reads the whole state from the file."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    ckpt = Path(ckpt)
    meta = json.loads((ckpt / "state.json").read_text())["optimizers"][name]
    tensors = read_tensors(ckpt, f"{name}.optim")
    inner = getattr(optimizer, "optimizer", optimizer)  # Accelerate's AcceleratedOptimizer wraps the torch one
    if meta.get("format") != "by_name":  # written by an older version: state keyed by parameter index
        _optimizer_from_flat(inner, tensors, meta)
        return
    state: dict = {}
    for key, v in tensors.items():
        fqn, k = key.rsplit(NAME_SEP, 1)
        state.setdefault(fqn, {})[k] = v
    for key, v in meta["scalars"].items():
        fqn, k = key.rsplit(NAME_SEP, 1)
        state.setdefault(fqn, {})[k] = v
    set_optimizer_state_dict(module, inner, {"state": state, "param_groups": meta["param_groups"]},
                             options=_full(False))


NAME_SEP = "::"  # parameter name :: state key (names contain dots)


def _optimizer_to_flat(opt: torch.optim.Optimizer | dict):
    """An optimizer's state as flat tensors + JSON: a torch optimizer (state keyed by parameter index) or a
    state dict from `gather_training_state` (keyed by parameter name, format "by_name")."""
    by_name = isinstance(opt, dict)
    sd = opt if by_name else opt.state_dict()
    sep = NAME_SEP if by_name else "."
    tensors, scalars = {}, {}
    for pid, state in sd["state"].items():
        for k, v in state.items():
            if torch.is_tensor(v):
                tensors[f"{pid}{sep}{k}"] = v.detach().cpu().contiguous()
            else:
                scalars[f"{pid}{sep}{k}"] = v
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars} | ({"format": "by_name"} if by_name
                                                                                 else {})


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
    """`modules`: name -> module or state dict; `optimizers`: name -> torch optimizer or a by-name optimizer
    state dict (`gather_training_state`). `rng_states` (world, S): every process's CPU RNG state, gathered by
    the caller in a distributed run so that each rank resumes its own random stream; by default this
    process's state."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"step-{step:07d}"
    with atomic_dir(final) as tmp:  # a crash leaves the previous checkpoint and no half-written one
        _write_checkpoint(tmp, step, modules, optimizers, extra, rng_states)
    write_text_atomic(run_dir / "latest", final.name)
    ckpts = sorted(p for p in run_dir.glob("step-*") if p.is_dir())
    for old in ckpts[:-keep]:
        shutil.rmtree(old)
    return final


def _write_checkpoint(tmp: Path, step: int, modules: dict, optimizers: dict, extra: dict | None,
                      rng_states: torch.Tensor | None) -> None:
    meta = {"step": step, "extra": extra or {}, "optimizers": {}, "files": {}}
    for name, module in modules.items():
        sd = {k: v.detach().cpu().contiguous()
              for k, v in (module if isinstance(module, dict) else module.state_dict()).items()}
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


def save_sharded_checkpoint(run_dir: str | Path, step: int, modules: dict, optimizers: dict, rank: int,
                            extra: dict | None = None, keep: int = 2, rng_states: torch.Tensor | None = None) -> Path:
    """Every rank calls this (a collective): `modules` name -> sharded state dict, `optimizers` name -> (tensors,
    structure) from `gather_sharded_state`. Each rank writes its shards with `torch.distributed.checkpoint`
    into a staging directory that rank 0 then completes (state.json with every file's sha256) and renames into
    place, as `save_checkpoint` does."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    run_dir = Path(run_dir)
    final, staging = run_dir / f"step-{step:07d}", run_dir / f".step-{step:07d}.sharded"
    if rank == 0:
        shutil.rmtree(staging, ignore_errors=True)  # left by a run killed mid-write
        staging.mkdir(parents=True)
    dist.barrier()
    for name, state in modules.items():
        dcp.save(state, storage_writer=dcp.HuggingFaceStorageWriter(str(staging / name), save_distributed=True))
    for name, (tensors, _) in optimizers.items():
        dcp.save(tensors, storage_writer=dcp.HuggingFaceStorageWriter(str(staging / f"{name}.optim"),
                                                                      save_distributed=True))
    dist.barrier()
    if rank == 0:
        meta = {"step": step, "extra": extra or {}, "format": "sharded", "files": {},
                "optimizers": {name: structure for name, (_, structure) in optimizers.items()}}
        states = torch.get_rng_state()[None] if rng_states is None else rng_states.cpu().contiguous()
        save_file({"torch_cpu": states}, staging / "rng.safetensors")
        for f in sorted(p for p in staging.rglob("*") if p.is_file()):
            meta["files"][str(f.relative_to(staging))] = file_sha256(f)
        (staging / "state.json").write_text(json.dumps(meta, indent=1))
        if final.exists():
            shutil.rmtree(final)
        staging.rename(final)
        write_text_atomic(run_dir / "latest", final.name)
        for old in sorted(p for p in run_dir.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old)
    dist.barrier()
    return final


def latest_checkpoint(run_dir: str | Path) -> Path | None:
    pointer = Path(run_dir) / "latest"
    if not pointer.is_file():
        return None
    path = Path(run_dir) / pointer.read_text().strip()
    return path if path.is_dir() else None


def load_checkpoint(ckpt: str | Path, modules: dict, optimizers: dict, rank: int = 0) -> dict:
    """Restore modules/optimizers/RNG in place; returns {"step", "extra"}. Corrupt files give a clear error.
    Optimizers saved by name are restored with `restore_optimizer` after the model is prepared instead.

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
        module.load_state_dict(read_tensors(ckpt, name))
    for name, opt in optimizers.items():
        _optimizer_from_flat(opt, load_file(ckpt / f"{name}.optim.safetensors"), meta["optimizers"][name])
    states = load_file(ckpt / "rng.safetensors")["torch_cpu"]
    states = states[None] if states.dim() == 1 else states  # checkpoints written before per-rank states
    torch.set_rng_state(states[rank % len(states)].clone())  # a row view crashes set_rng_state (rank > 0)
    return {"step": meta["step"], "extra": meta["extra"]}


VOCAB_TENSORS = ("tok_emb.weight", "head.proj.weight")  # a decoder trunk's tensors indexed by vocabulary id


def backbone(model: torch.nn.Module) -> torch.nn.Module:
    """The decoder's `Transformer` trunk: the model itself, or the one a wrapper holds (`.transformer`, e.g.
    Token-Shuffle's merge/split around it)."""
    inner = getattr(model, "transformer", None)
    return inner if isinstance(inner, torch.nn.Module) else model


def init_backbone(model: torch.nn.Module, weights: dict[str, torch.Tensor],
                  shared_rows: int | None = None) -> tuple[list[str], list[str]]:
    """Start `model`'s trunk from another decoder's saved weights (`weights`, a pipeline's transformer state
    dict, of any paradigm): every tensor whose name (after the other trunk's wrapper prefix) and shape match is
    copied; the rest keeps its fresh initialisation. Returns (copied, fresh) names of the trunk. Refuses a
    source with nothing in common.

    `shared_rows`: the leading ids of the unified vocabulary that mean the same in both decoders (text and
    special ids, `UnifiedVocab.image_offset`, when the source's caption tokenizer is kept). The vocabulary-indexed
    tensors (`tok_emb.weight`, `head.proj.weight`) of decoders over different image codebooks then take those
    rows, reported as `name[:rows]` in copied; their image rows stay fresh."""
    source = {k.removeprefix("transformer."): v for k, v in weights.items()}
    trunk = backbone(model)
    copied, fresh = [], []
    with torch.no_grad():
        for name, param in trunk.state_dict(keep_vars=True).items():
            src = source.get(name)
            if src is not None and src.shape == param.shape:
                param.copy_(src.to(param.dtype))
                copied.append(name)
            elif (shared_rows and src is not None and name in VOCAB_TENSORS and src.shape[1:] == param.shape[1:]
                  and min(len(src), len(param)) >= shared_rows):
                param[:shared_rows] = src[:shared_rows].to(param.dtype)
                copied.append(f"{name}[:{shared_rows}]")
            else:
                fresh.append(name)
    if not copied:
        raise ValueError("init_backbone_from: no decoder weight matches this model's trunk in name and shape "
                         f"(the trunk has {', '.join(fresh[:4])}, ...); use a pipeline with the same width")
    return copied, fresh
