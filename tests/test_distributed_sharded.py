"""Sharded checkpoints (`train.fsdp_state_dict=sharded`): under `train.fsdp=true` in 2 CPU processes (gloo) every
rank writes its own shards through `torch.distributed.checkpoint` (safetensors, no whole state on rank 0), and the
checkpoint resumes under 2 processes bit for bit and under 1 to float tolerance; Janus fine-tuning shards its
language model's decoder layers (transformers' class), not only the root. The launch pattern is
tests/test_distributed.py's."""

import json

from test_distributed import FSDP, losses, rewound_copy, run, state
from test_finetune_janus import args as janus_args
from test_finetune_janus import folder, janus_dir  # noqa: F401 (fixtures)

from mmgen.training.checkpoint import read_tensors

SHARDED = [*FSDP, "train.fsdp_state_dict=sharded"]


def max_diff(a, b, name="model") -> float:
    x, y = read_tensors(a, name), read_tensors(b, name)
    assert x.keys() == y.keys()
    return max((x[k].double() - y[k].double()).abs().max().item() for k in x)


def test_fsdp_checkpoints_resume_in_either_format_under_two_and_one_processes(tmp_path):
    """One sharded run (checkpoints at steps 3 and 6) and a chain of resumes from it, each continuing the same
    computation: its sharded step 3 under 2 processes writing whole-tensor checkpoints (at 4 and 6), that run's
    whole-tensor step 4 under 2 processes again (both bit for bit), and each format in one process (to float
    tolerance)."""
    sharded = tmp_path / "sharded"
    printed = run("train_generator.py", *SHARDED, f"train.out_dir={sharded}", processes=2, port=29661)
    assert "fully_shard: 3 units" in printed  # two Blocks and the root, over 2 processes
    ckpt = sharded / "step-0000003"
    assert state(sharded, 3)["format"] == "sharded" and not (ckpt / "model.safetensors").exists()
    # one file of shards per rank, per module and per optimizer, each listed with its checksum
    assert sorted(p.name for p in (ckpt / "model").glob("*.safetensors")) == [
        "shard-00001-model-00001-of-00001.safetensors", "shard-00002-model-00001-of-00001.safetensors"]
    assert len(list((ckpt / "opt.optim").glob("shard-*.safetensors"))) == 2
    assert {"model/shard-00001-model-00001-of-00001.safetensors", "rng.safetensors"} <= set(state(sharded, 3)["files"])
    assert (sharded / "pipeline" / "model_index.json").is_file()  # rebuilt from the shards
    ref = losses(sharded)
    assert sorted(ref) == list(range(6))

    # the sharded checkpoint resumed by 2 processes that write whole tensors (fsdp_state_dict=full, the default)
    whole = rewound_copy(sharded, tmp_path / "whole", 3)
    printed = run("train_generator.py", *FSDP, "train.ckpt_every=2", f"train.out_dir={whole}", processes=2,
                  port=29662)
    assert "resumed from" in printed and "fully_shard" in printed
    assert (whole / "step-0000004" / "model.safetensors").is_file() and "format" not in state(whole, 4)
    assert [state(whole, s)["extra"]["rank_spread"] for s in (4, 6)] == [0.0, 0.0]
    assert losses(whole) == ref
    assert max_diff(sharded / "step-0000006", whole / "step-0000006") == 0.0
    assert max_diff(sharded / "step-0000006", whole / "step-0000006", "opt.optim") == 0.0

    # a whole-tensor checkpoint resumed by 2 processes, each loading its shards of it: the same computation again
    again = rewound_copy(whole, tmp_path / "again", 4)
    assert "resumed from" in run("train_generator.py", *FSDP, "train.ckpt_every=2", f"train.out_dir={again}",
                                 processes=2, port=29663)
    assert losses(again) == ref
    assert max_diff(sharded / "step-0000006", again / "step-0000006") == 0.0

    # one process reads either format whole. Float32 sums of 2 half-batch gradients against one full batch differ
    # in the last bits (measured: 1.2e-7 in the weights after 3 resumed steps, logged losses equal to their 5
    # decimals); 1e-4 leaves room for that and a rounding flip of the logged value, and is far below a step's
    # change of the loss (about 1e-2 here)
    for src, step in [(sharded, 3), (whole, 4)]:
        one = rewound_copy(src, tmp_path / f"one-{step}", step)
        run("train_generator.py", *FSDP, "train.ckpt_every=2", f"train.out_dir={one}")
        assert sorted(losses(one)) == list(range(6))
        assert all(abs(losses(one)[s] - ref[s]) < 1e-4 for s in range(6)), (step, losses(one), ref)
        assert max_diff(sharded / "step-0000006", one / "step-0000006") < 1e-5


def test_janus_fsdp_shards_its_decoder_layers(janus_dir, folder, tmp_path):  # noqa: F811
    common = [a for a in janus_args(janus_dir, folder, tmp_path, 3) if not a.startswith("train.out_dir")]
    common += ["train.cond_drop_prob=0"]
    printed = run("train_generator.py", *common, "train.fsdp=true", "train.fsdp_state_dict=sharded",
                  f"train.out_dir={tmp_path / 'two'}", processes=2, port=29664)
    assert "fully_shard: 3 units (LlamaDecoderLayer and the root)" in printed
    run("train_generator.py", *common, f"train.out_dir={tmp_path / 'one'}")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [0, 1, 2] and all(abs(one[s] - two[s]) < 1e-4 for s in one), (one, two)
    weights = read_tensors(tmp_path / "two" / "step-0000003", "language_model")
    ref = read_tensors(tmp_path / "one" / "step-0000003", "language_model")
    assert max((weights[k] - ref[k]).abs().max().item() for k in ref) < 1e-5
    assert json.loads((tmp_path / "two" / "pipeline" / "config.json").read_text())["model_type"] == "janus"
