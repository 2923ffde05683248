"""Bad input, case by case: the CLI answers exit code 2 with one line naming the argument and writes nothing; the
pipelines raise a ValueError naming the argument; a saved model that is truncated, corrupt, incomplete or has
broken JSON is refused by name before torch reads it (mmgen.safe_save), and a failed save leaves nothing
behind."""

import json
import re
import sys
from pathlib import Path

import pytest
from PIL import Image

from tiny import tiny_next_token_pipeline, tiny_text_tokenizer
from mmgen import cli
from mmgen.config import load_config
from mmgen.pipelines import NextTokenPipeline, load_pipeline, save_pipeline, verify
from mmgen.options import MAX_IMAGES_PER_CALL
from mmgen.pipelines.base import generators_from_seed
from mmgen.safe_save import CHECKSUM_FILE
from mmgen.zoo import zoo_names

ROOT = Path(__file__).resolve().parents[1]
WEIGHTS = "transformer/diffusion_pytorch_model.safetensors"


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    pipe = tiny_next_token_pipeline(tiny_text_tokenizer(["a red circle", "two green stars"]))
    return save_pipeline(pipe, tmp_path_factory.mktemp("models") / "tiny")


@pytest.fixture(scope="module")
def pipe(model):
    p = load_pipeline(model)
    p.set_progress_bar_config(disable=True)
    return p


@pytest.fixture()
def copy(model, tmp_path):
    """A private copy of the saved model to damage."""
    import shutil

    return Path(shutil.copytree(model, tmp_path / "copy"))


def _cli_error(argv, capsys, out_dir: Path) -> str:
    """Run the CLI in-process; it must exit 2, print its error on one line and leave `out_dir` empty."""
    out_dir.mkdir(exist_ok=True)
    with pytest.raises(SystemExit) as exc:
        cli.main(argv)
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("mmgen") and "error:" in last, err
    assert not any(out_dir.rglob("*")), f"files left behind: {list(out_dir.rglob('*'))}"
    return last


# ---- mmgen generate ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["", "   \t"])
def test_cli_empty_prompt(model, tmp_path, capsys, prompt):
    out = tmp_path / "out"
    assert "PROMPT must be a non-empty string" in _cli_error(
        ["generate", prompt, "--model", str(model), "--out", str(out / "x.png")], capsys, out)


def test_cli_unknown_word_names_it_and_the_closest_words(model, tmp_path, capsys):
    out = tmp_path / "out"
    msg = _cli_error(["generate", "Two green starz.", "--model", str(model), "--out", str(out / "x.png")], capsys, out)
    assert "does not know: 'starz' (closest known: 'stars')" in msg


@pytest.mark.parametrize("n", ["257", "1000000000"])
def test_cli_enormous_num_images(model, tmp_path, capsys, n):
    """The pipelines' one limit (256 images a call), checked before the model loads, naming the flag."""
    out = tmp_path / "out"
    msg = _cli_error(["generate", "a red circle", "--model", str(model), "--num-images", n, "--out",
                      str(out / "x.png")], capsys, out)
    assert f"--num-images must be an integer >= 1 with at most 256 images per call, got {n} for 1 prompt(s)" in msg


@pytest.mark.parametrize("seed", ["-1", str(2**63), "seven"])
def test_cli_bad_seed(model, tmp_path, capsys, seed):
    out = tmp_path / "out"
    assert "--seed must be" in _cli_error(["generate", "a red circle", "--model", str(model), f"--seed={seed}",
                                           "--out", str(out / "x.png")], capsys, out)


@pytest.mark.parametrize("flag", ["--guidance-scale", "--temperature"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "-0.5"])
def test_cli_non_finite_or_negative_guidance(model, tmp_path, capsys, flag, value):
    out = tmp_path / "out"
    msg = _cli_error(["generate", "a red circle", "--model", str(model), f"{flag}={value}", "--out",
                      str(out / "x.png")], capsys, out)
    assert f"{flag} must be a finite number >= 0" in msg and f"got {float(value)}" in msg


def test_cli_unknown_model_name_lists_the_zoo(tmp_path, capsys):
    out = tmp_path / "out"
    msg = _cli_error(["generate", "a red circle", "--model", "nosuch", "--out", str(out / "x.png")], capsys, out)
    assert "--model" in msg and "'nosuch' does not exist" in msg
    names = zoo_names()
    assert "shapes-nexttoken" in names and all(n in msg for n in names)


