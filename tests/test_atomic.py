"""The one atomic-write helper: the target appears only complete, and a failed write leaves the old file and
no temporary behind."""

import json

import pytest

from mmgen.atomic import atomic_path, write_json_atomic


def test_failed_write_keeps_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "sub" / "state.json"
    write_json_atomic(target, {"a": 1})
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("{half")
            raise RuntimeError("disk full")
    assert json.loads(target.read_text()) == {"a": 1}
    assert sorted(p.name for p in target.parent.iterdir()) == ["state.json"]


def test_temporary_keeps_the_suffix(tmp_path):
    with atomic_path(tmp_path / "img.png") as tmp:
        assert tmp.suffix == ".png" and tmp.parent == tmp_path and not (tmp_path / "img.png").exists()
        tmp.write_bytes(b"x")
    assert (tmp_path / "img.png").read_bytes() == b"x"


def test_directory_swap_keeps_the_old_one_on_failure(tmp_path):
    from mmgen.atomic import atomic_dir

    target = tmp_path / "model"
    with atomic_dir(target) as d:
        (d / "w.bin").write_text("1")
    with pytest.raises(RuntimeError):
        with atomic_dir(target) as d:
            (d / "w.bin").write_text("half")
            raise RuntimeError("disk full")
    assert (target / "w.bin").read_text() == "1"
    with atomic_dir(target) as d:
        (d / "v.bin").write_text("2")
    assert [p.name for p in target.iterdir()] == ["v.bin"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]
