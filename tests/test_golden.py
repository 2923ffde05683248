"""Behaviour kept through refactors: the shipped models' PNG bytes for fixed prompts and seeds (AR, SJD,
watermarked) and the loss sequences of short seeded training runs of every paradigm and tokenizer kind equal
the ones recorded in tests/golden.json (see tests/golden.py)."""

import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent


def test_outputs_equal_the_recorded_goldens():
    # a fresh process: no torch state (threads, seeds, flags) carried over from other tests
    proc = subprocess.run([sys.executable, str(HERE / "golden.py")], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "identical", proc.stdout[-2000:]


def test_golden_file_covers_every_zoo_model_and_paradigm():
    golden = json.loads((HERE / "golden.json").read_text())
    zoo = {p.name for p in (HERE.parent / "mmgen" / "zoo").iterdir() if (p / "model_index.json").is_file()}
    assert {k.split("/")[0] for k in golden["zoo"]} == zoo
    assert {"generator/next_token", "generator/token_shuffle", "generator/next_scale", "generator/flow_head",
            "generator/flowar", "generator/next_x", "tokenizer/seed"} <= set(golden["training"])
