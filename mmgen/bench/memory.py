"""The memory suite (`mmgen bench --suite memory`): peak resident memory (RSS, MB) of generating with a saved
next-token pipeline at each batch size and of a few training steps of its decoder, each job in a fresh process
(`memory_job.py`, which holds the jobs' work) so peaks never mix, beside the baseline of a process that only
imports torch. CPU only. The requirement: generating with the default model stays under 2 GB (`MEMORY_LIMIT_MB`).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from tqdm.auto import tqdm

MEMORY_LIMIT_MB = 2048
JOB_SCRIPT = Path(__file__).with_name("memory_job.py")


def bench_memory(model_dir, batch_sizes=(1, 8), train_steps: int = 5, train_batch: int = 32, threads: int = 1,
                 progress: bool = True) -> dict:
    """Peak RSS (MB) of each job in its own process: torch import alone (baseline), generating at each batch
    size, and `train_steps` training steps at `train_batch`; `over_baseline_mb` is what the job itself adds."""
    jobs = {"baseline": dict(kind="baseline")}
    jobs |= {f"generate_batch_{b}": dict(kind="generate", batch=b) for b in batch_sizes}
    if train_steps:
        jobs["train"] = dict(kind="train", batch=train_batch, steps=train_steps)
    report = {"model": str(model_dir), "threads": threads, "limit_mb": MEMORY_LIMIT_MB, "jobs": {}}
    for name, job in tqdm(jobs.items(), desc="bench memory", disable=not progress):
        job = {**job, "model": str(model_dir), "threads": threads}
        proc = subprocess.run([sys.executable, str(JOB_SCRIPT), json.dumps(job)], capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"memory job {name} failed:\n{proc.stderr[-2000:]}")
        peak = json.loads(proc.stdout.strip().splitlines()[-1])["peak_rss_mb"]
        row = {k: job[k] for k in ("batch", "steps") if k in job}
        row["peak_rss_mb"] = round(peak, 1)
        if name != "baseline":
            row["over_baseline_mb"] = round(peak - report["jobs"]["baseline"]["peak_rss_mb"], 1)
        report["jobs"][name] = row
    report["generate_under_limit"] = all(r["peak_rss_mb"] < MEMORY_LIMIT_MB for n, r in report["jobs"].items()
                                         if n.startswith("generate"))
    return report
