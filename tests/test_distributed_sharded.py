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


def test_sharded_checkpoint_round_trip_under_two_and_one_processes(tmp_path):
    sharded = tmp_path / "sharded"
    run("train_generator.py", *SHARDED, f"train.out_dir={sharded}", processes=2, port=29661)
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

    two = rewound_copy(sharded, tmp_path / "two", 3)
    assert "resumed from" in run("train_generator.py", *SHARDED, f"train.out_dir={two}", processes=2, port=29662)
    assert losses(two) == ref
    assert max_diff(sharded / "step-0000006", two / "step-0000006") == 0.0
    assert max_diff(sharded / "step-0000006", two / "step-0000006", "opt.optim") == 0.0

    # one process reads the 2 ranks' shards whole (see test_distributed.py for the tolerance)
    one = rewound_copy(sharded, tmp_path / "one", 3)
    run("train_generator.py", *SHARDED, f"train.out_dir={one}")
    assert all(abs(losses(one)[s] - ref[s]) < 1e-4 for s in range(6)), (losses(one), ref)
    assert max_diff(sharded / "step-0000006", one / "step-0000006") < 1e-5


def test_janus_fsdp_shards_its_decoder_layers(janus_dir, folder, tmp_path):  # noqa: F811
    common = [a for a in janus_args(janus_dir, folder, tmp_path, 3) if not a.startswith("train.out_dir")]
    common += ["train.cond_drop_prob=0"]
    printed = run("train_generator.py", *common, "train.fsdp=true", "train.fsdp_state_dict=sharded",
                  f"train.out_dir={tmp_path / 'two'}", processes=2, port=29663)
    assert "fully_shard: 3 units (LlamaDecoderLayer and the root)" in printed
    run("train_generator.py", *common, f"train.out_dir={tmp_path / 'one'}")
    one, two = losses(tmp_path / "one"), losses(tmp_path / "two")
    assert sorted(two) == [0, 1, 2] and all(abs(one[s] - two[s]) < 1e-4 for s in one), (one, two)
    weights = read_tensors(tmp_path / "two" / "step-0000003", "language_model")
    ref = read_tensors(tmp_path / "one" / "step-0000003", "language_model")
    assert max((weights[k] - ref[k]).abs().max().item() for k in ref) < 1e-5
    assert json.loads((tmp_path / "two" / "pipeline" / "config.json").read_text())["model_type"] == "janus"