def test_cli_unknown_out_suffix(model, tmp_path, capsys):
    out = tmp_path / "out"
    assert "--out must end in .png, .jpg, .jpeg or .webp" in _cli_error(
        ["generate", "a red circle", "--model", str(model), "--out", str(out / "x.txt")], capsys, out)


def test_cli_out_under_a_file(model, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (tmp_path / "blocker").write_text("a file, not a directory")
    msg = _cli_error(["generate", "a red circle", "--model", str(model), "--num-images", "2", "--out",
                      str(tmp_path / "blocker" / "x.png")], capsys, out)
    assert "--out" in msg and "is a file, not a directory" in msg
    assert (tmp_path / "blocker").read_text() == "a file, not a directory"


def test_cli_unwritable_out_dir_leaves_nothing(model, tmp_path, capsys):
    """/proc refuses new entries even to root: the error comes at save time, after generation, and names --out."""
    out = tmp_path / "out"
    msg = _cli_error(["generate", "a red circle", "--model", str(model), "--out", "/proc/mmgen-test/x.png"], capsys,
                     out)
    assert "--out '/proc/mmgen-test/x.png' cannot be written" in msg
    assert not Path("/proc/mmgen-test").exists()


def test_cli_failed_save_of_second_image_leaves_neither(model, tmp_path, capsys, monkeypatch):
    """Images are written to temporary names and renamed together: a failure on image 2 removes image 1."""
    out = tmp_path / "out"
    calls = []
    real_save = Image.Image.save

    def failing_save(self, fp, *a, **kw):
        calls.append(fp)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_save(self, fp, *a, **kw)

    monkeypatch.setattr(Image.Image, "save", failing_save)
    msg = _cli_error(["generate", "a red circle", "--model", str(model), "--num-images", "2", "--out",
                      str(out / "x.png")], capsys, out)
    assert "cannot be written: No space left on device" in msg and len(calls) == 2


def test_cli_corrupt_model_names_the_file(copy, tmp_path, capsys):
    with open(copy / WEIGHTS, "r+b") as f:
        f.seek(-4, 2)
        f.write(b"\0\1\2\3")
    out = tmp_path / "out"
    msg = _cli_error(["generate", "a red circle", "--model", str(copy), "--out", str(out / "x.png")], capsys, out)
    assert WEIGHTS in msg and "is corrupt" in msg


# ---- mmgen watermark detect -------------------------------------------------------------------------------------

def _detect_error(model, tmp_path, capsys, image: Path, *extra) -> str:
    return _cli_error(["watermark", "detect", str(image), "--key", "k", "--model", str(model), *extra], capsys,
                      tmp_path / "out")


def test_detect_non_image_file(model, tmp_path, capsys):
    f = tmp_path / "notes.png"
    f.write_text("not an image")
    assert f"IMAGE {str(f)!r} is not a readable image" in _detect_error(model, tmp_path, capsys, f)


def test_detect_missing_file(model, tmp_path, capsys):
    f = tmp_path / "none.png"
    assert f"IMAGE {str(f)!r} does not exist" in _detect_error(model, tmp_path, capsys, f)


@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("CMYK", ".jpg"), ("F", ".tiff")])
def test_detect_wrong_mode(model, tmp_path, capsys, mode, suffix):
    """16-bit, float and CMYK images would be clipped or recoloured by a plain RGB conversion: refused."""
    f = tmp_path / f"img{suffix}"
    Image.new(mode, (16, 16)).save(f)
    msg = _detect_error(model, tmp_path, capsys, f)
    assert f"has mode {mode}; accepted: 1, L, LA, P, PA, RGB, RGBA" in msg


@pytest.mark.parametrize("size", [(4, 16), (4097, 4097)])
def test_detect_tiny_or_huge_image(model, tmp_path, capsys, size):
    f = tmp_path / "img.png"
    Image.new("1", size).save(f)
    msg = _detect_error(model, tmp_path, capsys, f)
    assert f"is {size[0]}x{size[1]}; accepted: sides >= 8 and at most 16777216 pixels" in msg


