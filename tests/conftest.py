"""Fixtures and hooks of the test suite. The factories the tests share (tiny models, pipelines, scripts loaded as
modules) are plain functions in tests/tiny.py, which test files import (`from tiny import tiny_vqgan`).

Under pytest-xdist (`-n 2`, as CI runs it) every worker computes on one thread, so two workers on two cores do
not fight over them; a test that sets its own thread count gets the worker's count back after it."""

import os

if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"  # also for the processes tests start

import pytest
import torch

from tiny import tiny_next_token_pipeline, tiny_text_tokenizer

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


# The costliest files (CPU seconds of their tests, docs/results/ci.md), costliest first. Under `-n 2 --dist loadfile
# --no-loadscope-reorder` each file goes whole to the next free worker in collection order (xdist's default
# reorder would put the files with the most tests first instead), so these start first and the cheap files fill in
# around them: neither worker is left running one long file alone at the end.
COSTLY_FIRST = ("test_sjd.py", "test_distributed.py", "test_distributed_sharded.py", "test_watermark.py",
                "test_golden.py", "test_seed.py", "test_emu3.py", "test_bench.py", "test_flow_head.py",
                "test_sample_npz.py", "test_finetune_janus.py", "test_readme.py", "test_rcc.py", "test_janus.py",
                "test_train_paradigms_e2e.py", "test_diffusers_layout.py", "test_eval_harness.py",
                "test_determinism.py")


def pytest_collection_modifyitems(config, items):
    if os.environ.get("PYTEST_XDIST_WORKER"):  # a plain run keeps the file order
        rank = {name: i for i, name in enumerate(COSTLY_FIRST)}
        items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a file kept


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """Each test starts with the worker's thread count, whatever an earlier test set."""
    threads = torch.get_num_threads()
    yield
    if torch.get_num_threads() != threads:
        torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_pipe_dir(tmp_path_factory):
    """tiny_next_token_pipeline on CAPTIONS (16 px, 8x8 codes, text up to 8 tokens), saved once per module."""
    d = tmp_path_factory.mktemp("tiny_pipe")
    tiny_next_token_pipeline(tiny_text_tokenizer()).save_pretrained(d)
    return d
