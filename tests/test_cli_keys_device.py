"""Command-line habits of the ecosystem: `mmgen --version`, `--device` on every command that runs a model, and
watermark keys from a file or the environment as well as from the command line (where `ps` shows them)."""

import importlib.metadata
import json

import pytest

from mmgen import cli


def _run(argv, capsys):
    """(exit code, stdout, stderr) of `mmgen argv` run in-process."""
    try:
        code = cli.main(argv)
    except SystemExit as e:
        code = e.code
    out = capsys.readouterr()
    return code, out.out, out.err


def test_version(capsys):
    code, out, _ = _run(["--version"], capsys)
    assert code == 0 and out.strip() == f"mmgen {importlib.metadata.version('mmgen')}"


@pytest.mark.parametrize("command", ["generate", "serve", "eval", "bench"])
def test_every_model_command_takes_device_and_names_a_bad_one(command, capsys):
    code, out, _ = _run([command, "--help"], capsys)
    assert code == 0 and "--device" in out
    if command in ("generate", "serve"):
        code, _, err = _run([command, "--device", "gpu0"], capsys)
        assert code == 2 and "--device must be a torch device such as cpu, cuda or cuda:1, got 'gpu0'" in err


def test_watermark_keys_from_a_file_or_the_environment(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "key.txt").write_text("my-secret\n")
    args = ["generate", "a red circle", "--model", "shapes-emoji", "--seed", "3", "--json"]
    assert _run([*args, "--watermark-key", "my-secret", "--out", "a.png"], capsys)[0] == 0
    code, out, _ = _run([*args, "--watermark-key-file", "key.txt", "--out", "b.png"], capsys)
    assert code == 0 and json.loads(out)["watermarked"] is True
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()  # the same key, so the same image

    detect = ["watermark", "detect", "a.png", "--model", "shapes-emoji", "--json"]
    by_flag = json.loads(_run([*detect, "--key", "my-secret"], capsys)[1])
    assert json.loads(_run([*detect, "--key-file", "key.txt"], capsys)[1]) == by_flag
    monkeypatch.setenv("MMGEN_WATERMARK_KEY", "my-secret")
    assert json.loads(_run(detect, capsys)[1]) == by_flag
    other = json.loads(_run([*detect, "--key", "another"], capsys)[1])  # the flag wins over the environment
    assert other != by_flag

    monkeypatch.delenv("MMGEN_WATERMARK_KEY")
    (tmp_path / "empty.txt").write_text("\n")
    for extra, message in ((["--key", "k", "--key-file", "key.txt"], "--key and --key-file both give the key"),
                           ([], "--key must be a non-empty string"),
                           (["--key-file", "empty.txt"], "--key-file 'empty.txt' is empty"),
                           (["--key-file", "missing.txt"], "--key-file 'missing.txt' cannot be read")):
        code, _, err = _run([*detect, *extra], capsys)
        assert code == 2 and message in err, (extra, err)