def test_detect_accepts_8bit_modes_of_other_sizes(model, tmp_path, capsys):
    """The control: palette, grey and RGBA images of another size are converted and tested."""
    files = []
    for mode in ("P", "L", "RGBA"):
        files.append(tmp_path / f"{mode}.png")
        Image.new(mode, (40, 24)).save(files[-1])
    assert cli.main(["watermark", "detect", *map(str, files), "--key", "k", "--model", str(model), "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in result["images"]] == list(map(str, files))


def test_detect_missing_or_empty_key(model, tmp_path, capsys, monkeypatch):
    f = tmp_path / "img.png"
    Image.new("RGB", (16, 16)).save(f)
    out = tmp_path / "out"
    monkeypatch.delenv("MMGEN_WATERMARK_KEY", raising=False)
    msg = _cli_error(["watermark", "detect", str(f), "--model", str(model)], capsys, out)
    assert "give it as --key, --key-file or $MMGEN_WATERMARK_KEY" in msg
    msg = _cli_error(["watermark", "detect", str(f), "--key", "", "--model", str(model)], capsys, out)
    assert "--key must be a non-empty string" in msg


# ---- pipelines --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("prompt", ["", "  ", [], ["a red circle", " "], None, 7])
def test_pipeline_empty_or_wrong_prompt(pipe, prompt):
    with pytest.raises(ValueError, match="prompt must be a non-empty string"):
        pipe(prompt=prompt)


@pytest.mark.parametrize("prompts, n", [(["a red circle"], 10**9), (["a red circle", "two green stars"], 129)])
def test_pipeline_enormous_num_images(pipe, prompts, n):
    assert n * len(prompts) > MAX_IMAGES_PER_CALL == 256
    with pytest.raises(ValueError, match=r"num_images_per_prompt must be an integer >= 1 with at most 256 images"):
        pipe(prompt=prompts, num_images_per_prompt=n)


@pytest.mark.parametrize("seed", [-1, 2**63, 1.5, True])
def test_pipeline_bad_seed(seed):
    with pytest.raises(ValueError, match=r"seed must be an integer in \[0, 2\*\*63 - 1\]"):
        generators_from_seed(seed, 2)


@pytest.mark.parametrize("name", ["guidance_scale", "temperature"])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -1.0])
def test_pipeline_non_finite_guidance(pipe, name, value):
    with pytest.raises(ValueError, match=f"{name} must be a finite number >= 0"):
        pipe(prompt="a red circle", **{name: value})


def test_load_pipeline_unknown_name():
    with pytest.raises(FileNotFoundError, match="'nosuch' does not exist: it is neither a directory nor a shipped "
                                                "model .*shapes-nexttoken"):
        load_pipeline("nosuch")


def test_load_pipeline_by_zoo_name_is_the_zoo_dir():
    assert type(load_pipeline("shapes-nexttoken")).__name__ == "NextTokenPipeline"


# ---- config with unknown keys ---------------------------------------------------------------------------------

def test_config_unknown_keys(tmp_path, monkeypatch):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bad_input_train_generator", ROOT / "scripts" / "train_generator.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # dataclasses look their module up there
    spec.loader.exec_module(script)
    GeneratorRunConfig = script.GeneratorRunConfig
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['stepz'\] in train; accepted: .*'steps'"):
        load_config(GeneratorRunConfig, None, ["train.stepz=3"])
    bad = tmp_path / "bad.yaml"
    bad.write_text("model:\n  dim: 32\n  colour: red\n")
    with pytest.raises(ValueError, match=r"unknown config key\(s\) \['colour'\] in model"):
        load_config(GeneratorRunConfig, bad)


