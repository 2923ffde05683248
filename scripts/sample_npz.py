"""Sample a saved pipeline into one `.npz` in ADM's format (`arr_0` uint8 (N, H, W, 3); `arr_1` the class labels of
a class-conditional model), sharded over the processes of `accelerate launch`, as ADM's `image_sample.py` and
LlamaGen's `sample_c2i_ddp.py` do for the field's 50,000 ImageNet samples (50 per class).

    accelerate launch --multi_gpu --num_processes 8 scripts/sample_npz.py --model DIR --per-class 50 \\
        --out samples.npz
    accelerate launch --config_file configs/accelerate/ddp_2proc.yaml scripts/sample_npz.py \\
        --model shapes-emoji --prompts prompts.txt --per-prompt 4 --out samples.npz
    mmgen eval --samples samples.npz --reference REF.npz --inception-weights pt_inception-2015-12-05-6726825d.pth

With no CUDA the processes run on the CPU (gloo), so the 2-process config runs on a CPU-only box too
(`accelerate launch --cpu` alone starts one process unless MPI is set up).

Image i (the conditions in order, each repeated --per-class / --per-prompt times) is drawn with seed --seed + i,
so the batch depends neither on the number of processes nor on the batch size. The images are cut into shards
of --shard-size; shard k belongs to process k mod P and is written to `<out>.shards/shard-<k>.npz` when done, so a
rerun (with any number of processes) skips finished shards. Process 0 then packs the shards in order into --out
(streamed, written under a temporary name), writes `<out>.json` (conditions, seeds, sampling options) and removes
the shards (--keep-shards keeps them). The conditioning is the pipeline's: `class_labels=` or `prompt=`, read
from its conditioning (`pipe.condition.kind`) or, failing that, from its `__call__` signature.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from mmgen.atomic import atomic_path, write_json_atomic
from mmgen.eval.adm_npz import IMAGES, LABELS, write_npz
from mmgen.options import add_sampling_args, positive_int, sampling_kwargs, seed
from mmgen.pipelines import load_pipeline
from mmgen.pipelines.base import generators_from_seed
from mmgen.zoo import resolve_model

KINDS = ("caption", "class")
MANIFEST = "manifest.json"
POLL_SECONDS = 2.0  # process 0 checks this often for the other processes' shards


class SingleProcess:
    """The slice of accelerate's `PartialState` this script uses, for a call without `accelerate launch`."""

    process_index, num_processes, is_main_process = 0, 1, True
    device = torch.device("cpu")

    def wait_for_everyone(self) -> None:
        pass


def _conditioning(pipe):
    """The pipeline's `mmgen.conditioning` object (`pipe.condition`), if it has one."""
    return getattr(pipe, "condition", None)


def condition_kind(pipe, asked: str | None = None) -> str:
    """"class" or "caption": the pipeline's conditioning kind (`pipe.condition.kind`), else what its `__call__`
    takes (`class_labels=`, `prompt=`), else, where it takes both, `asked` (what the flags given imply)."""
    kind = getattr(_conditioning(pipe), "kind", None)
    if kind in KINDS:
        return kind
    if kind is not None:
        raise ValueError(f"--model: {type(pipe).__name__} is {kind}; sample_npz.py samples class-conditional "
                         f"(class_labels=) or caption (prompt=) models")
    params = inspect.signature(type(pipe).__call__).parameters
    takes = [k for k, arg in (("class", "class_labels"), ("caption", "prompt")) if arg in params]
    if len(takes) == 1:
        return takes[0]
    if takes and asked in takes:
        return asked
    raise ValueError(f"--model: cannot tell how {type(pipe).__name__} is conditioned (its __call__ takes "
                     f"{', '.join(params)}); pass --num-classes for class_labels= or --prompts for prompt=")


def _digest(obj) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True).encode()).hexdigest()


def shard_dir(out: Path) -> Path:
    return out.with_name(out.stem + ".shards")


def shard_path(out: Path, k: int) -> Path:
    return shard_dir(out) / f"shard-{k:06d}.npz"


