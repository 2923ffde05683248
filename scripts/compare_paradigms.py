"""Compute-matched comparison of the generation paradigms: each trained on the same shapes data for the same
CPU budget, with snapshots evaluated along the way.

    python scripts/compare_paradigms.py --budget-cpu-min 20 --out runs/compare --json
    python scripts/compare_paradigms.py --only next_token flowar --budget-cpu-min 5 --out runs/compare_small
    python scripts/compare_paradigms.py --out runs/compare --report-only --plot docs/paradigms_compute.png

For each paradigm (`PARADIGMS`: its config in configs/, the tokenizer it reads):
1. calibrate: `scripts/train_generator.py` runs `--calibration-steps` steps with a fresh decoder; the CPU time per
   step (all threads, `cpu_s` in its log) after the first few steps sets the run's length,
   steps = budget / (CPU seconds per step), so every paradigm gets the same CPU time, not the same steps;
2. train that many steps (batch 32, the config's learning rate, warmup 5% of the steps, the cosine schedule over
   the whole run), saving the pipeline at `--snapshots` evenly spaced points;
3. evaluate every snapshot with `mmgen eval` (train-split accuracy; the last one also held-out and FD-ENL0);
4. time the final pipeline with `mmgen bench --suite paradigms` (against the default model, same prompts and seeds):
   decoder passes and seconds per image at batch 1 and 8.

CPU time is the budget because it does not depend on what else the machine runs; wall time is reported beside
it. Each stage skips what a previous invocation finished, and training resumes from its checkpoint, so the whole
comparison can be stopped and re-run. `--report-only` collects what exists into the JSON report and the plot
(training loss relative to its first logged value, and train-split accuracy, against CPU thread-minutes).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from mmgen.atomic import write_json_atomic

ROOT = Path(__file__).resolve().parents[1]
VQGAN = "mmgen/zoo/shapes-emoji/vq_model"  # the GPU-trained VQGAN of the default model (32.8 dB)


@dataclass(frozen=True)
class Entry:
    config: str
    tokenizer: str
    label: str


# every paradigm on the best tokenizer of its kind that the project has
PARADIGMS = {
    "next_token": Entry("configs/generator_shapes.yaml", VQGAN, "next-token (VQGAN 8x8)"),
    "token_shuffle_s2": Entry("configs/token_shuffle_shapes.yaml", VQGAN, "Token-Shuffle s=2 (VQGAN)"),
    "seed": Entry("configs/seed_generator_shapes.yaml", "mmgen/zoo/shapes-seed/vq_model", "next-token on SEED codes"),
    "next_scale": Entry("configs/next_scale_shapes.yaml", "mmgen/zoo/shapes-nextscale/vq_model", "next-scale (VAR)"),
    "flow_head": Entry("configs/flow_head_shapes.yaml", "runs/vae_v2/final", "raster flow head (MAR-style)"),
    "flowar": Entry("configs/flowar_shapes_vae_v2.yaml", "runs/vae_v2/final", "FlowAR"),
    "next_x_cell": Entry("configs/next_x_shapes.yaml", "runs/vae_v2/final", "xAR, cell entities"),
    "next_neighbor": Entry("configs/nar_shapes.yaml", VQGAN, "NAR next-neighbour (VQGAN 8x8)"),
    "next_block": Entry("configs/next_block_shapes.yaml", VQGAN, "next-block, rows (VQGAN 8x8)"),
}


def read_log(run_dir: Path) -> list[dict]:
    path = run_dir / "log.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.is_file() else []


def cpu_seconds_per_step(log: list[dict], skip: int) -> float:
    """Steady CPU seconds per step from a log with one record per step: the first `skip` steps (allocation,
    warm caches) are left out."""
    rows = [r for r in log if r["step"] >= skip]
    if len(rows) < 2:
        raise ValueError(f"calibration log has {len(log)} records; need more than skip={skip} + 1")
    return (rows[-1]["cpu_s"] - rows[0]["cpu_s"]) / (rows[-1]["step"] - rows[0]["step"])


def snapshot_steps(steps: int, n: int) -> list[int]:
    """`n` evenly spaced steps ending at `steps`."""
    return sorted({max(1, round(steps * (k + 1) / n)) for k in range(n)})


def run(cmd: list[str], threads: int, capture: bool = False) -> str | None:
    # passive OpenMP waits: a thread that waits for its peer sleeps instead of spinning, so the CPU time a run
    # is charged is the work it did, also when something else shares the cores
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), MKL_NUM_THREADS=str(threads), OMP_WAIT_POLICY="PASSIVE")
    print("+", " ".join(cmd), flush=True)
    done = subprocess.run(cmd, cwd=ROOT, env=env, check=True, stdout=subprocess.PIPE if capture else None, text=True)
    return done.stdout


def train_args(name: str, out: Path, extra: list[str]) -> list[str]:
    e = PARADIGMS[name]
    return [sys.executable, "scripts/train_generator.py", "--config", e.config, f"tokenizer={e.tokenizer}",
            f"train.out_dir={out}", "train.batch_size=32", *extra]


def calibrate(name: str, out: Path, args) -> dict:
    calib = out / name / "calibration"
    done = out / name / "calibration.json"
    if done.is_file():
        return json.loads(done.read_text())
    n = args.calibration_steps
    for other, e in PARADIGMS.items():  # a paradigm on the same tokenizer already encoded the data: reuse it
        codes = out / other / "calibration" / "codes.safetensors"
        if e.tokenizer == PARADIGMS[name].tokenizer and codes.is_file() and not (calib / "codes.safetensors").exists():
            calib.mkdir(parents=True, exist_ok=True)
            (calib / "codes.safetensors").write_bytes(codes.read_bytes())  # its key is checked before use
    run(train_args(name, calib, [f"train.steps={n}", "train.log_every=1", f"train.ckpt_every={n}",
                                 f"train.warmup={n}"]), args.threads)
    per_step = cpu_seconds_per_step(read_log(calib), skip=3)
    steps = max(8, round(args.budget_cpu_min * 60 / per_step))
    result = {"cpu_s_per_step": round(per_step, 4), "steps": steps}
    write_json_atomic(done, result)
    return result


def train(name: str, out: Path, steps: int, args) -> Path:
    run_dir = out / name / "run"
    if (run_dir / "pipeline").is_dir():
        return run_dir
    codes = out / name / "calibration" / "codes.safetensors"
    if codes.is_file() and not (run_dir / "codes.safetensors").is_file():  # same data and tokenizer: same codes
        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / "codes.safetensors").write_bytes(codes.read_bytes())
    snaps = snapshot_steps(steps, args.snapshots)
    run(train_args(name, run_dir, [f"train.steps={steps}", f"train.warmup={max(1, steps // 20)}",
                                   f"train.ckpt_every={max(1, steps // 10)}", "train.log_every=10",
                                   f"train.snapshots=[{','.join(map(str, snaps))}]"]), args.threads)
    return run_dir


def evaluate(model: Path, report: Path, final: bool, args) -> dict:
    if not report.is_file():
        cmd = [sys.executable, "-m", "mmgen.cli", "eval", "--model", str(model), "--per-category",
               str(args.per_category), "--tokenizer-images", "0", "--batch-size", "25", "--out", str(report)]
        cmd += ["--fd", str(args.fd)] if final else ["--splits", "train"]
        run(cmd, args.threads)
    return json.loads(report.read_text())


def latency(name: str, model: Path, report: Path, args) -> dict:
    """The final pipeline's row of `mmgen bench --suite paradigms` at batch 1 and 8 (median of 3 calls), timed with
    the runs' thread count."""
    if not report.is_file():
        cmd = [sys.executable, "-m", "mmgen.cli", "bench", "--suite", "paradigms", "--models", f"{name}={model}",
               "--batch-sizes", "1", "8", "--repeats", "3", "--json"]
        write_json_atomic(report, json.loads(run(cmd, args.threads, capture=True))["paradigms"]["models"][name])
    return json.loads(report.read_text())