def test_train_script_rejects_unknown_key_before_writing(tmp_path, monkeypatch, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("bad_input_train_generator", ROOT / "scripts" / "train_generator.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)  # dataclasses look their module up there
    spec.loader.exec_module(script)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "run"
    with pytest.raises(SystemExit) as exc:  # the script's main, in-process: a usage error (exit 2)
        script.main(["--config", str(ROOT / "configs" / "generator_shapes.yaml"), f"train.out_dir={out}",
                     "train.stepz=3"])
    assert exc.value.code == 2 and "unknown config key(s) ['stepz'] in train" in capsys.readouterr().err
    assert not out.exists() and not any(tmp_path.iterdir())


# ---- saved models: atomic save, checksums, verification ----------------------------------------------------------

def test_save_pipeline_writes_checksums_and_replaces_atomically(model, pipe, tmp_path):
    sums = json.loads((model / CHECKSUM_FILE).read_text())
    assert sums["algorithm"] == "sha256" and WEIGHTS in sums["files"] and "model_index.json" in sums["files"]
    assert sums["files"][WEIGHTS]["bytes"] == (model / WEIGHTS).stat().st_size
    assert verify(model) == {"checksums": True, "files": len(sums["files"])}
    target = tmp_path / "m"
    target.mkdir()
    (target / "stale.txt").write_text("from an older save")
    save_pipeline(pipe, target)  # replaces the whole directory
    assert not (target / "stale.txt").exists() and verify(target)["checksums"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"]  # no temporary directories left


def test_failed_save_leaves_the_target_untouched(pipe, tmp_path, monkeypatch):
    target = tmp_path / "m"
    target.mkdir()
    (target / "keep.txt").write_text("old model")

    def broken(directory, **kw):
        (Path(directory) / "model_index.json").write_text("{")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(pipe, "save_pretrained", broken)
    with pytest.raises(OSError, match="No space left"):
        save_pipeline(pipe, target)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m"] and (target / "keep.txt").read_text() == "old model"


def test_truncated_weights(copy):
    path = copy / WEIGHTS
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(ValueError, match=f"{path}' is truncated: .* bytes, checksums.json records"):
        load_pipeline(copy)


def test_corrupt_weights_same_size(copy):
    path = copy / WEIGHTS
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=f"{path}' is corrupt: its sha256 differs from checksums.json"):
        load_pipeline(copy)


def test_missing_weights(copy):
    (copy / WEIGHTS).unlink()
    with pytest.raises(ValueError, match=f"{copy / WEIGHTS}' is missing \\(listed in checksums.json\\)"):
        load_pipeline(copy)


def test_broken_json_config(copy):
    path = copy / "transformer" / "config.json"
    path.write_text(path.read_text()[:-10])
    # the checksum catches it first; without the table, the JSON check does
    with pytest.raises(ValueError, match="config.json' is truncated"):
        load_pipeline(copy)
    (copy / CHECKSUM_FILE).unlink()
    with pytest.raises(ValueError, match=f"{path}' is not valid JSON"):
        load_pipeline(copy)


def test_older_dir_without_checksums_loads_and_is_still_checked(copy):
    (copy / CHECKSUM_FILE).unlink()
    assert verify(copy)["checksums"] is False
    assert isinstance(load_pipeline(copy), NextTokenPipeline)
    path = copy / WEIGHTS
    path.write_bytes(path.read_bytes()[:-100])  # safetensors layout check: the tensors run past the end
    with pytest.raises(ValueError, match=f"{path}' is truncated: its tensors need .* bytes, the file has"):
        load_pipeline(copy)
    path.write_bytes(b"\x05")
    with pytest.raises(ValueError, match="shorter than a safetensors header"):
        load_pipeline(copy)


def test_missing_component_directory(copy):
    import shutil

    shutil.rmtree(copy / "vq_model")
    (copy / CHECKSUM_FILE).unlink()
    with pytest.raises(ValueError, match="vq_model' is missing \\(named in model_index.json\\)"):
        load_pipeline(copy)


def test_every_shipped_model_is_checksummed():
    """The zoo ships checksums.json; after editing a shipped model, rerun `python -m mmgen.safe_save write`."""
    for name in zoo_names():
        report = verify(ROOT / "mmgen" / "zoo" / name)
        assert report["checksums"] and report["files"] >= 5, name


def test_pipeline_detect_refuses_lossy_image_modes():
    """The Python API checks modes like the CLI: a CMYK or 16-bit image would be recoloured or clipped."""
    from PIL import Image

    pipe = load_pipeline("shapes-nexttoken")
    ok = Image.new("RGB", (64, 64), "red")
    for mode in ("CMYK", "I;16", "F"):
        with pytest.raises(ValueError, match=rf"images\[1\] has mode {re.escape(mode)}; accepted: 1, L, LA"):
            pipe.detect_watermark([ok, Image.new(mode, (64, 64))], key="k")
    assert len(pipe.detect_watermark([ok, ok.convert("P")], key="k")) == 2  # 8-bit modes are converted
