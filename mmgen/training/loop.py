"""The one training loop of the training scripts (generator, tokenizer, SEED stage 1), nanoGPT-plain.

A script builds its models and optimizers and writes its step; `Run` does the rest, in this order:

    cfg = load_run_config(MyRunConfig, __doc__, argv)        # unknown keys and bad values: exit 2
    run = Run(cfg, cfg.train, "train x")    # accelerator, run directory, torch.manual_seed(train.seed)
    model = ...; opt = ...                  # built in the same order on every rank: the same init everywhere
    run.resume({"model": model})            # latest checkpoint's weights + this rank's RNG; fresh: seed + rank
    model, opt = run.prepare(model, {"opt": opt})   # DDP / FSDP; the optimizer state restored after sharding
    def step(i):                            # one optimisation step; returns the scalars to log
        ...
        return {"loss": loss}
    run.train(step)                         # progress, JSONL log, checkpoints, SIGTERM, rank_spread

`run.train` logs every `train.log_every` steps (values averaged over the ranks), checkpoints every
`train.ckpt_every` steps, after the last step and when SIGTERM/SIGINT arrives (then exits 128 + signal), and
rewinds the log of a resumed run to its checkpoint so the log reads as one uninterrupted run. Checkpoints hold
whole tensors keyed by parameter name (`gather_training_state`), so a run resumes under any number of
processes, sharded or not. `train.fsdp` (where a config has it) shards the prepared module with torch's
`fully_shard`, one unit per transformer `Block` and then the root, in a run launched with 2+ processes: the
same loop on CPU (gloo) or GPU, where Accelerate's own FSDP plugin runs on GPUs only.

The field's recipe switches, each off by default (train.* keys, where a script's config has them):
`grad_accum` (Accelerate's `accumulate`: `step_fn` runs that many times per optimisation step, each on one
micro-batch of `batch_size`), `ema_decay` / `ema_for_sampling` (`mmgen.training.ema`), `gradient_checkpointing`
and the FSDP units (`mmgen.training.memory`), `fsdp_state_dict=sharded` (`save_sharded_checkpoint`), `report_to`
(`mmgen.training.tracking`) and `resume` / `--resume latest|PATH|none` (`mmgen.training.resume`).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import signal
import time
import typing
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmgen.atomic import write_json_atomic, write_text_atomic
from mmgen.config import load_config
from mmgen.training.checkpoint import (gather_sharded_state, gather_training_state, load_checkpoint, read_tensors,
                                       restore_optimizer, save_checkpoint, save_sharded_checkpoint)
from mmgen.training.data import batch_indices
from mmgen.training.ema import check_ema, copy_ema_into, make_ema
from mmgen.training.memory import enable_gradient_checkpointing, shard_classes
from mmgen.training.resume import check_resumable, resolve_resume
from mmgen.training.tracking import check_report_to, tracker_config


def cosine_lr(step: int, base_lr: float, warmup: int, total: int, min_ratio: float = 0.1) -> float:
    if step < warmup:
        return base_lr * (step + 1) / warmup
    t = min(1.0, (step - warmup) / max(1, total - warmup))
    return base_lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * t)))


class JsonlLogger:
    """Appends one JSON object per logged step to `<run_dir>/log.jsonl` (main process only)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.path = Path(run_dir) / "log.jsonl"
        self.enabled = enabled

    def log(self, record: dict) -> None:
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps(record) + "\n")

    def rewind(self, step: int) -> dict:
        """Drop the records of steps >= `step`: a run killed after its last checkpoint logged steps that the
        resumed run repeats, and the log should read as one uninterrupted run. Returns the last record kept
        (empty if none): a resumed run counts its time on from there."""
        if not (self.enabled and self.path.is_file()):
            return {}
        kept = [line for line in self.path.read_text().splitlines()
                if line.strip() and json.loads(line)["step"] < step]
        write_text_atomic(self.path, "".join(line + "\n" for line in kept))
        return json.loads(kept[-1]) if kept else {}


def decay_groups(params, weight_decay: float, **extra) -> list[dict]:
    """AdamW parameter groups of `params`: weight decay on matrices (2 or more dims), none on vectors (norms,
    biases); `extra` keys (e.g. `lr_scale`) go on both groups."""
    params = list(params)
    return [{"params": [p for p in params if p.dim() >= 2], "weight_decay": weight_decay, **extra},
            {"params": [p for p in params if p.dim() < 2], "weight_decay": 0.0, **extra}]


