"""Sharded sampling into one ADM `.npz` (`scripts/sample_npz.py`): two processes under `accelerate launch` write
disjoint shards that pack into one batch in item order, a rerun under any number of processes makes only the
missing shards, and class-conditional pipelines get `class_labels=` and an `arr_1`."""

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tiny import free_port

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "sample_npz.py"
spec = importlib.util.spec_from_file_location("sample_npz_script", SCRIPT)
sample_npz = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sample_npz)

PROMPTS = ["a red circle", "a blue square"]


class Rank(sample_npz.SingleProcess):
    """Process `index` of `count`, run one after the other in this process (the barrier is then a no-op)."""

    def __init__(self, index, count):
        self.process_index, self.num_processes, self.is_main_process = index, count, index == 0


class ClassStub:
    """A class-conditional pipeline's call signature: each image is filled with 10 * label + a draw of its own
    generator, so labels and seeds can be read back from the pixels."""

    calls = 0

    def __call__(self, class_labels, generator=None, guidance_scale=None):
        ClassStub.calls += 1
        values = [10 * c + int(torch.randint(0, 10, (1,), generator=g)) for c, g in zip(class_labels, generator)]
        return type("Out", (), {"images": [Image.new("RGB", (4, 4), (v, v, v)) for v in values]})()

    def set_progress_bar_config(self, **kwargs):
        pass


