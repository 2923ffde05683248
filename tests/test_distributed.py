"""Data-parallel training through `accelerate launch` (2 CPU processes, gloo) and resume after SIGTERM/SIGKILL.

Two processes split each global batch, so after the same steps they must hold identical copies (checked by the
scripts' `rank_spread` in every checkpoint) equal to a single process on the same global batch; a run killed
mid-way resumes from its last checkpoint with the loss sequence of a run that was never stopped.
"""

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tiny import load_script

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}
TOK = ["model.base_channels=8", "model.channel_mult=[1,2,2,2]", "model.embed_dim=16", "model.num_codes=32",
       "model.code_dim=4", "loss.perceptual_weight=0.05", "loss.perceptual_resize=null", "loss.disc_start=3",
       "loss.disc_channels=8", "data.size=64", "train.batch_size=8", "train.eval_images=16", "train.log_every=1",
       "train.steps=6", "train.ckpt_every=3"]
GEN = ["model.dim=32", "model.n_layers=2", "model.n_heads=4", "data.size=64", "train.batch_size=16",
       "train.log_every=1", "train.lr=3e-3", "train.warmup=5", "train.cond_drop_prob=0.1"]


def run(script, *args, processes=1, port=29650) -> str:
    """A training run; returns what it printed. One process runs the script's main here, on one thread as the
    launched processes do (so its floats match theirs bit for bit); two go through `accelerate launch`."""
    if processes == 1:
        threads = torch.get_num_threads()
        printed = io.StringIO()
        torch.set_num_threads(1)
        try:
            with contextlib.redirect_stdout(printed):
                load_script(script.removesuffix(".py")).main(list(args))
        finally:
            torch.set_num_threads(threads)
        return printed.getvalue()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "ddp_2proc.yaml"), "--main_process_port", str(port),
           str(ROOT / "scripts" / script), *args]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=ENV, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout + proc.stderr


def losses(run_dir: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines())}


def state(run_dir: Path, step: int) -> dict:
    return json.loads((run_dir / f"step-{step:07d}" / "state.json").read_text())


BUFFERS = ("usage_ema", "running_mean", "running_var")  # statistics of the batch each copy last saw


def max_diff(a: Path, b: Path, name: str) -> float:
    """Largest parameter difference between two checkpoints' copies of a module."""
    x, y = load_file(a / name), load_file(b / name)
    assert x.keys() == y.keys()
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x
               if x[k].is_floating_point() and not k.endswith(BUFFERS))


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    d = tmp_path_factory.mktemp("dist")
    run("train_tokenizer.py", *TOK, f"train.out_dir={d / 'one'}")
    run("train_tokenizer.py", *TOK, f"train.out_dir={d / 'two'}", processes=2, port=29651)
    return d


def test_tokenizer_two_processes_stay_in_sync_and_match_one(tokenizers):
    one, two = tokenizers / "one", tokenizers / "two"
    assert [state(two, s)["extra"]["rank_spread"] for s in (3, 6)] == [0.0, 0.0]
    # before the discriminator starts (step 3) the two runs take the same steps, codebook restarts included
    a, b = losses(one), losses(two)
    assert all(abs(a[s] - b[s]) < 1e-4 for s in range(3)), (a, b)
    first = (one / "step-0000003", two / "step-0000003")
    assert max_diff(*first, "model.safetensors") < 1e-4
    # after it, the discriminator's BatchNorm normalises each process's half batch: close, not equal
    last = (one / "step-0000006", two / "step-0000006")
    assert max_diff(*last, "model.safetensors") < 1e-2
    assert (two / "final" / "metrics.json").is_file()


@pytest.fixture(scope="module")
def generators(tokenizers):
    d = tokenizers
    gen = [*GEN, f"tokenizer={d / 'one' / 'final'}", "train.steps=6", "train.ckpt_every=3",
           "train.cond_drop_prob=0"]
    run("train_generator.py", *gen, f"train.out_dir={d / 'gen_one'}")
    run("train_generator.py", *gen, f"train.out_dir={d / 'gen_two'}", processes=2, port=29652)
    return d


