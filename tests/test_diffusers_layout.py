"""A saved mmgen directory behaves as diffusers users expect: `DiffusionPipeline.from_pretrained` builds the mmgen
class (diffusers' custom-pipeline mechanism), every loader reads watermark.json, `save_pretrained` writes only what
the pipeline was loaded or built with, `push_to_hub` uploads every file, and no config carries a machine path."""

import json
from pathlib import Path

import diffusers.utils.hub_utils
import numpy as np
import pytest
import torch
from tiny import tiny_next_token_pipeline, tiny_text_tokenizer
from diffusers import DiffusionPipeline

import mmgen.pipelines.base
from mmgen.pipelines import PIPELINES, load_pipeline, save_pipeline
from mmgen.zoo import ZOO_DIR, zoo_names


@pytest.mark.parametrize("name", zoo_names())
def test_diffusion_pipeline_from_pretrained_loads_every_zoo_model(name):
    path = ZOO_DIR / name
    pipe = DiffusionPipeline.from_pretrained(str(path), trust_remote_code=True)
    ours = load_pipeline(name)
    assert type(pipe) is type(ours) and type(pipe) in PIPELINES.values()
    if (path / "watermark.json").is_file():  # the shipped confusion-cluster table, not a k-means stand-in
        assert pipe.watermark_config() == ours.watermark_config()
        assert pipe.watermark_config().clustering == json.loads((path / "watermark.json").read_text())["clustering"]


def test_shipped_configs_carry_no_machine_paths():
    for config in ZOO_DIR.glob("*/**/*.json"):
        assert "_name_or_path" not in json.loads(config.read_text()), config


def test_mmgen_loaders_never_run_the_directory_code(tmp_path):
    load_pipeline("shapes-nextscale").save_pretrained(tmp_path / "m")  # no checksums.json: it would refuse the edit
    (tmp_path / "m" / "pipeline.py").write_text("raise RuntimeError('directory code ran')\n")
    load_pipeline(tmp_path / "m")  # the class comes from mmgen, not from the file
    with pytest.raises(RuntimeError, match="directory code ran"):  # only DiffusionPipeline, when trusted, runs it
        DiffusionPipeline.from_pretrained(str(tmp_path / "m"), trust_remote_code=True)


def test_save_writes_only_what_the_pipeline_was_loaded_with(tmp_path):
    torch.manual_seed(0)
    pipe = tiny_next_token_pipeline(tiny_text_tokenizer())
    pipe("a red circle", watermark_key="k", generator=torch.Generator().manual_seed(0))  # k-means table, cached
    pipe.save_pretrained(tmp_path / "built")
    assert not (tmp_path / "built" / "watermark.json").exists()
    assert sorted(p.name for p in (tmp_path / "built").iterdir()) == [
        "model_index.json", "pipeline.py", "tokenizer", "transformer", "vq_model"]

    shipped = ZOO_DIR / "shapes-emoji" / "watermark.json"
    save_pipeline(load_pipeline("shapes-emoji"), tmp_path / "copy")
    assert json.loads((tmp_path / "copy" / "watermark.json").read_text()) == {**json.loads(shipped.read_text()),
                                                                          "encoder": None}


def test_push_to_hub_uploads_the_finished_directory(tmp_path, monkeypatch):
    hub = tmp_path / "hub"

    def fake_create_repo(repo_id, **kwargs):
        return type("Repo", (), {"repo_id": f"user/{repo_id}"})()

    def fake_upload_folder(repo_id, folder_path, **kwargs):  # a local stand-in for the hub: copy what is sent
        for f in Path(folder_path).rglob("*"):
            if f.is_file():
                target = hub / repo_id / f.relative_to(folder_path)
                target.parent.mkdir(parents=True, exist_ok=True)
                target.write_bytes(f.read_bytes())

    monkeypatch.setattr(mmgen.pipelines.base, "create_repo", fake_create_repo)
    monkeypatch.setattr(diffusers.utils.hub_utils, "upload_folder", fake_upload_folder)
    load_pipeline("shapes-emoji").save_pretrained(tmp_path / "emoji", push_to_hub=True)
    uploaded = {p.relative_to(hub / "user" / "emoji").as_posix() for p in (hub / "user" / "emoji").rglob("*")
                if p.is_file()}
    saved = {p.relative_to(tmp_path / "emoji").as_posix() for p in (tmp_path / "emoji").rglob("*") if p.is_file()}
    assert uploaded == saved and {"watermark.json", "pipeline.py", "model_index.json"} <= uploaded
    assert json.loads((hub / "user" / "emoji" / "model_index.json").read_text())["_class_name"] == [
        "pipeline", "NextTokenPipeline"]


