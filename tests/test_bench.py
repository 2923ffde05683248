"""`mmgen bench`: the SJD suite's report on a tiny pipeline (structure, both baselines, exact modes' greedy tokens
equal to AR's, and that check's power), the CLI's errors, the memory suite on the shipped model."""

import json
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tiny import tiny_next_token_pipeline, tiny_text_tokenizer, tiny_vqgan
from mmgen import bench, cli
from mmgen.bench import device
from mmgen.models.compiled_decode import window_widths
from mmgen.paradigms import next_token
from mmgen.pipelines import load_pipeline
from mmgen.pipelines.base import DEFAULT_GUIDANCE_SCALE
from mmgen.zoo import DEFAULT_MODEL


@pytest.fixture(scope="module")
def tiny_shapes_pipe_dir(tmp_path_factory):
    """A tiny next-token pipeline that reads shapes prompts: 8 px images of 4 x 4 codes, a 2-layer decoder."""
    d = tmp_path_factory.mktemp("tiny_shapes_pipe")
    tok = tiny_text_tokenizer(shapes_words=True)
    tiny_next_token_pipeline(tok, tiny_vqgan(image_size=8), max_seq_len=64, max_text_len=24).save_pretrained(d)
    return d


def _sjd_report(model_dir, monkeypatch):
    # the compiled modes' graphs run eagerly here (their values are test_compiled_decode's): the suite's bookkeeping
    # is what is tested, in seconds
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    # compiled adaptive SJD with shared noise weighs its widths by this machine's measured pass times, and runs
    # plain AR where no width pays: on a busy machine (2 test workers on 2 cores) the tiny model's timings are
    # noise and sometimes pick AR. A fixed table (a verify pass costs an AR step plus 5% per extra token) keeps
    # the report's rows machine-independent (this test checks the suite's bookkeeping, not this machine's timings)
    monkeypatch.setattr(next_token, "measure_pass_costs", lambda model, rows, window, *args, **kw: (
        tuple((w, 1.0 + 0.05 * (w - 1)) for w in window_widths(window, "cpu")), 1.0))
    return bench.bench_sjd(model_dir, batch_sizes=(1,), repeats=1, num_prompts=2, window=4, eval_per_category=0,
                           sweep_windows=(), tree_widths=(), tree_depth=2, pass_widths=(1, 2), accept_widths=(2,),
                           hf_generate=False, progress=False)


def test_sjd_suite_report(tiny_shapes_pipe_dir, monkeypatch):
    r = _sjd_report(tiny_shapes_pipe_dir, monkeypatch)
    n = r["tokens_per_image"]
    assert n == 16 and r["num_prompts"] == 2 and r["window"] == 4
    assert r["guidance_scale"] == DEFAULT_GUIDANCE_SCALE  # the model's own: it was saved with the default
    rows = r["latency"]["batch_1"]
    exact = {"ar_compiled", "sjd", "sjd_coupled", "sjd_adaptive", "sjd_tree", "sjd_tree_adaptive", "sjd_shared",
             "sjd_compiled", "sjd_compiled_adaptive"}
    assert set(rows) == exact | {"ar", "sjd_lantern"}
    for name, row in rows.items():
        assert row["lossless"] is (name != "sjd_lantern")  # only LANTERN relaxes the acceptance
        assert set(row) >= {"speedup", "speedup_vs_compiled"}  # against both baselines
        assert row["passes_per_call"] == n if name.startswith("ar") else row["passes_per_call"] < n
    assert rows["ar"]["speedup"] == rows["ar_compiled"]["speedup_vs_compiled"] == 1.0
    # shared-noise verification samples AR's own tokens for the same seeds, eager and through the compiled path
    for name in ("ar_compiled", "sjd_shared", "sjd_compiled", "sjd_compiled_adaptive"):
        assert rows[name]["tokens_equal_ar"] == 1.0, name
    # every exact mode commits AR's greedy tokens, the compiled ones through the compiled modes' code paths
    assert r["greedy_equals_ar"]["batch_1"] == dict.fromkeys(exact, True)
    timing = r["pass_time"]["batch_1"]
    assert timing["rows"] == 2 and set(timing["ar_step_ms"]) == {"eager", "compiled"}
    assert set(timing["verify_pass_ms"]) == {"width_1", "width_2"}
    assert set(timing["verify_pass_ms"]["width_2"]) == {"eager", "compiled"}
    profile = r["pass_profile"]["batch_1"]
    assert set(profile) == {"sjd", "sjd_adaptive", "sjd_compiled_adaptive"}
    assert profile["sjd"]["mean_width"] > 1 and profile["sjd"]["passes"] < n
    accepted = r["accepted_by_width_batch_1"]
    assert set(accepted) == {"coupled_width_2", "coupled_above_width_2", "shared_width_2", "shared_above_width_2"}
    assert all(1 <= a <= 2 for a in accepted.values())