def test_generator_two_processes_stay_in_sync_and_match_one(generators):
    one, two = generators / "gen_one", generators / "gen_two"
    assert [state(two, s)["extra"]["rank_spread"] for s in (3, 6)] == [0.0, 0.0]
    a, b = losses(one), losses(two)
    assert sorted(b) == list(range(6))
    assert all(abs(a[s] - b[s]) < 1e-4 for s in range(6)), (a, b)  # the logged loss is the global batch's
    assert max_diff(one / "step-0000006", two / "step-0000006", "model.safetensors") < 1e-5
    assert (two / "pipeline" / "model_index.json").is_file()


def start_and_signal(args, run_dir: Path, sig, after_step: int) -> tuple[int, str]:
    """Start a training run, send `sig` once it has logged `after_step`, return its exit code."""
    proc = subprocess.Popen([sys.executable, str(ROOT / "scripts" / "train_generator.py"), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=ENV, cwd=ROOT)
    log = run_dir / "log.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if log.is_file() and len(log.read_text().splitlines()) > after_step:
            proc.send_signal(sig)
            break
        time.sleep(0.02)
    output, _ = proc.communicate(timeout=120)
    assert proc.returncode != 0, "the run ended before it could be signalled; raise train.steps"
    return proc.returncode, output


KILLED = [*GEN, "train.steps=60", "train.ckpt_every=5"]


@pytest.fixture(scope="module")
def never_stopped(tokenizers):
    """The run a killed one must reproduce: 60 steps, never stopped."""
    ref = tokenizers / "ref"
    run("train_generator.py", *KILLED, f"tokenizer={tokenizers / 'one' / 'final'}", f"train.out_dir={ref}")
    return ref


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["sigterm", "sigkill"])
def test_killed_run_resumes_with_the_same_loss_sequence(tokenizers, never_stopped, tmp_path, sig):
    gen = [*KILLED, f"tokenizer={tokenizers / 'one' / 'final'}"]
    ref = never_stopped
    out = tmp_path / "killed"
    code, err = start_and_signal([*gen, f"train.out_dir={out}"], out, sig, after_step=12)
    if sig == signal.SIGTERM:  # stops after its step, checkpoints there, exits 128 + 15
        assert code == 128 + signal.SIGTERM and "checkpoint written" in err, err[-2000:]
        stopped = int((out / "latest").read_text().split("-")[1])
        assert stopped >= 13 and stopped == max(losses(out)) + 1  # checkpointed at the step it stopped after
    else:  # killed at once: the last periodic checkpoint survives, nothing half-written
        assert code == -signal.SIGKILL
        stopped = int((out / "latest").read_text().split("-")[1])
        assert stopped % 5 == 0 and stopped >= 10 and max(losses(out)) >= stopped  # steps past it are redone
    printed = run("train_generator.py", *gen, f"train.out_dir={out}")
    assert f"step {stopped}" in printed
    assert losses(out) == losses(ref)  # steps 0..59, each logged once, identical values
    assert max_diff(ref / "step-0000060", out / "step-0000060", "model.safetensors") == 0.0


# Sharded decoder training: torch's fully_shard (FSDP2) on CPU with gloo, applied by the training loop itself since
# Accelerate's FSDP plugin runs on GPUs only (with `--cpu` it falls back to DDP). cond_drop_prob=0: the
# condition-drop draws are per rank, so only without them do 1 and 2 processes see the same batches.
FSDP = [*GEN[:4], "data.size=32", "train.batch_size=8", "train.log_every=1", "train.lr=3e-3", "train.warmup=2",
        "train.cond_drop_prob=0", "train.steps=6", "train.ckpt_every=3", "train.fsdp=true",
        f"tokenizer={ROOT / 'mmgen' / 'zoo' / 'shapes-nexttoken' / 'vq_model'}"]


def rewound_copy(src: Path, dst: Path, step: int) -> Path:
    """A copy of run `src` as it was when it had written checkpoint `step` (later checkpoints and the pipeline
    gone; its log still runs past `step`, as a killed run's does)."""
    import shutil

    shutil.copytree(src, dst)
    for later in dst.glob("step-*"):
        if int(later.name.split("-")[1]) > step:
            shutil.rmtree(later)
    shutil.rmtree(dst / "pipeline")
    (dst / "latest").write_text(f"step-{step:07d}")
    return dst
