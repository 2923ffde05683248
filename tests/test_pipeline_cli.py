"""End to end: tiny tokenizer + decoder -> pipeline -> save/load -> CLI, with bad-input errors."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmgen import cli
from mmgen.pipelines import load_pipeline


@pytest.fixture(scope="module")
def pipe_dir(tiny_pipe_dir):
    return tiny_pipe_dir  # conftest: the tiny next-token pipeline on CAPTIONS, saved


def test_pipeline_output_and_reload_identical(pipe_dir):
    pipe = load_pipeline(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(prompt=["a red circle", "two green stars"], num_images_per_prompt=2, guidance_scale=2.0,
               generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 4 and all(isinstance(i, Image.Image) and i.size == (16, 16) for i in out.images)
    assert out.tokens.shape == (4, 8, 8) and out.nfe == 64
    again = load_pipeline(pipe_dir)
    again.set_progress_bar_config(disable=True)
    out2 = again(prompt=["a red circle", "two green stars"], num_images_per_prompt=2, guidance_scale=2.0,
                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(out.tokens, out2.tokens)
    assert all(a.tobytes() == b.tobytes() for a, b in zip(out.images, out2.images))
    files = {p.name for p in pipe_dir.rglob("*") if p.is_file()}
    assert "model_index.json" in files and "tokenizer.json" in files
    assert not any(f.endswith((".bin", ".pt", ".pth", ".pkl")) for f in files)


def test_same_seed_same_image_across_batch_sizes(pipe_dir):
    pipe = load_pipeline(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    from mmgen.pipelines.base import generators_from_seed
    big = pipe(prompt="a red circle", num_images_per_prompt=3, generator=generators_from_seed(5, 3))
    one = pipe(prompt="a red circle", num_images_per_prompt=1, generator=generators_from_seed(5, 1))
    assert torch.equal(big.tokens[0], one.tokens[0])


@pytest.mark.parametrize("kwargs, name", [
    (dict(prompt="a purple hexagon"), "does not know"),
    (dict(prompt=""), "prompt"),
    (dict(prompt="a red circle", num_images_per_prompt=0), "num_images_per_prompt"),
    (dict(prompt="a red circle", top_p=1.5), "top_p"),
    (dict(prompt="a red circle", top_k=0), "top_k"),
    (dict(prompt="a red circle", guidance_scale=-1.0), "guidance_scale"),
    (dict(prompt="a red circle", sampler="beam"), "sampler must be one of ar, sjd"),
    (dict(prompt="a red circle", sampler="sjd", sjd_window=0), "window"),
    (dict(prompt="a red circle", sampler="sjd", sjd_init="zigzag"), "init must be one of"),
])
def test_bad_pipeline_input(pipe_dir, kwargs, name):
    pipe = load_pipeline(pipe_dir)
    with pytest.raises(ValueError, match=name):
        pipe(**kwargs)


def test_cli_generate_json(pipe_dir, tmp_path, capsys):
    out = tmp_path / "img.png"
    assert cli.main(["generate", "a red circle", "--model", str(pipe_dir), "--out", str(out), "--num-images", "2",
                     "--seed", "3", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["images"] == [str(tmp_path / "img_0.png"), str(tmp_path / "img_1.png")]
    assert Image.open(result["images"][0]).size == (16, 16)


@pytest.mark.parametrize("args, needle", [
    (["generate", "a red circle", "--top-p", "0"], "--top-p must be in (0, 1]"),
    (["generate", "a red circle", "--num-images", "0"], "--num-images"),
    (["generate", "a red circle", "--model", "/nonexistent/model"], "does not exist"),
    (["generate", "a blorp circle"], "does not know"),
    (["generate", "a red circle", "--out", "x.txt"], "--out"),
    (["generate", "a red circle", "--sampler", "beam"], "--sampler"),
    (["generate", "a red circle", "--sampler", "sjd", "--sjd-window", "0"], "--sjd-window"),
])
def test_cli_bad_input_exit_2_and_nothing_written(pipe_dir, tmp_path, monkeypatch, capsys, args, needle):
    if "--model" not in args:
        args = args + ["--model", str(pipe_dir)]
    if "--out" not in args:
        args = args + ["--out", str(tmp_path / "o.png")]
    monkeypatch.chdir(tmp_path)  # relative --out paths land here
    with pytest.raises(SystemExit) as exc:  # in-process: the exit status `python -m mmgen.cli` would return
        cli.main(args)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert needle in err
    assert not any(tmp_path.glob("*.png")) and not any(tmp_path.glob(".*png"))


def test_sjd_sampler_in_pipeline_and_cli(pipe_dir, tmp_path, capsys):
    """Greedy SJD through the pipeline gives the greedy AR images in fewer passes; the CLI reports the
    cost figures."""
    pipe = load_pipeline(pipe_dir)
    pipe.set_progress_bar_config(disable=True)
    kw = dict(prompt=["a red circle", "two green stars"], guidance_scale=2.0, temperature=0, output_type="pt")
    ar = pipe(**kw)
    sjd = pipe(**kw, sampler="sjd", sjd_window=8, sjd_init="above", generator=torch.Generator().manual_seed(0))
    assert torch.equal(sjd.tokens, ar.tokens) and torch.equal(sjd.images, ar.images)
    assert ar.nfe == 64 and ar.step_compression == 1.0
    assert sjd.decoder_passes <= 64 and sjd.step_compression == pytest.approx(64 / sjd.decoder_passes)
    coupled = pipe(**kw, sampler="sjd", sjd_window=8, sjd_coupled=True, generator=torch.Generator().manual_seed(0))
    assert torch.equal(coupled.tokens, ar.tokens)
    assert cli.main(["generate", "a red circle", "--model", str(pipe_dir), "--out", str(tmp_path / "c.png"),
                     "--sampler", "sjd", "--sjd-coupled", "--temperature", "0", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["nfe_per_image"] <= 64
    out = tmp_path / "s.png"
    assert cli.main(["generate", "a red circle", "--model", str(pipe_dir), "--out", str(out), "--sampler", "sjd",
                     "--sjd-init", "repeat", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["sampler"] == "sjd" and 1 <= result["nfe_per_image"] <= 64
    assert result["step_compression"] == pytest.approx(64 / result["nfe_per_image"], abs=1e-4)
    # one image: the tokens it committed per verification pass are its 64 tokens over the passes it took
    assert result["mean_accepted_length"] == pytest.approx(64 / result["nfe_per_image"], abs=1e-4) and out.is_file()


def test_every_command_has_help(capsys):
    for argv in (["generate", "--help"], ["bench", "--help"]):
        with pytest.raises(SystemExit) as exc:
            cli.main(argv)
        assert exc.value.code == 0 and f"usage: mmgen {argv[0]}" in capsys.readouterr().out
    # one real process: the installed `mmgen` console script (pyproject's [project.scripts]) starts and answers
    entry = Path(sys.executable).with_name("mmgen")
    proc = subprocess.run([str(entry) if entry.is_file() else "mmgen", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: mmgen" in proc.stdout, proc.stderr
    assert all(command in proc.stdout for command in ("generate", "bench"))


def test_shipped_default_model_generates(tmp_path):
    """The README's main command: the default model in mmgen/zoo makes a real 64x64 image."""
    assert cli.DEFAULT_MODEL.is_dir()
    size = sum(f.stat().st_size for f in cli.DEFAULT_MODEL.rglob("*") if f.is_file())
    assert size <= 25 * 2**20
    out = tmp_path / "default.png"
    assert cli.main(["generate", "a red circle above a blue square", "--out", str(out), "--json"]) == 0
    img = Image.open(out)
    assert img.size == (64, 64) and len(img.getcolors(maxcolors=4096) or range(4097)) > 10  # not a blank canvas