def summarise(name: str, out: Path) -> dict | None:
    """One paradigm's row and curves from what exists on disk."""
    run_dir = out / name / "run"
    log, calib_path = read_log(run_dir), out / name / "calibration.json"
    if not log or not calib_path.is_file():
        return None
    calib = json.loads(calib_path.read_text())
    points = []
    for snap in sorted((run_dir / "snapshots").glob("step-*")):
        report = run_dir / "snapshots" / f"{snap.name}.eval.json"
        if report.is_file():
            step = int(snap.name.split("-")[1])
            at = max((r for r in log if r["step"] < step), key=lambda r: r["step"])
            points.append({"step": step, "cpu_s": at["cpu_s"],
                           "train_accuracy": json.loads(report.read_text())["splits"]["train"]["accuracy"]})
    row = {"paradigm": name, "label": PARADIGMS[name].label, "tokenizer": PARADIGMS[name].tokenizer,
           "steps": calib["steps"], "samples_seen": calib["steps"] * 32,
           "cpu_s_per_step_calibration": calib["cpu_s_per_step"],
           "cpu_s": log[-1]["cpu_s"], "wall_s": log[-1]["elapsed_s"],
           "samples_per_s_wall": round(32 * (log[-1]["step"] + 1) / log[-1]["elapsed_s"], 1),
           "samples_per_cpu_s": round(32 * (log[-1]["step"] + 1) / log[-1]["cpu_s"], 2),
           "loss_first": log[0]["loss"], "loss_last": log[-1]["loss"],
           "curve": [{"step": r["step"], "cpu_s": r["cpu_s"], "loss": r["loss"]} for r in log],
           "snapshots": points}
    final = run_dir / "pipeline.eval.json"
    if final.is_file():
        e = json.loads(final.read_text())
        row |= {"parameters": e["parameters"]["decoder"],
                "train_accuracy": e["splits"]["train"]["accuracy"],
                "heldout_accuracy": e["splits"]["heldout"]["accuracy"],
                "color_check_train": e["splits"]["train"]["per_check"].get("color"),
                "fd_enl0": e.get("fd_enl0", {}).get("value"),
                "seconds_per_image": e["speed"]["seconds_per_image"],
                "decoder_passes_per_image": e["speed"]["nfe_per_image"]}
    timing = run_dir / "pipeline.latency.json"
    if timing.is_file():
        t = json.loads(timing.read_text())
        row |= {"decoder_passes_per_image": t["nfe_per_image"],
                **{f"seconds_per_image_batch_{b}": t["latency"][f"batch_{b}"]["seconds_per_image"] for b in (1, 8)}}
    return row