def test_class_conditional_shards_are_disjoint_and_pack_in_item_order(tmp_path):
    pipe, out = ClassStub(), tmp_path / "c.npz"
    assert sample_npz.condition_kind(pipe) == "class"
    run = dict(per=3, out=out, seed=7, batch_size=2, shard_size=2, keep_shards=True, progress=False)
    part = sample_npz.sample_to_npz(pipe, [0, 1, 2], state=Rank(1, 2), **run)  # shards 1, 3
    seconds = part.pop("seconds")  # wall-clock of this process's shards (a stub: well under a second)
    assert part == {"process": 1, "shards": 2, "generated_shards": 2} and isinstance(seconds, float)
    assert 0 <= seconds < 30  # a duration, not a clock reading
    report = sample_npz.sample_to_npz(pipe, [0, 1, 2], state=Rank(0, 2), **run)  # shards 0, 2, 4; then packs
    shards = sorted((tmp_path / "c.shards").glob("shard-*.npz"))
    owners = {}
    for path in shards:
        with np.load(path) as d:
            owners.update({int(i): int(d["rank"]) for i in d["index"]})
    assert owners == {i: (i // 2) % 2 for i in range(9)}  # every image once, shard k on process k mod 2
    with np.load(out) as d:
        assert d["arr_0"].shape == (9, 4, 4, 3) and d["arr_0"].dtype == np.uint8
        assert d["arr_1"].tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
        draws = [int(torch.randint(0, 10, (1,), generator=torch.Generator().manual_seed(7 + i))) for i in range(9)]
        assert d["arr_0"][:, 0, 0, 0].tolist() == [10 * (i // 3) + draws[i] for i in range(9)]  # image i: seed 7 + i
    assert report["shape"] == [9, 4, 4, 3] and report["labels"] == "arr_1"
    assert json.loads(out.with_suffix(".json").read_text())["config"]["kind"] == "class"

    ClassStub.calls = 0
    again = sample_npz.sample_to_npz(pipe, [0, 1, 2], state=Rank(0, 1), **run)
    assert again["already_complete"] and ClassStub.calls == 0
    with pytest.raises(ValueError, match="comes from another run .it differs in conditions_sha256, num_conditions"):
        sample_npz.sample_to_npz(pipe, [0, 1], state=Rank(0, 1), **run)


@pytest.fixture(scope="module")
def two_process_run(tmp_path_factory):
    """shapes-emoji, 3 images in shards of 1 over 2 CPU processes (accelerate launch with the repo's 2-process
    config; with no CUDA the script asks for the CPU, so gloo): process 0 makes images 0 and 2, process 1 image 1."""
    out = tmp_path_factory.mktemp("sharded") / "samples.npz"
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
           str(ROOT / "configs" / "accelerate" / "ddp_2proc.yaml"), "--main_process_port", str(free_port()),
           str(SCRIPT), "--model", "shapes-emoji", "--out", str(out), "--prompt", PROMPTS[0], "--prompt", PROMPTS[1],
           "--prompt", PROMPTS[0], "--per-prompt", "1", "--shard-size", "1", "--batch-size", "1", "--seed", "5",
           "--keep-shards", "--json"]
    proc = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return out, json.loads(proc.stdout[proc.stdout.index("{"):])


@pytest.fixture(scope="module")
def emoji():
    from mmgen.pipelines import load_pipeline

    return load_pipeline("shapes-emoji")


def test_two_processes_shard_disjointly_pack_in_order_and_a_rerun_resumes(two_process_run, emoji, tmp_path):
    out, report = two_process_run
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[0]]
    assert report["processes"] == 2 and report["shape"] == [3, 64, 64, 3] and report["labels"] is None
    assert report["conditions"] == prompts and report["config"]["kind"] == "caption"
    owners = {}
    for path in sorted(out.with_name("samples.shards").glob("shard-*.npz")):
        with np.load(path) as d:
            owners.update({int(i): int(d["rank"]) for i in d["index"]})
    assert owners == {0: 0, 1: 1, 2: 0}
    with np.load(out) as d:
        packed = d["arr_0"].copy()
        assert packed.dtype == np.uint8 and "arr_1" not in d.files

    # image 1 (the other process's), drawn here with seed 5 + 1: the same pixels
    from mmgen.pipelines.base import generators_from_seed

    emoji.set_progress_bar_config(disable=True)
    one = emoji(prompt=[prompts[1]], generator=generators_from_seed(6, 1)).images[0]
    assert np.array_equal(packed[1], np.asarray(one.convert("RGB")))
    assert not np.array_equal(packed[0], packed[2])  # same prompt, seeds 5 and 7

    # a rerun in one process after a crash that lost the batch and one shard makes only that shard
    copy = tmp_path / "samples.npz"
    shards = copy.with_name("samples.shards")
    shards.mkdir()
    for path in out.with_name("samples.shards").iterdir():
        if path.name != "shard-000002.npz":
            (shards / path.name).write_bytes(path.read_bytes())
    again = sample_npz.sample_to_npz(emoji, prompts, 1, copy, seed=5, batch_size=1, shard_size=1,
                                     sampling={"temperature": 1.0}, model="shapes-emoji", progress=False)
    assert again["process_0"]["generated_shards"] == 1 and again["process_0"]["shards"] == 3
    with np.load(copy) as d:
        assert np.array_equal(d["arr_0"], packed)
    assert not shards.exists()  # removed after packing (no --keep-shards)


def test_bad_flags_exit_2_with_the_flag_named(tmp_path, capsys):
    def run(*args):
        with pytest.raises(SystemExit) as e:
            sample_npz.main(["--model", "shapes-emoji", *args], state=sample_npz.SingleProcess())
        return e.value.code, capsys.readouterr().err

    code, err = run("--out", str(tmp_path / "x.png"), "--prompt", "a red circle")
    assert code == 2 and "--out must end in .npz" in err
    code, err = run("--out", str(tmp_path / "x.npz"), "--per-class", "2")
    assert code == 2 and "--num-classes / --per-class: NextTokenPipeline takes prompt=" in err
    code, err = run("--out", str(tmp_path / "x.npz"))
    assert code == 2 and "pass --prompts FILE (one per line) or --prompt TEXT" in err
    code, err = run("--out", str(tmp_path / "x.npz"), "--prompt", "a red circle", "--shard-size", "0")
    assert code == 2 and "--shard-size must be >= 1, got 0" in err
    assert not list(tmp_path.iterdir())
    with pytest.raises(SystemExit) as e:
        sample_npz.main(["--help"])
    assert e.value.code == 0 and "accelerate launch" in capsys.readouterr().out


def test_a_class_conditional_pipeline_is_sampled_by_class_labels_into_arr_1(tmp_path, capsys):
    """A real (tiny) class-conditional NextTokenPipeline through the script: the classes come from its conditioning,
    each image from `class_labels=` with its own seed, the labels in `arr_1`."""
    from tiny import BACKBONE, tiny_vqgan
    from mmgen.conditioning import ClassConditioning
    from mmgen.models.transformer import Transformer
    from mmgen.pipelines import NextTokenPipeline, save_pipeline
    from mmgen.pipelines.base import generators_from_seed
    from mmgen.text import UnifiedVocab

    cond, vq = ClassConditioning(3), tiny_vqgan()
    vocab = UnifiedVocab(text_vocab_size=cond.vocab_size, image_vocab_size=vq.vocab_size)
    decoder = Transformer(vocab_size=vocab.size, max_seq_len=32, **BACKBONE)
    pipe = NextTokenPipeline(transformer=decoder.eval(), vq_model=vq.eval(), tokenizer=None, max_text_len=1,
                             conditioning=cond.config())
    save_pipeline(pipe, tmp_path / "model")
    out = tmp_path / "c2i.npz"
    assert sample_npz.main(["--model", str(tmp_path / "model"), "--out", str(out), "--per-class", "2",
                            "--batch-size", "1", "--shard-size", "2", "--seed", "3", "--json"],
                           state=sample_npz.SingleProcess()) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["config"]["kind"] == "class" and report["conditions"] == "class ids 0..2"
    with np.load(out) as d:
        assert d["arr_1"].tolist() == [0, 0, 1, 1, 2, 2] and d["arr_0"].shape == (6, 16, 16, 3)
        pipe.set_progress_bar_config(disable=True)
        for i in (1, 4):
            image = pipe(class_labels=[i // 2], generator=generators_from_seed(3 + i, 1)).images[0]
            assert np.array_equal(d["arr_0"][i], np.asarray(image.convert("RGB")))
        assert not np.array_equal(d["arr_0"][0], d["arr_0"][1])