def test_call_options_are_read_from_the_call_signature():
    """The CLI, the demo and the eval harness route options by each pipeline class's `call_options`, read from its
    `__call__` (no list kept by hand): a subclass that adds an option is routed by it at once."""
    from mmgen.options import OptionError, refuse_options
    from mmgen.pipelines import PIPELINES, NextScalePipeline

    assert PIPELINES["NextScalePipeline"].call_options == {"guidance_scale": None, "temperature": 1.0, "top_k": None,
                                                           "top_p": None, "cfg_schedule": "constant"}
    assert PIPELINES["VARPipeline"].call_options["top_k"] == 900 and "sampler" not in PIPELINES["VARPipeline"].call_options
    assert {"sampler", "watermark_key", "compile_decode"} <= set(PIPELINES["NextTokenPipeline"].call_options)

    class Wider(NextScalePipeline):
        def __call__(self, prompt=None, num_images_per_prompt=1, generator=None, output_type="pil",
                     return_dict=True, callback_on_step_end=None, callback_on_step_end_tensor_inputs=None,
                     guidance_scale=None, sharpen: float = 0.5):
            pass

    assert Wider.call_options == {"guidance_scale": None, "sharpen": 0.5}
    refuse_options(Wider, ["sharpen"])
    with pytest.raises(OptionError, match=r"^temperature does not apply to Wider; its options: guidance_scale, sharpen"):
        refuse_options(Wider, ["sharpen", "temperature"])