def _config(model, pipe, kind: str, conditions: list, per: int, seed_: int, shard_size: int, sampling: dict) -> dict:
    """What fixes the images: a rerun resumes only shards made under the same config."""
    sampling = dict(sampling)
    if sampling.get("watermark_key") is not None:  # never write a secret key
        sampling["watermark_key"] = "sha256:" + hashlib.sha256(str(sampling["watermark_key"]).encode()).hexdigest()
    return {"model": str(model), "pipeline": type(pipe).__name__, "kind": kind, "num_conditions": len(conditions),
            "conditions_sha256": _digest(conditions), "per_condition": per, "num_images": len(conditions) * per,
            "seed": seed_, "shard_size": shard_size, "sampling": sampling}


def _check_existing(path: Path, config: dict, what: str) -> bool:
    """True when `path` records `config`; False when it does not exist; an error when it records another run."""
    if not path.is_file():
        return False
    old = json.loads(path.read_text())
    old = old.get("config", old)
    if old != config:
        diff = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
        raise ValueError(f"--out: {what} {str(path.parent if path.name == MANIFEST else path)!r} comes from another "
                         f"run (it differs in {', '.join(diff)}); delete it or choose another --out")
    return True


def _shard_done(path: Path, expected: range) -> bool:
    if not path.is_file():
        return False
    try:
        with np.load(path, allow_pickle=False) as d:
            return np.array_equal(d["index"], np.arange(expected.start, expected.stop))
    except (OSError, ValueError, KeyError):  # unreadable: made again
        return False


def _generate(pipe, kind: str, conds: list, seed_: int, sampling: dict) -> np.ndarray:
    kwargs = {"class_labels": conds} if kind == "class" else {"prompt": conds}
    out = pipe(**kwargs, generator=generators_from_seed(seed_, len(conds)), **sampling)
    return np.stack([np.asarray(im.convert("RGB")) for im in out.images])