@pytest.mark.parametrize("name", ["shapes-emoji", "shapes-flowar"])
def test_output_types_agree_and_pt_is_in_0_1_as_in_diffusers(name):
    pipe = load_pipeline(name)
    outs = {t: pipe("a red circle", generator=torch.Generator().manual_seed(3), output_type=t).images
            for t in ("pt", "np", "pil")}
    pt, arr, pil = outs["pt"], outs["np"], outs["pil"]
    assert pt.shape == (1, 3, 64, 64) and pt.min() >= 0 and pt.max() <= 1 and pt.min() < 0.1 and pt.max() > 0.9
    assert torch.equal(pt.permute(0, 2, 3, 1), torch.from_numpy(arr))
    assert torch.equal((pt[0].permute(1, 2, 0) * 255).round().to(torch.uint8),
                       torch.from_numpy(np.array(pil[0])))


@pytest.mark.parametrize("name", ["shapes-emoji", "shapes-nextx"])
def test_load_pipeline_takes_torch_dtype_and_device(name):
    pipe = load_pipeline(name, torch_dtype=torch.bfloat16, device="cpu")
    assert pipe.transformer.dtype == torch.bfloat16 and pipe.device == torch.device("cpu")
    out = pipe("a red circle", generator=torch.Generator().manual_seed(0), output_type="pt")
    assert out.images.shape == (1, 3, 64, 64) and 0 <= out.images.min() and out.images.max() <= 1
    with pytest.raises(ValueError, match="torch_dtype must be a floating torch.dtype"):
        load_pipeline(name, torch_dtype="bf16")
    with pytest.raises(ValueError, match="device must be a torch device"):
        load_pipeline(name, device="gpu0")


def test_cpu_offload_is_refused_with_the_reason():
    pipe = load_pipeline("shapes-nextscale")
    for method in (pipe.enable_model_cpu_offload, pipe.enable_sequential_cpu_offload):
        with pytest.raises(NotImplementedError, match="does not support enable_model_cpu_offload: the sampling loop"):
            method()


@pytest.mark.parametrize("name, kwargs, passes", [("shapes-emoji", {}, 64), ("shapes-nextscale", {}, 6),
                                                  ("shapes-flowar", {}, 4), ("shapes-emoji", {"sampler": "sjd"}, None)])
def test_callback_on_step_end_runs_after_every_decoder_pass(name, kwargs, passes):
    calls = []

    def callback(pipe, step, timestep, callback_kwargs):
        calls.append((type(pipe).__name__, step, timestep, callback_kwargs))
        return callback_kwargs

    pipe = load_pipeline(name)
    out = pipe("a red circle", generator=torch.Generator().manual_seed(0), callback_on_step_end=callback, **kwargs)
    assert out.decoder_passes == (passes or out.decoder_passes) and (passes or out.decoder_passes < 64)
    assert calls == [(type(pipe).__name__, i, None, {}) for i in range(out.decoder_passes)]
    with pytest.raises(ValueError, match="callback_on_step_end must be callable"):
        pipe("a red circle", callback_on_step_end="print")
    # the loop is the paradigm's `generate`, which hands out no tensors: asking for one is refused by name
    with pytest.raises(ValueError, match=r"callback_on_step_end_tensor_inputs must be drawn from \[\] for "
                                         rf"{type(pipe).__name__}, got \['tokens'\] \(its loop hands out no tensors"):
        pipe("a red circle", callback_on_step_end=callback, callback_on_step_end_tensor_inputs=["tokens"])


def assert_step_callback(call, widths: list[int], value: int = 1):
    """`callback_on_step_end` on a pipeline whose own loop hands out "tokens" (Janus, Emu3, LlamaGen, VAR), through
    `call(**callback_arguments)`: called once per decoder pass, steps 0, 1, ..., timestep None, with every code
    drawn so far (`widths[step]` of them); setting the pass's own codes to `value` gives an output of `value`s only,
    while changing an earlier code is refused, as is asking for tensors under SJD. Returns the plain output."""
    seen = []

    def record(pipe, step, timestep, kwargs):
        seen.append((step, timestep, kwargs["tokens"].shape[1]))
        return kwargs

    plain = call(callback_on_step_end=record, callback_on_step_end_tensor_inputs=["tokens"])
    assert seen == [(i, None, width) for i, width in enumerate(widths)] and plain.decoder_passes == len(widths)

    def force(pipe, step, timestep, kwargs):
        tokens = kwargs["tokens"]
        tokens[:, widths[step - 1] if step else 0:] = value  # this pass's codes
        return {"tokens": tokens}

    forced = call(callback_on_step_end=force, callback_on_step_end_tensor_inputs=["tokens"])
    assert (forced.tokens == value).all() and not (plain.tokens == value).all()

    def rewrite_history(pipe, step, timestep, kwargs):
        kwargs["tokens"][:, 0] = kwargs["tokens"][:, 0] + 1
        return kwargs

    with pytest.raises(ValueError, match="changed tokens drawn before step 1 .* already in the decoder's KV cache"):
        call(callback_on_step_end=lambda p, i, t, kw: kw if i == 0 else rewrite_history(p, i, t, kw),
             callback_on_step_end_tensor_inputs=["tokens"])
    with pytest.raises(ValueError, match="callback_on_step_end returned \\['latents'\\]"):
        call(callback_on_step_end=lambda p, i, t, kw: {"latents": None}, callback_on_step_end_tensor_inputs=None)
    return plain