def make_accelerator(grad_accum: int = 1, log_with: str | None = None, project_dir: str | Path | None = None):
    """An `Accelerator` that falls back to the CPU (gloo) when there is no CUDA, so that
    `accelerate launch --config_file configs/accelerate/ddp_2proc.yaml` runs data-parallel on a CPU-only box;
    `grad_accum` micro-batches per optimisation step, `log_with` a tracker writing under `project_dir`."""
    from accelerate import Accelerator

    extra = {"log_with": log_with, "project_dir": str(project_dir)} if log_with else {}
    return Accelerator(cpu=not torch.cuda.is_available(), gradient_accumulation_steps=grad_accum, **extra)


class StopRequest:
    """SIGTERM (and SIGINT) ask the training loop to stop: the loop finishes its step, writes a checkpoint and
    exits with 128 + the signal number, so a preempted job resumes where it stopped instead of at the last
    periodic checkpoint. In a distributed run the ranks agree on the stop (a max all-reduce per step), since a
    signal may reach only some of them."""

    def __init__(self, accelerator):
        self.accelerator = accelerator
        self.signum = 0
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._handle)

    def _handle(self, signum, frame):
        self.signum = signum

    def exit(self, signum: int, steps_done: int) -> None:
        """Called after the checkpoint at `steps_done`: every rank leaves with 128 + the signal number."""
        self.accelerator.print(f"stopped by signal {signum} after step {steps_done}; checkpoint written, "
                               f"re-run to resume")
        self.accelerator.wait_for_everyone()
        raise SystemExit(128 + signum)

    def requested(self) -> int:
        """The signal number to exit with (0: keep going), the same on every rank."""
        if self.accelerator.num_processes == 1:
            return self.signum
        flag = torch.tensor([self.signum], device=self.accelerator.device)
        return int(self.accelerator.reduce(flag, reduction="max").item())


def gather_rng_states(accelerator) -> torch.Tensor:
    """Every rank's CPU RNG state stacked (world, S): saved with a checkpoint so each rank resumes its stream."""
    state = torch.get_rng_state()[None].to(accelerator.device)
    return accelerator.gather(state).cpu() if accelerator.num_processes > 1 else state.cpu()


def mean_over_ranks(accelerator, values: dict) -> dict:
    """Scalar logs averaged over the processes (each rank computes them on its share of the global batch)."""
    if accelerator.num_processes == 1 or not values:
        return values
    t = torch.tensor([float(v) for v in values.values()], dtype=torch.float64, device=accelerator.device)
    return dict(zip(values, accelerator.reduce(t, reduction="mean").tolist()))


def rank_spread(accelerator, modules: dict, replicated_only: bool = False) -> float:
    """How far the processes' copies of `modules` have drifted apart: the largest difference, over ranks, of a
    per-tensor fingerprint (sum and sum of squares, float64) of every parameter. Data parallelism keeps it
    exactly 0 (gradients are all-reduced, codebook restarts broadcast); it is written into each checkpoint's
    state so a drift is caught where it starts. Buffers are left out: DDP re-broadcasts them from rank 0 at
    every forward, and until then BatchNorm statistics hold each process's own batch. 0 for one process."""
    if accelerator.num_processes == 1:
        return 0.0
    # FSDP holds shards (DTensors): compare whole tensors, gathered (a collective every rank joins), or with
    # `replicated_only` (sharded checkpoints, which never gather) only the tensors every rank holds whole
    full = [t.full_tensor() if hasattr(t, "full_tensor") else t for m in modules.values() for t in m.parameters()
            if not (replicated_only and hasattr(t, "full_tensor"))]
    if not full:
        return 0.0
    fp = torch.stack([torch.stack([t.detach().double().sum(), t.detach().double().square().sum()])
                      for t in full]).flatten()
    every = accelerator.gather(fp.to(accelerator.device)[None])  # (world, 2 * tensors)
    return float((every - every[:1]).abs().max())


def load_run_config(cls, doc: str, argv=None):
    """The run config of dataclass `cls` from `--config FILE` and dot-list overrides; an unknown key, a bad value
    or a missing file is a usage error (exit 2, naming it)."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--config", default=None, help="YAML config (see configs/)")
    parser.add_argument("overrides", nargs="*", help="dot-list overrides, e.g. train.steps=100")
    if _resumable(cls):
        parser.add_argument("--resume", default=None, metavar="latest|PATH|none",
                            help="resume from the run directory's latest checkpoint (default), a checkpoint or run "
                                 "directory PATH, or start fresh (none); the same as train.resume=")
    args = parser.parse_args(argv)
    overrides = list(args.overrides) + ([f"train.resume={args.resume}"] if getattr(args, "resume", None) else [])
    try:
        return load_config(cls, args.config, overrides)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))


def _defaults(cfg) -> dict | None:
    """The defaults of run config `cfg`'s class as a dict (None when a field has no default)."""
    missing = dataclasses.MISSING
    if any(f.default is missing and f.default_factory is missing for f in dataclasses.fields(cfg)):
        return None
    return asdict(type(cfg)())