def _checked(out: Path, conditions: list, per, batch_size, shard_size, kind: str) -> str:
    """The arguments checked at the edge; the condition kind."""
    if out.suffix != ".npz":
        raise ValueError(f"--out must end in .npz (ADM's format), got {str(out)!r}")
    for name, v in (("--per-class / --per-prompt", per), ("--batch-size", batch_size), ("--shard-size", shard_size)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
    if not conditions:
        raise ValueError("conditions must be a non-empty list of class ids or prompts")
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {', '.join(KINDS)}; got {kind!r}")
    return kind


def _sample_shard(pipe, kind: str, item_conds: list, items: range, path: Path, seed: int, batch_size: int,
                  sampling: dict, rank: int, bar) -> None:
    """Images `items` (item i with seed + i), written atomically as one shard file."""
    images = []
    for start in range(items.start, items.stop, batch_size):
        stop = min(start + batch_size, items.stop)
        images.append(_generate(pipe, kind, item_conds[start:stop], seed + start, sampling))
        bar.update(stop - start)
    arrays = {IMAGES: np.concatenate(images), "index": np.arange(items.start, items.stop), "rank": np.array(rank)}
    if kind == "class":
        arrays[LABELS] = np.array(item_conds[items.start:items.stop], np.int64)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.savez(f, **arrays)


def _wait_for_shards(out: Path, num_shards: int, progress: bool) -> None:
    """Until every shard file exists. The files are the synchronisation: a collective barrier would time out
    (30 min) while a process that resumed with fewer shards waits for the others; a failed process stops the whole
    launch anyway."""
    missing = [k for k in range(num_shards) if not shard_path(out, k).is_file()]
    with tqdm(total=num_shards, initial=num_shards - len(missing), desc="waiting for the other processes",
              unit="shard", disable=not (progress and missing)) as bar:
        while missing:
            time.sleep(POLL_SECONDS)
            done = [k for k in missing if shard_path(out, k).is_file()]
            bar.update(len(done))
            missing = [k for k in missing if k not in done]


def sample_to_npz(pipe, conditions: list, per: int, out: str | Path, kind: str | None = None, seed: int = 0,
                  batch_size: int = 25, shard_size: int = 50, sampling: dict | None = None, model=None,
                  keep_shards: bool = False, progress: bool = True, state=None) -> dict:
    """Sample `per` images of each of `conditions` (class ids or prompts) with `pipe` into the ADM batch `out`,
    this process doing its shards of `state` (accelerate's `PartialState`; default: one process). Returns the
    report process 0 writes beside `out` (other processes return their part)."""
    out, state, sampling = Path(out), state or SingleProcess(), dict(sampling or {})
    kind = _checked(out, conditions, per, batch_size, shard_size, kind or condition_kind(pipe))
    config = _config(model if model is not None else type(pipe).__name__, pipe, kind, conditions, per, seed,
                     shard_size, sampling)
    n = config["num_images"]
    item_conds = [c for c in conditions for _ in range(per)]
    shards = [range(s, min(s + shard_size, n)) for s in range(0, n, shard_size)]
    report_path = out.with_suffix(".json")
    if out.is_file() and _check_existing(report_path, config, "report"):
        if state.is_main_process and not keep_shards and shard_dir(out).exists():
            shutil.rmtree(shard_dir(out))  # left by a run stopped right after packing
        return {**json.loads(report_path.read_text()), "already_complete": True}
    if out.exists():
        raise ValueError(f"--out {str(out)!r} exists and {str(report_path)!r} does not record this run; delete it or "
                         f"choose another --out")
    # every process checks, so a mismatch stops all of them before anyone waits at a barrier
    _check_existing(shard_dir(out) / MANIFEST, config, "shard directory")
    if state.is_main_process:
        write_json_atomic(shard_dir(out) / MANIFEST, config)
    state.wait_for_everyone()

    mine = [k for k in range(len(shards)) if k % state.num_processes == state.process_index]
    todo = [k for k in mine if not _shard_done(shard_path(out, k), shards[k])]
    pipe.set_progress_bar_config(disable=True)
    t0 = time.perf_counter()
    with tqdm(total=sum(len(shards[k]) for k in mine), initial=sum(len(shards[k]) for k in mine if k not in todo),
              desc=f"sampling (process {state.process_index}/{state.num_processes})", unit="img",
              disable=not (progress and state.is_main_process)) as bar:
        for k in todo:
            _sample_shard(pipe, kind, item_conds, shards[k], shard_path(out, k), seed, batch_size, sampling,
                          state.process_index, bar)
    seconds = time.perf_counter() - t0
    part = {"process": state.process_index, "shards": len(mine), "generated_shards": len(todo),
            "seconds": round(seconds, 2)}
    if not state.is_main_process:
        return part
    _wait_for_shards(out, len(shards), progress)
    for k, items in enumerate(shards):
        if not _shard_done(shard_path(out, k), items):
            raise RuntimeError(f"shard {k} ({str(shard_path(out, k))!r}) does not hold images {items.start}.."
                               f"{items.stop - 1}; delete it and run again")
    with np.load(shard_path(out, 0)) as d:
        h, w, c = d[IMAGES].shape[1:]

    def batches():
        for k in range(len(shards)):
            with np.load(shard_path(out, k)) as d:
                yield d[IMAGES]

    extra = {LABELS: np.array(item_conds, np.int64)} if kind == "class" else {}
    write_npz(out, (n, h, w, c), tqdm(batches(), total=len(shards), desc="packing", unit="shard",
                                       disable=not progress), extra)
    report = {"out": str(out), "shape": [n, h, w, c], "labels": LABELS if kind == "class" else None,
              "config": config, "processes": state.num_processes, "process_0": part,
              "conditions": conditions if kind == "caption" else f"class ids 0..{len(conditions) - 1}" if
              conditions == list(range(len(conditions))) else conditions}
    write_json_atomic(report_path, report)
    if not keep_shards:
        shutil.rmtree(shard_dir(out))
    return report


def _read_prompts(args) -> list[str]:
    prompts = list(args.prompt or [])
    if args.prompts:
        path = Path(args.prompts)
        if not path.is_file():
            raise FileNotFoundError(f"--prompts {str(path)!r} does not exist")
        prompts += [line.strip() for line in path.read_text().splitlines() if line.strip()]
    return prompts


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="sample_npz.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("--model", required=True, help="saved pipeline directory or shipped model name")
    p.add_argument("--out", required=True, help="the .npz to write (ADM's format)")
    c = p.add_argument_group("class-conditional models (class_labels=)")
    c.add_argument("--num-classes", type=positive_int("--num-classes"), default=None,
                   help="classes 0..C-1 to sample (default: all the model's classes)")
    c.add_argument("--per-class", type=positive_int("--per-class"), default=None,
                   help="images per class (default 50, the field's 50,000 for ImageNet's 1000 classes)")
    t = p.add_argument_group("caption models (prompt=)")
    t.add_argument("--prompts", default=None, metavar="FILE", help="text file, one prompt per line")
    t.add_argument("--prompt", action="append", default=None, metavar="TEXT", help="a prompt (repeatable)")
    t.add_argument("--per-prompt", type=positive_int("--per-prompt"), default=None,
                   help="images per prompt (default 1)")
    p.add_argument("--seed", type=seed, default=0, help="image i uses seed + i (>= 0)")
    p.add_argument("--batch-size", type=positive_int("--batch-size"), default=25, help="images per pipeline call")
    p.add_argument("--shard-size", type=positive_int("--shard-size"), default=50,
                   help="images per shard, the unit of resumption (default 50: with --per-class 50, one class)")
    p.add_argument("--keep-shards", action="store_true", help="keep <out>.shards/ after packing")
    add_sampling_args(p, watermark=True)
    p.add_argument("--json", action="store_true", help="print the JSON report (process 0) instead of progress bars")
    return p


@torch.no_grad()  # a decorator, not set_grad_enabled(False): tests call main() in-process
def main(argv=None, state=None) -> int:
    p = build_parser()
    args = p.parse_args(argv)
    try:
        if state is None:
            from accelerate import PartialState

            state = PartialState(cpu=not torch.cuda.is_available())
        pipe = load_pipeline(resolve_model(args.model))
        sampling = sampling_kwargs(pipe, args, args.model)
        has_class = args.num_classes is not None or args.per_class is not None
        has_caption = bool(args.prompt or args.prompts or args.per_prompt is not None)
        if has_class and has_caption:
            raise ValueError("pass class flags (--num-classes, --per-class) or prompt flags (--prompts, --prompt, "
                             "--per-prompt), not both")
        kind = condition_kind(pipe, "class" if has_class else "caption" if has_caption else None)
        if kind == "class":
            if has_caption:
                raise ValueError(f"--prompts / --prompt / --per-prompt: {type(pipe).__name__} takes class_labels=; "
                                 f"pass --num-classes and --per-class")
            known = getattr(_conditioning(pipe), "num_classes", None)
            if args.num_classes is not None and known is not None and args.num_classes > known:
                raise ValueError(f"--num-classes must be at most the model's {known} classes, got {args.num_classes}")
            num_classes = args.num_classes or known
            if num_classes is None:
                raise ValueError(f"--num-classes is required: {type(pipe).__name__} does not state its classes")
            conditions, per = list(range(num_classes)), args.per_class or 50
        else:
            if has_class:
                raise ValueError(f"--num-classes / --per-class: {type(pipe).__name__} takes prompt=; pass --prompts "
                                 f"FILE or --prompt TEXT, and --per-prompt")
            conditions, per = _read_prompts(args), args.per_prompt or 1
            if not conditions:
                raise ValueError(f"{type(pipe).__name__} takes prompt=: pass --prompts FILE (one per line) or "
                                 f"--prompt TEXT")
        pipe.to(state.device)
        report = sample_to_npz(pipe, conditions, per, args.out, kind=kind, seed=args.seed,
                               batch_size=args.batch_size, shard_size=args.shard_size, sampling=sampling,
                               model=args.model, keep_shards=args.keep_shards, progress=not args.json, state=state)
    except (ValueError, FileNotFoundError) as e:
        p.exit(2, f"sample_npz.py: error: {e}\n")
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
    if state.is_main_process:
        print(json.dumps(report, indent=2) if args.json else f"wrote {report['out']}: {report['shape']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