def markdown(rows: list[dict]) -> str:
    """The comparison table as Markdown (the README's)."""
    head = ("| paradigm | decoder params | steps (samples seen) | CPU thread-min | samples / CPU-s | train / held-out "
            "accuracy | colour (train) | FD-ENL0 | passes / image | s / image | s / image at batch 1, 8 |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in rows:
        pct = lambda v: "—" if v is None else f"{100 * v:.1f}%"  # noqa: E731
        params = f"{r['parameters'] / 1e6:.2f} M" if "parameters" in r else "—"
        lines.append(f"| {r['label']} | {params} | {r['steps']} ({r['samples_seen'] // 1000}k) "
                     f"| {r['cpu_s'] / 60:.1f} | {r['samples_per_cpu_s']} | {pct(r.get('train_accuracy'))} / "
                     f"{pct(r.get('heldout_accuracy'))} | {pct(r.get('color_check_train'))} | {r.get('fd_enl0', '—')} "
                     f"| {r.get('decoder_passes_per_image', '—')} | {r.get('seconds_per_image', '—')} "
                     f"| {r.get('seconds_per_image_batch_1', '—')}, {r.get('seconds_per_image_batch_8', '—')} |")
    return "\n".join(lines)


def plot(rows: list[dict], budget_min: float, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install -e '.[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(12, 4.5))
    for row in rows:
        curve = row["curve"]
        x = [r["cpu_s"] / 60 for r in curve]
        ax_loss.plot(x, [r["loss"] / curve[0]["loss"] for r in curve], label=row["label"], lw=1.2)
        if row["snapshots"]:
            ax_acc.plot([p["cpu_s"] / 60 for p in row["snapshots"]],
                        [100 * p["train_accuracy"] for p in row["snapshots"]], "o-", label=row["label"])
    ax_loss.set(xlabel="CPU thread-minutes", ylabel="training loss / first logged loss", yscale="log",
                title="training loss (each paradigm's own loss)")
    ax_acc.set(xlabel="CPU thread-minutes", ylabel="train-split compositional accuracy (%)",
               title=f"accuracy at the same CPU budget ({budget_min:g} thread-min each)")
    ax_loss.legend(fontsize=8)
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    os.replace(tmp, path)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, required=True, help="directory of the runs (one folder per paradigm)")
    p.add_argument("--only", nargs="+", choices=list(PARADIGMS), default=list(PARADIGMS), help="paradigms to run")
    p.add_argument("--budget-cpu-min", type=float, default=20.0, help="CPU thread-minutes of training each")
    p.add_argument("--threads", type=int, default=2, help="torch threads of every run")
    p.add_argument("--calibration-steps", type=int, default=12, help="steps timed to size each run")
    p.add_argument("--snapshots", type=int, default=3, help="evaluated points per run (the last is the end)")
    p.add_argument("--per-category", type=int, default=25, help="eval prompts per category and split")
    p.add_argument("--fd", type=int, default=200, help="FD-ENL0 images of the final evaluation")
    p.add_argument("--report-only", action="store_true", help="train nothing; collect what exists")
    p.add_argument("--report", type=Path, default=None, help="JSON report (default: <out>/report.json)")
    p.add_argument("--plot", type=Path, default=None, help="PNG of the loss and accuracy curves")
    p.add_argument("--markdown", action="store_true", help="print the comparison table as Markdown")
    p.add_argument("--json", action="store_true", help="print the JSON report")
    args = p.parse_args(argv)
    for flag in ("budget_cpu_min", "threads", "calibration_steps", "snapshots", "per_category"):
        if getattr(args, flag) <= 0:
            p.error(f"--{flag.replace('_', '-')} must be > 0, got {getattr(args, flag)}")
    if args.calibration_steps < 6:
        p.error(f"--calibration-steps must be >= 6 (the first 3 are not timed), got {args.calibration_steps}")
    if not args.report_only:
        missing = [f"{n}: {PARADIGMS[n].tokenizer}" for n in args.only if not (ROOT / PARADIGMS[n].tokenizer).is_dir()]
        if missing:
            p.error("tokenizer directories missing (train them first, e.g. scripts/train_tokenizer.py --config "
                    "configs/vae_shapes_v2.yaml for runs/vae_v2/final): " + "; ".join(missing))
        for name in args.only:
            steps = calibrate(name, args.out, args)["steps"]
            run_dir = train(name, args.out, steps, args)
            for snap in sorted((run_dir / "snapshots").glob("step-*")):
                if snap.is_dir():
                    evaluate(snap, snap.parent / f"{snap.name}.eval.json", final=False, args=args)
            evaluate(run_dir / "pipeline", run_dir / "pipeline.eval.json", final=True, args=args)
            latency(name, run_dir / "pipeline", run_dir / "pipeline.latency.json", args)
    rows = [r for n in args.only if (r := summarise(n, args.out)) is not None]
    report = {"budget_cpu_min": args.budget_cpu_min, "threads": args.threads, "batch_size": 32,
              "data": "shapes, 20000 images, seed 0, 64 px", "per_category": args.per_category, "rows": rows}
    write_json_atomic(args.report or args.out / "report.json", report)
    if args.plot:
        plot(rows, args.budget_cpu_min, args.plot)
    if args.markdown:
        print(markdown(rows))
    if args.json:
        print(json.dumps({**report, "rows": [{k: v for k, v in r.items() if k != "curve"} for r in rows]}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
