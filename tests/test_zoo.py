"""The shipped model zoo: one model per paradigm, each with a card (how it was trained) and results measured on
the shipped weights; `mmgen models` lists them; scripts/package_zoo.py stores float16 weights that load back
into float32 models."""

import importlib.util
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmgen.cli import main
from mmgen.pipelines import verify
from mmgen.zoo import ZOO_DIR as ZOO
from mmgen.pipelines import load_pipeline
from mmgen.zoo import zoo_card, zoo_names

ROOT = Path(__file__).resolve().parents[1]
spec = importlib.util.spec_from_file_location("package_zoo", ROOT / "scripts" / "package_zoo.py")
package_zoo = importlib.util.module_from_spec(spec)
spec.loader.exec_module(package_zoo)


def test_every_paradigm_ships_a_model_with_card_and_results():
    cards = {name: zoo_card(name) for name in zoo_names()}
    assert {"next_token", "token_shuffle", "next_scale", "flowar", "next_x"} <= {c["paradigm"] for c in cards.values()}
    tokenizers = {json.loads((ZOO / n / "vq_model" / "config.json").read_text())["_class_name"]
                  for n in cards if (ZOO / n / "vq_model").is_dir()}
    assert "SEEDTokenizer" in tokenizers  # next-token on SEED's 1-D causal codes
    for name, card in cards.items():
        assert card["weights"] == "float16" and card["train"], name
        for cmd in card["train"]:  # every training command names a config that exists
            config = re.search(r"--config (\S+)", cmd).group(1)
            assert (ROOT / config).is_file(), (name, cmd)
        res = card["results"]
        assert {"heldout_accuracy", "train_accuracy", "fd_enl0", "nfe_per_image"} <= set(res), name


def test_models_command_lists_the_zoo(capsys):
    assert main(["models", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["name"]: r for r in out["models"]}
    assert set(rows) == set(zoo_names()) and [n for n, r in rows.items() if r["default"]] == ["shapes-emoji"]
    assert rows["shapes-emoji"]["guidance_scale"] == 1.5 and rows["shapes-nexttoken"]["guidance_scale"] == 3.0
    assert out["total_mb"] <= 100 and max(r["size_mb"] for r in rows.values()) <= 25
    pipe = load_pipeline("shapes-nextscale")  # header-read parameter counts equal the loaded models'
    assert rows["shapes-nextscale"]["parameters"] == {
        "transformer": sum(t.numel() for t in pipe.transformer.state_dict().values()),
        "vq_model": sum(t.numel() for t in pipe.vq_model.state_dict().values())}
    assert main(["models"]) == 0
    table = capsys.readouterr().out
    assert "shapes-emoji (default)" in table and "NextScalePipeline" in table and "cfg 1.5" in table


def test_package_stores_float16_that_loads_as_float32(tmp_path):
    src = tmp_path / "run" / "pipeline"
    shutil.copytree(ZOO / "shapes-nextscale", src)
    w = src / "transformer" / "diffusion_pytorch_model.safetensors"
    full = {k: v.float() + 1e-4 for k, v in load_file(w).items()}  # values float16 cannot hold exactly
    from safetensors.torch import save_file
    save_file(full, w)
    card = {"paradigm": "next_scale", "data": "shapes", "description": "", "train": []}
    out = package_zoo.package(src, "tiny", card, zoo=tmp_path / "zoo")
    stored = load_file(out / "transformer" / "diffusion_pytorch_model.safetensors")
    assert {v.dtype for v in stored.values() if v.is_floating_point()} == {torch.float16}
    assert verify(out)["checksums"] and json.loads((out / "card.json").read_text())["weights"] == "float16"
    pipe = load_pipeline(out)
    for k, v in pipe.transformer.state_dict().items():
        assert v.dtype == torch.float32 and torch.equal(v, full[k].half().float()), k
    assert not list((tmp_path / "zoo").glob(".*"))  # no temporary directory left


def test_package_refuses_over_the_size_caps(tmp_path, monkeypatch):
    card = {"paradigm": "next_scale", "data": "shapes", "description": "", "train": []}
    monkeypatch.setattr(package_zoo, "MAX_MODEL_MB", 1)
    with pytest.raises(ValueError, match=r"over the 1 MB a zoo model may take"):
        package_zoo.package(ZOO / "shapes-nextscale", "big", card, zoo=tmp_path)
    assert list(tmp_path.iterdir()) == []  # nothing half-written
    with pytest.raises(ValueError, match="is not a saved pipeline"):
        package_zoo.package(tmp_path, "none", card, zoo=tmp_path)