def _resumable(cls) -> bool:
    """Run config `cls` has a `train.resume` field (then `--resume` sets it)."""
    hint = typing.get_type_hints(cls).get("train")
    return dataclasses.is_dataclass(hint) and any(f.name == "resume" for f in dataclasses.fields(hint))


class Run:
    """One training run: `train` is the config's train section (out_dir, steps, seed, batch_size, log_every,
    ckpt_every, optionally fsdp); `cfg`, the whole config, is written to `<out_dir>/config.json`."""

    def __init__(self, cfg, train, desc: str):
        self.cfg, self.train_cfg, self.desc = cfg, train, desc
        self.grad_accum = getattr(train, "grad_accum", 1)
        if isinstance(self.grad_accum, bool) or not isinstance(self.grad_accum, int) or self.grad_accum < 1:
            raise ValueError(f"train.grad_accum must be an integer >= 1, got {self.grad_accum!r}")
        check_ema(getattr(train, "ema_decay", 0.0))
        if getattr(train, "fsdp_state_dict", "full") not in ("full", "sharded"):
            raise ValueError(f"train.fsdp_state_dict must be one of full, sharded, got {train.fsdp_state_dict!r}")
        tracker = check_report_to(getattr(train, "report_to", "none"))
        self.out = Path(train.out_dir)
        self.accelerator = make_accelerator(self.grad_accum, tracker, self.out / "trackers")
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(train.seed)
        self.ckpt, self.start = None, 0
        self.micro = 0  # the micro-batch of the current step (grad_accum)
        self.ema = self.ema_source = None  # torch AveragedModel of the `ema` module given to prepare, and it
        self.modules: dict = {}  # name -> module as built: what checkpoints hold
        self.units: list = []  # (prepared module, {name: optimizer}): what is gathered for a checkpoint

    @property
    def rank(self) -> int:
        return self.accelerator.process_index

    @property
    def world(self) -> int:
        return self.accelerator.num_processes

    @property
    def device(self):
        return self.accelerator.device

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    @property
    def sharded(self) -> bool:
        """The prepared modules hold shards (Accelerate's FSDP or `train.fsdp`), not whole parameters."""
        return self._accelerate_fsdp() or self._fsdp()

    def _accelerate_fsdp(self) -> bool:
        from accelerate.utils import DistributedType

        return self.accelerator.distributed_type == DistributedType.FSDP

    def _fsdp(self) -> bool:
        """`train.fsdp` in a run of 2+ processes that Accelerate does not already shard."""
        return bool(getattr(self.train_cfg, "fsdp", False)) and self.world > 1 and not self._accelerate_fsdp()

    def print(self, *args) -> None:
        self.accelerator.print(*args)

    def indices(self, step: int, dataset_size: int) -> list[int]:
        """This rank's share of the global batch of `step` (`batch_indices`); with `train.grad_accum` = N, of
        the current micro-batch: the step draws N * batch_size images and micro-batch m takes the m-th
        batch_size of them, so N x B accumulated take the images (and the update) of one batch of N * B."""
        t, n = self.train_cfg, self.grad_accum
        if n == 1:
            return batch_indices(step, t.batch_size, dataset_size, t.seed, self.rank, self.world)
        both = batch_indices(step, t.batch_size * n, dataset_size, t.seed)
        return both[self.micro * t.batch_size:(self.micro + 1) * t.batch_size][self.rank::self.world]

    @property
    def sync_gradients(self) -> bool:
        """This micro-batch ends the optimisation step (always true without accumulation)."""
        return self.accelerator.sync_gradients

    def clip_grad_norm_(self, parameters, max_norm: float):
        """`accelerator.clip_grad_norm_` on the step's whole gradient: at its last micro-batch only (None
        before, when the gradient holds only part of the step's batch)."""
        if not self.accelerator.sync_gradients:
            return None
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    def for_sampling(self, module: torch.nn.Module) -> torch.nn.Module:
        """`module` (the one given to `prepare` as `ema`, unwrapped) to save as the pipeline: with
        `train.ema_for_sampling` its parameters are replaced by the moving average's (in place)."""
        if self.ema is None or not getattr(self.train_cfg, "ema_for_sampling", False):
            return module
        return copy_ema_into(self.ema, module)

    def resume(self, modules: dict) -> int:
        """Name the modules a checkpoint holds (None entries are skipped) and load the latest checkpoint's weights
        and this rank's RNG state into them, before `prepare`. A fresh run instead reseeds each rank with
        `seed + rank`: the models were initialised identically everywhere, from here each rank draws its own
        noise. Returns the step to start from."""
        self.modules = {k: m for k, m in modules.items() if m is not None}
        self.ckpt = resolve_resume(getattr(self.train_cfg, "resume", "latest"), self.out)
        if self.ckpt is not None:
            saved = json.loads((Path(self.ckpt) / "state.json").read_text())["extra"].get("config")
            check_resumable(saved, asdict(self.cfg), _defaults(self.cfg))
            self.start = load_checkpoint(self.ckpt, self.modules, {}, rank=self.rank)["step"]
            self.print(f"resumed from {self.ckpt} at step {self.start}")
        else:
            torch.manual_seed(self.train_cfg.seed + self.rank)
        return self.start

    def prepare(self, module: torch.nn.Module, optimizers: dict, shard: tuple[str, ...] | None = None,
                ema: torch.nn.Module | None = None):
        """`module` (the one whose forward runs the step) and `optimizers` over its parameters, prepared:
        replicated (DDP) or, with `train.fsdp`, sharded by `fully_shard` per submodule whose class is named in
        `shard` (default: the models' own `_no_split_modules`, `memory.shard_classes`), then the root. A resumed
        run gets its optimizer states back here, after sharding. With `train.gradient_checkpointing` the models
        in `module` recompute their blocks' activations in the backward pass. `ema` (with `train.ema_decay` > 0):
        the module inside `module` whose moving average is kept (`self.ema`), updated after every optimisation
        step and checkpointed as "ema". Returns (module, *optimizers)."""
        acc, t = self.accelerator, self.train_cfg
        if getattr(t, "gradient_checkpointing", False):
            self.print(f"gradient checkpointing: {', '.join(enable_gradient_checkpointing(module))}")
        decay = getattr(t, "ema_decay", 0.0)
        if decay > 0 and ema is not None:
            if self.sharded:
                raise ValueError("train.ema_decay > 0 is not available with a sharded model (train.fsdp=true in 2+ "
                                 "processes): the average would need the whole weights on every rank")
            self.ema, self.ema_source = make_ema(ema, decay).to(acc.device), ema
            if self.ckpt is not None and self._has(self.ckpt, "ema"):
                self.ema.load_state_dict(read_tensors(self.ckpt, "ema"))
        shard = shard if shard is not None else shard_classes(module)
        if self._fsdp():
            units = self._fully_shard(module.to(acc.device), optimizers.values(), shard)
            self.print(f"fully_shard: {units} units ({', '.join(shard)} and the root) over {self.world} processes")
            opts = acc.prepare(*optimizers.values()) if optimizers else ()
            opts = opts if isinstance(opts, (tuple, list)) else (opts,)
        else:
            module, *opts = acc.prepare(module, *optimizers.values())
        optimizers = dict(zip(optimizers, opts))
        if self.ckpt is not None:
            for name, opt in optimizers.items():
                restore_optimizer(self.ckpt, name, module, opt)
        self.units.append((module, optimizers))
        return (module, *optimizers.values())

    @staticmethod
    def _fully_shard(module, optimizers, shard):
        """FSDP2 in place, then the optimizers pointed at the sharded parameters (fully_shard replaces them)."""
        from torch.distributed.fsdp import fully_shard

        names = {id(p): n for n, p in module.named_parameters()}
        units = [sub for sub in module.modules() if type(sub).__name__ in shard] + [module]
        for sub in units:
            fully_shard(sub)
        params = dict(module.named_parameters())
        for opt in optimizers:
            for group in opt.param_groups:
                group["params"] = [params[names[id(p)]] for p in group["params"]]
        return len(units)

    @staticmethod
    def _has(ckpt, name: str) -> bool:
        return name in {f.split("/")[0].removesuffix(".safetensors")
                        for f in json.loads((Path(ckpt) / "state.json").read_text())["files"]}

    def checkpoint(self, step: int) -> None:
        """Every rank joins (the state gathers are collectives); rank 0 writes `step-XXXXXXX/` (every rank its
        shards, with `train.fsdp_state_dict=sharded` in a sharded run)."""
        acc = self.accelerator
        sharded = self.sharded and getattr(self.train_cfg, "fsdp_state_dict", "full") == "sharded"
        rng = gather_rng_states(acc)
        spread = rank_spread(acc, self.modules, replicated_only=sharded)
        extra = {"rank_spread": spread, "config": asdict(self.cfg)}
        weights, optims = {}, {}
        for module, optimizers in self.units:
            state, opt_states = (gather_sharded_state if sharded else gather_training_state)(module, optimizers)
            optims |= opt_states
            inner = acc.unwrap_model(module)
            for fqn, sub in inner.named_modules():
                name = next((n for n, m in self.modules.items() if m is sub), None)
                if name is not None:
                    prefix = fqn + "." if fqn else ""
                    weights[name] = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        if self.ema is not None:
            weights["ema"] = self.ema.state_dict()
        if sharded:
            save_sharded_checkpoint(self.out, step, weights, optims, self.rank, extra=extra, rng_states=rng)
            return
        acc.wait_for_everyone()
        if self.is_main:
            save_checkpoint(self.out, step, weights, optims, extra=extra, rng_states=rng)

    def train(self, step_fn, digits: dict | None = None, show: tuple = ("loss",)) -> None:
        """Run steps `start` .. `train.steps - 1`: `step_fn(step)` takes one optimisation step and returns the
        scalars (numbers or 0-d tensors) to log, rounded to `digits[name]` places (default 5, None: as is)."""
        t, acc = self.train_cfg, self.accelerator
        logger = JsonlLogger(self.out, self.is_main)
        last = logger.rewind(self.start)
        stop = StopRequest(acc)
        if self.is_main:
            write_json_atomic(self.out / "config.json", asdict(self.cfg))
        if acc.log_with:
            acc.init_trackers(self.out.name, config=tracker_config(asdict(self.cfg)))
        digits = digits or {}
        bar = tqdm(range(self.start, t.steps), initial=self.start, total=t.steps, desc=self.desc,
                   disable=not self.is_main)
        # elapsed_s / cpu_s run on from the resumed log's last record (the steps a killed run took after that
        # record and before its checkpoint are not counted twice, nor at all)
        t0 = time.time() - last.get("elapsed_s", 0.0)
        c0 = time.process_time() - last.get("cpu_s", 0.0)
        for step in bar:
            values = self._step(step_fn, step)
            if step % t.log_every == 0 or step + 1 == t.steps:
                values = mean_over_ranks(acc, values)  # the global batch's values, not this rank's
                record = {"step": step}
                for k, v in values.items():
                    d = digits.get(k, 5)
                    record[k] = float(v) if d is None else round(float(v), d)
                record["elapsed_s"] = round(time.time() - t0, 1)
                record["cpu_s"] = round(time.process_time() - c0, 1)  # this process's CPU time, all threads
                logger.log(record)
                if acc.log_with:
                    acc.log({k: v for k, v in record.items() if k != "step"}, step=step)
                bar.set_postfix({k: record[k] for k in show if k in record})
            signum = stop.requested()
            if (step + 1) % t.ckpt_every == 0 or step + 1 == t.steps or signum:
                self.checkpoint(step + 1)
            if signum:
                stop.exit(signum, step + 1)
        acc.wait_for_everyone()
        if acc.log_with:
            acc.end_training()

    def _step(self, step_fn, step: int) -> dict:
        """One optimisation step: `step_fn(step)` once, or once per micro-batch inside Accelerate's `accumulate`
        (gradients summed, DDP's all-reduce at the last one only; the prepared optimizers step and zero there
        only), its values averaged over the micro-batches (None entries, e.g. a norm before the last, skipped).
        Then the moving average takes the new weights."""
        if self.grad_accum == 1:
            values = step_fn(step)
        else:
            modules = [m for m, _ in self.units]
            seen: dict = {}
            for self.micro in range(self.grad_accum):
                with self.accelerator.accumulate(*modules) if modules else contextlib.nullcontext():
                    for k, v in step_fn(step).items():
                        if v is not None:
                            seen.setdefault(k, []).append(float(v))
            self.micro = 0
            values = {k: sum(v) / len(v) for k, v in seen.items()}
        if self.ema is not None:
            self.ema.update_parameters(self.ema_source)
        return values
