"""`mmgen bench`: the SJD suite on the shipped model, at the smallest settings, reports consistent ratios."""

import runpy
import sys
from pathlib import Path

import pytest

from mmgen import bench, cli
from mmgen.zoo import DEFAULT_MODEL, default_guidance_scale


def test_sjd_suite_report():
    r = bench.bench_sjd(DEFAULT_MODEL, batch_sizes=(1, 2), repeats=1, num_prompts=2, eval_per_category=1,
                        sweep_windows=(4,), tree_widths=(1,), tree_depth=2, compiled=False, progress=False)
    n = r["tokens_per_image"]
    assert n == 64 and r["num_prompts"] == 2
    assert r["guidance_scale"] == default_guidance_scale(DEFAULT_MODEL) == 1.5  # the model's own, as generate
    modes = {"ar", "sjd", "sjd_coupled", "sjd_adaptive", "sjd_tree", "sjd_tree_adaptive", "sjd_lantern"}
    for b in ("batch_1", "batch_2"):
        rows = r["latency"][b]
        assert set(rows) == modes
        assert rows["ar"]["passes_per_call"] == n and rows["ar"]["step_compression"] == 1.0
        assert rows["ar"]["speedup"] == 1.0
        for name, row in rows.items():  # every mode says whether it is exact; only LANTERN is not
            assert row["lossless"] is (name != "sjd_lantern")
            assert 1 <= row["passes_per_call"] <= n
            assert row["step_compression"] == pytest.approx(n / row["passes_per_call"], abs=1e-3)
        profile = r["pass_profile"][b]["sjd"]
        assert 0 < profile["forward_share"] <= 1 and 1 <= profile["mean_width"] <= 16
    assert set(r["accuracy"]) == modes and r["accuracy"]["ar"]["n"] == 4
    assert r["accuracy"]["sjd_lantern"]["lossless"] is False
    assert r["window_sweep_batch_1"]["window_4"]["step_compression"] >= 1.0
    # the chain runs first as the tree sweep's baseline, also when not asked for
    assert list(r["tree_sweep_batch_1"]) == ["tree_width_0", "tree_width_1"] and r["tree_depth"] == 2
    assert r["tree_sweep_batch_1"]["tree_width_0"]["compression_gain"] == 1.0
    assert r["pass_profile"]["batch_1"]["sjd_tree"]["passes"] <= n
    # transformers' generate() on the converted weights takes the same greedy path as mmgen's decode loop
    assert r["hf_generate"]["batch_1"]["greedy_tokens_identical"] is True
    assert r["hf_generate"]["batch_2"]["greedy_tokens_identical"] is True
    # and so does the compiled decode step (compiled for one and for two rows), timed apart from its compile
    for b in ("batch_1", "batch_2"):
        row = r["hf_generate"][b]
        assert row["compiled_greedy_tokens_identical"] is True and row["compile_seconds"] >= 0
        assert row["generate_over_mmgen_compiled"] == pytest.approx(
            row["transformers_generate_seconds"] / row["mmgen_compiled_seconds"], rel=0.01)
    assert len(set(r["hf_generate"]["prompts"])) == 3


def test_bench_cli_rejects_bad_suite_and_model(tmp_path, monkeypatch, capsys):
    for args, needle in ((["--suite", "nope"], "--suite"), (["--model", str(tmp_path / "none")], "--model")):
        with pytest.raises(SystemExit) as exc:  # in-process: the exit status `mmgen bench` would return
            cli.main(["bench", *args, "--json"])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and needle in err, err
    # scripts/benchmark.py, run as a script, is `mmgen bench`
    script = Path(__file__).resolve().parents[1] / "scripts" / "benchmark.py"
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    with pytest.raises(SystemExit) as exc:
        runpy.run_path(str(script), run_name="__main__")
    assert exc.value.code == 0 and "usage: mmgen bench" in capsys.readouterr().out


def test_memory_suite_default_model_under_2gb():
    """The issue's requirement: generating with the default model stays under 2 GB of resident memory. Each job
    runs in its own process, so its peak is its own and includes the torch import (the baseline)."""
    r = bench.bench_memory(DEFAULT_MODEL, batch_sizes=(1,), train_steps=1, train_batch=2, progress=False)
    jobs = r["jobs"]
    assert set(jobs) == {"baseline", "generate_batch_1", "train"} and r["limit_mb"] == 2048
    base, gen, train = (jobs[k]["peak_rss_mb"] for k in ("baseline", "generate_batch_1", "train"))
    assert 0 < base < gen < bench.MEMORY_LIMIT_MB and r["generate_under_limit"] is True
    # loading 24 MB of weights and sampling adds to the baseline; training adds gradients and AdamW moments
    assert jobs["generate_batch_1"]["over_baseline_mb"] == pytest.approx(gen - base, abs=0.2) and gen - base > 20
    assert train > base and jobs["train"] == {"batch": 2, "steps": 1, "peak_rss_mb": train,
                                              "over_baseline_mb": pytest.approx(train - base, abs=0.2)}