def test_sjd_modes_keep_both_baselines(tiny_shapes_pipe_dir, monkeypatch):
    """`--sjd-modes` narrows the SJD modes, never the baselines: each row's ratio against compiled AR needs the
    compiled AR row (a filter that kept only "ar" reported no compiled baseline at all)."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    r = bench.bench_sjd(tiny_shapes_pipe_dir, batch_sizes=(1,), repeats=1, num_prompts=2, window=4, eval_per_category=0,
                        sweep_windows=(), tree_widths=(), pass_widths=(), accept_widths=(), profile=False,
                        hf_generate=False, progress=False, modes=("sjd_shared",))
    rows = r["latency"]["batch_1"]
    assert set(rows) == {"ar", "ar_compiled", "sjd_shared"}
    assert rows["ar_compiled"]["speedup_vs_compiled"] == 1.0 and "speedup_vs_compiled" in rows["sjd_shared"]


def test_greedy_check_catches_a_wrong_verifier(tiny_shapes_pipe_dir, monkeypatch):
    """The suite's exactness column has power: a verifier that accepts every draft (no rejection) is reported."""
    import mmgen.sampling.sjd as sjd_module

    verify = sjd_module.verify

    def accept_all(p, q, x, remaining, draws, *args):
        draws.accept = draws.accept - 1  # every draft passes its test, whatever p says
        return verify(p, q, x, remaining, draws, *args)

    pipe = load_pipeline(tiny_shapes_pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    modes = {"ar": dict(sampler="ar"), "sjd": dict(sampler="sjd", sjd_window=4)}
    prompts = ["a red circle", "two blue squares"]
    assert bench.sjd.greedy_check(pipe, prompts, modes, 2, 3.0) == {"sjd": True}
    monkeypatch.setattr(sjd_module, "verify", accept_all)
    assert bench.sjd.greedy_check(pipe, prompts, modes, 2, 3.0) == {"sjd": False}


def test_gpu_check_pieces_dry_run(tiny_shapes_pipe_dir, tmp_path, monkeypatch):
    """Every piece of scripts/gpu_check.sh at toy sizes on the CPU (its --device cpu mode), and the report they
    make: each step's status, the tests' counts, each piece's JSON."""
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn)
    suites = device.suites("cpu", tmp_path / "suites.json", tiny=True, model=tiny_shapes_pipe_dir)
    assert set(suites["sjd"]["latency"]) == {"batch_1", "batch_2"}
    assert set(suites["sjd"]["latency"]["batch_2"]) == set(device.SUITE_MODES)
    assert suites["decode"]["batch_2"]["greedy_tokens_identical"] is True
    timing = device.pass_time("cpu", tmp_path / "pass_time.json", tiny=True, dtype=torch.float32)
    assert set(timing["eager_ms"]) == set(timing["compiled_ms"]) == {"width_1", "width_2"}
    train = device.train("cpu", tmp_path / "train.json", tiny=True, model=tiny_shapes_pipe_dir)
    assert train["batch_size"] == 4 and train["bf16"]["images_per_second"] > 0 and "bf16_speedup" in train
    (tmp_path / "steps.txt").write_text("tests 0 3\nsuites 0 9\npass_time 0 1\ntrain 124 50\n")
    (tmp_path / "tests.xml").write_text('<testsuites><testsuite tests="7" failures="1" errors="0" skipped="0">'
                                        '<testcase classname="t" name="a"><failure/></testcase>'
                                        '<testcase classname="t" name="b"/></testsuite></testsuites>')
    r = device.report(tmp_path)
    assert r["steps"]["train"] == {"exit_status": 124, "seconds": 50, "timed_out": True}
    assert r["tests"] == {"ran": True, "tests": 7, "failures": 1, "errors": 0, "skipped": 0, "failed": ["t::a"]}
    assert [r[k] for k in ("suites", "pass_time", "train")] == json.loads(json.dumps([suites, timing, train]))


def test_gpu_check_script_arguments(tmp_path):
    script = Path(__file__).resolve().parents[1] / "scripts" / "gpu_check.sh"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    proc = subprocess.run(["bash", str(script)], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "give REPORT.json, or set $OUT" in proc.stderr
    proc = subprocess.run(["bash", str(script), "--gpu"], capture_output=True, text=True, env=env)
    assert proc.returncode == 2 and "unknown option --gpu" in proc.stderr
    proc = subprocess.run(["bash", str(script), "--help"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0 and "--device cpu: a dry run" in proc.stdout


def test_bench_cli_rejects_bad_suite_and_model(tmp_path, monkeypatch, capsys):
    for args, needle in ((["--suite", "nope"], "--suite"), (["--model", str(tmp_path / "none")], "--model"),
                         (["--suite", "sjd", "--sjd-modes", "sjd", "nope"], "--sjd-modes must be among ar, ")):
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


def test_bench_cli_focused_runs(monkeypatch):
    """--sjd-modes asks the sjd suite for those modes' latency table alone; --watermark-images 0 for the watermark's
    overhead alone (attack_suite with no images)."""
    from mmgen import bench

    seen = {}
    monkeypatch.setattr(bench, "run", lambda suites, **kw: seen.update(kw, suites=suites) or {})
    assert cli.main(["bench", "--suite", "sjd", "--sjd-modes", "sjd_shared", "sjd_compiled", "--json"]) == 0
    assert seen["suites"] == ["sjd"] and seen["modes"] == ("sjd_shared", "sjd_compiled")
    assert (seen["tree_widths"], seen["sweep_windows"], seen["eval_per_category"], seen["hf_generate"]) == \
        ((), (), 0, False)
    seen.clear()
    assert cli.main(["bench", "--suite", "sjd", "--json"]) == 0
    assert "modes" not in seen and seen["eval_per_category"] == 16  # the full suite without the flag
    seen.clear()
    assert cli.main(["bench", "--suite", "watermark", "--watermark-images", "0", "--json"]) == 0
    assert seen["watermark_images"] == 0


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
