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
"""

from __future__ import annotations

import argparse
import json
import math
import signal
import time
from dataclasses import asdict
from pathlib import Path

import torch
from tqdm.auto import tqdm

from mmgen.atomic import write_json_atomic, write_text_atomic
from mmgen.config import load_config
from mmgen.training.checkpoint import (gather_training_state, latest_checkpoint, load_checkpoint,
                                       restore_optimizer, save_checkpoint)
from mmgen.training.data import batch_indices


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


def make_accelerator():
    """An `Accelerator` that falls back to the CPU (gloo) when there is no CUDA, so that
    `accelerate launch --config_file configs/accelerate/ddp_2proc.yaml` runs data-parallel on a CPU-only box."""
    from accelerate import Accelerator

    return Accelerator(cpu=not torch.cuda.is_available())


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


def rank_spread(accelerator, modules: dict) -> float:
    """How far the processes' copies of `modules` have drifted apart: the largest difference, over ranks, of a
    per-tensor fingerprint (sum and sum of squares, float64) of every parameter. Data parallelism keeps it
    exactly 0 (gradients are all-reduced, codebook restarts broadcast); it is written into each checkpoint's
    state so a drift is caught where it starts. Buffers are left out: DDP re-broadcasts them from rank 0 at
    every forward, and until then BatchNorm statistics hold each process's own batch. 0 for one process."""
    if accelerator.num_processes == 1:
        return 0.0
    # FSDP holds shards (DTensors): compare whole tensors, gathered (a collective every rank joins)
    full = [t.full_tensor() if hasattr(t, "full_tensor") else t for m in modules.values() for t in m.parameters()]
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
    args = parser.parse_args(argv)
    try:
        return load_config(cls, args.config, args.overrides)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))


class Run:
    """One training run: `train` is the config's train section (out_dir, steps, seed, batch_size, log_every,
    ckpt_every, optionally fsdp); `cfg`, the whole config, is written to `<out_dir>/config.json`."""

    def __init__(self, cfg, train, desc: str):
        self.cfg, self.train_cfg, self.desc = cfg, train, desc
        self.accelerator = make_accelerator()
        self.out = Path(train.out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(train.seed)
        self.ckpt, self.start = None, 0
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
        """This rank's share of the global batch of `step` (`batch_indices`)."""
        t = self.train_cfg
        return batch_indices(step, t.batch_size, dataset_size, t.seed, self.rank, self.world)

    def resume(self, modules: dict) -> int:
        """Name the modules a checkpoint holds (None entries are skipped) and load the latest checkpoint's weights
        and this rank's RNG state into them, before `prepare`. A fresh run instead reseeds each rank with
        `seed + rank`: the models were initialised identically everywhere, from here each rank draws its own
        noise. Returns the step to start from."""
        self.modules = {k: m for k, m in modules.items() if m is not None}
        self.ckpt = latest_checkpoint(self.out)
        if self.ckpt is not None:
            self.start = load_checkpoint(self.ckpt, self.modules, {}, rank=self.rank)["step"]
            self.print(f"resumed from {self.ckpt} at step {self.start}")
        else:
            torch.manual_seed(self.train_cfg.seed + self.rank)
        return self.start

    def prepare(self, module: torch.nn.Module, optimizers: dict, shard: tuple[str, ...] = ("Block",)):
        """`module` (the one whose forward runs the step) and `optimizers` over its parameters, prepared:
        replicated (DDP) or, with `train.fsdp`, sharded by `fully_shard` per submodule whose class is named in
        `shard`, then the root. A resumed run gets its optimizer states back here, after sharding.
        Returns (module, *optimizers)."""
        acc = self.accelerator
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

    def checkpoint(self, step: int) -> None:
        """Every rank joins (the state gathers are collectives); rank 0 writes `step-XXXXXXX/`."""
        acc = self.accelerator
        rng = gather_rng_states(acc)
        spread = rank_spread(acc, self.modules)
        weights, optims = {}, {}
        for module, optimizers in self.units:
            state, opt_states = gather_training_state(module, optimizers)
            optims |= opt_states
            inner = acc.unwrap_model(module)
            for fqn, sub in inner.named_modules():
                name = next((n for n, m in self.modules.items() if m is sub), None)
                if name is not None:
                    prefix = fqn + "." if fqn else ""
                    weights[name] = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
        acc.wait_for_everyone()
        if self.is_main:
            save_checkpoint(self.out, step, weights, optims, extra={"rank_spread": spread}, rng_states=rng)

    def train(self, step_fn, digits: dict | None = None, show: tuple = ("loss",)) -> None:
        """Run steps `start` .. `train.steps - 1`: `step_fn(step)` takes one optimisation step and returns the
        scalars (numbers or 0-d tensors) to log, rounded to `digits[name]` places (default 5, None: as is)."""
        t, acc = self.train_cfg, self.accelerator
        logger = JsonlLogger(self.out, self.is_main)
        last = logger.rewind(self.start)
        stop = StopRequest(acc)
        if self.is_main:
            write_json_atomic(self.out / "config.json", asdict(self.cfg))
        digits = digits or {}
        bar = tqdm(range(self.start, t.steps), initial=self.start, total=t.steps, desc=self.desc,
                   disable=not self.is_main)
        # elapsed_s / cpu_s run on from the resumed log's last record (the steps a killed run took after that
        # record and before its checkpoint are not counted twice, nor at all)
        t0 = time.time() - last.get("elapsed_s", 0.0)
        c0 = time.process_time() - last.get("cpu_s", 0.0)
        for step in bar:
            values = step_fn(step)
            if step % t.log_every == 0 or step + 1 == t.steps:
                values = mean_over_ranks(acc, values)  # the global batch's values, not this rank's
                record = {"step": step}
                for k, v in values.items():
                    d = digits.get(k, 5)
                    record[k] = float(v) if d is None else round(float(v), d)
                record["elapsed_s"] = round(time.time() - t0, 1)
                record["cpu_s"] = round(time.process_time() - c0, 1)  # this process's CPU time, all threads
                logger.log(record)
                bar.set_postfix({k: record[k] for k in show if k in record})
            signum = stop.requested()
            if (step + 1) % t.ckpt_every == 0 or step + 1 == t.steps or signum:
                self.checkpoint(step + 1)
            if signum:
                stop.exit(signum, step + 1)
        acc.wait_for_everyone()
