"""Packaging: optional parts live in extras, and a missing extra is named where it is needed; the code and the
shipped models are two distributions (mmgen, mmgen-zoo), each wheel under 100 MB, no weights stored twice."""

import sys
import tomllib
from pathlib import Path

import pytest

from mmgen import cli
from mmgen.alignment.encoders import make_target_encoder

PYPROJECT = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())


def test_web_and_alignment_stacks_are_extras_and_unused_packages_are_gone():
    core = " ".join(PYPROJECT["project"]["dependencies"])
    extras = PYPROJECT["project"]["optional-dependencies"]
    for name in ("gradio", "open_clip_torch", "einops"):
        assert name not in core
    assert extras["serve"] == ["gradio>=6"] and extras["align"] == ["open_clip_torch>=2.24"]
    assert "transformers>=5" in core and "torch>=2.6" in core  # what the zoo's tokenizers and FSDP2 need


def test_missing_serve_extra_is_named(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # as if not installed: importing it raises ImportError
    monkeypatch.delitem(sys.modules, "mmgen.serve", raising=False)
    with pytest.raises(SystemExit) as exc:
        cli.main(["serve", "--model", "shapes-emoji"])
    assert exc.value.code == 2
    assert "mmgen serve needs the serve extra: pip install 'mmgen[serve]' (gradio)" in capsys.readouterr().err


def test_missing_align_extra_is_named(monkeypatch):
    monkeypatch.setitem(sys.modules, "open_clip", None)
    message = r"alignment.encoder=open_clip needs the align extra: pip install 'mmgen\[align\]'"
    with pytest.raises(ImportError, match=message):
        make_target_encoder("open_clip:ViT-B-32")


# --- the code and the shipped models as two distributions (mmgen, mmgen-zoo); scripts/check_wheels.sh builds both ---

ROOT = Path(__file__).resolve().parents[1]
ZOO_OLD_PACKAGE_DATA = ["*/*.json", "*/pipeline.py", "*/*/*"]  # what mmgen's wheel shipped before mmgen-zoo


def _load_zoo_backend():
    import importlib.util

    spec = importlib.util.spec_from_file_location("zoo_backend", ROOT / "zoo" / "zoo_backend.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def mmgen_wheel_data_files(tmp_path, wrong_variant: bool = False) -> list[str]:
    """The data files setuptools puts in mmgen's wheel under pyproject.toml, computed as the build does (package
    discovery, package-data, exclude-package-data, the manifest) but writing nothing in the checkout. wrong_variant:
    the configuration before mmgen-zoo (every directory a package, the zoo as package data)."""
    import warnings

    from setuptools import find_namespace_packages
    from setuptools.config.pyprojecttoml import apply_configuration
    from setuptools.dist import Distribution

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # setuptools' deprecation notices about the license table
        dist = Distribution({"script_name": "setup.py"})
        apply_configuration(dist, ROOT / "pyproject.toml")
        if wrong_variant:
            dist.packages = find_namespace_packages(str(ROOT), include=["mmgen*", "tokenizers_vis*"])
            dist.package_data["mmgen.zoo"] = ZOO_OLD_PACKAGE_DATA
            dist.exclude_package_data = {}
        tmp_path.mkdir(exist_ok=True)
        dist.get_command_obj("egg_info").egg_base = str(tmp_path)  # the manifest goes there, not into the checkout
        build_py = dist.get_command_obj("build_py")
        build_py.ensure_finalized()
        return sorted({f"{src}/{f}" for _, src, _, files in build_py.data_files for f in files})


def test_mmgen_wheel_leaves_the_shipped_models_out(tmp_path, monkeypatch):
    monkeypatch.chdir(ROOT)  # setuptools reads package directories relative to the working directory
    files = mmgen_wheel_data_files(tmp_path)
    assert "mmgen/eval/weights/fashion-classifier/diffusion_pytorch_model.safetensors" in files  # 460 KB, kept
    assert not [f for f in files if f.startswith("mmgen/zoo/")], files
    assert PYPROJECT["project"]["optional-dependencies"]["zoo"] == ["mmgen-zoo>=0.1"]
    # the configuration before the split put every zoo file, 98 MB of weights, into mmgen's wheel
    old = mmgen_wheel_data_files(tmp_path / "old", wrong_variant=True)
    assert "mmgen/zoo/shapes-emoji/transformer/diffusion_pytorch_model.safetensors" in old


def test_zoo_wheel_holds_every_model_and_each_weights_file_once():
    from mmgen.zoo import ZOO_DIR, zoo_models

    backend = _load_zoo_backend()
    files = dict(backend.wheel_files(ZOO_DIR))
    assert {a.split("/")[1] for a in files} == set(zoo_models()) and all(a.startswith("mmgen_zoo/") for a in files)
    assert "mmgen_zoo/shapes-shuffle/vq_model/shared.json" in files
    assert "mmgen_zoo/shapes-shuffle/vq_model/diffusion_pytorch_model.safetensors" not in files
    weights = [f for a, f in files.items() if a.endswith(".safetensors")]
    assert len({f.read_bytes() for f in weights}) == len(weights)
    assert sum(f.stat().st_size for f in files.values()) < 105e6  # uncompressed; the built wheel is ~94 MB
    assert not any("__pycache__" in a for a in files)


def test_zoo_wheel_refuses_a_link_or_a_second_copy_of_weights(tmp_path):
    backend = _load_zoo_backend()
    for name in ("a", "b"):
        (tmp_path / name / "vq_model").mkdir(parents=True)
        (tmp_path / name / "model_index.json").write_text("{}")
    (tmp_path / "a" / "vq_model" / "w.safetensors").write_bytes(b"weights")
    assert [a for a, _ in backend.wheel_files(tmp_path)] == ["mmgen_zoo/a/model_index.json",
                                                             "mmgen_zoo/a/vq_model/w.safetensors",
                                                             "mmgen_zoo/b/model_index.json"]
    (tmp_path / "b" / "vq_model" / "w.safetensors").symlink_to("../../a/vq_model/w.safetensors")
    with pytest.raises(ValueError, match=r"b/vq_model/w.safetensors is a symbolic link: a wheel would store"):
        backend.wheel_files(tmp_path)
    (tmp_path / "b" / "vq_model" / "w.safetensors").unlink()
    (tmp_path / "b" / "vq_model" / "w.safetensors").write_bytes(b"weights")
    with pytest.raises(ValueError, match=r"b/vq_model/w.safetensors holds the same bytes as .*a/vq_model"):
        backend.wheel_files(tmp_path)


def _fake_model(directory: Path) -> Path:
    directory.mkdir(parents=True)
    (directory / "model_index.json").write_text('{"_class_name": "NextTokenPipeline"}')
    return directory


def test_models_are_found_beside_the_code_or_in_the_installed_zoo_package(tmp_path, monkeypatch):
    import importlib

    import mmgen.zoo as zoo

    site, checkout = tmp_path / "site", tmp_path / "checkout"
    _fake_model(site / "mmgen_zoo" / "m1")
    (site / "mmgen_zoo" / "__init__.py").write_text("")
    checkout.mkdir()
    monkeypatch.syspath_prepend(str(site))
    importlib.invalidate_caches()
    assert zoo.find_zoo(checkout) == (site / "mmgen_zoo").resolve()  # installed from wheels: the zoo package
    _fake_model(checkout / "m2")
    assert zoo.find_zoo(checkout) == checkout  # a checkout / editable install: the models beside the code
    assert zoo.find_zoo() == Path(zoo.__file__).resolve().parent == zoo.ZOO_DIR  # this checkout


def test_missing_zoo_names_the_distribution_to_install(tmp_path, monkeypatch):
    import mmgen.zoo as zoo

    monkeypatch.setattr(zoo, "ZOO_DIR", tmp_path)
    assert zoo.find_zoo(tmp_path) == tmp_path  # no mmgen_zoo package on this path either
    with pytest.raises(FileNotFoundError, match=r"model 'shapes-emoji' is not a directory, and no shipped models are "
                                                r"installed .*pip install mmgen-zoo"):
        zoo.resolve_model("shapes-emoji")
    _fake_model(tmp_path / "m1")
    with pytest.raises(FileNotFoundError, match=r"neither a directory nor a shipped model \(m1\)"):
        zoo.resolve_model("shapes-emoji")


def test_shared_component_loads_the_other_models_file():
    """shapes-shuffle decodes with shapes-emoji's VQGAN: its vq_model holds config.json and shared.json, no weights,
    and every loader reads shapes-emoji's file through the reference; sizes count it once in the zoo."""
    import torch
    from diffusers import DiffusionPipeline

    from mmgen.pipelines import load_pipeline
    from mmgen.zoo import ZOO_DIR, model_mb, zoo_card, zoo_mb, zoo_models
    from tokenizers_vis import VQGAN
    from tokenizers_vis.shared import shared_source

    component = ZOO_DIR / "shapes-shuffle" / "vq_model"
    assert sorted(p.name for p in component.iterdir()) == ["config.json", "shared.json"]
    assert shared_source(component) == (ZOO_DIR / "shapes-emoji" / "vq_model").resolve()
    emoji = VQGAN.from_pretrained(ZOO_DIR / "shapes-emoji", subfolder="vq_model").state_dict()
    for vq in (VQGAN.from_pretrained(ZOO_DIR / "shapes-shuffle", subfolder="vq_model"),
               load_pipeline("shapes-shuffle").vq_model,
               DiffusionPipeline.from_pretrained(str(ZOO_DIR / "shapes-shuffle"), trust_remote_code=True).vq_model):
        state = vq.state_dict()
        assert state.keys() == emoji.keys() and all(torch.equal(state[k], emoji[k]) for k in emoji)
    assert zoo_card("shapes-shuffle")["parameters"]["vq_model"] == zoo_card("shapes-emoji")["parameters"]["vq_model"]
    shared_mb = (ZOO_DIR / "shapes-emoji/vq_model/diffusion_pytorch_model.safetensors").stat().st_size / 2**20
    sizes = {n: model_mb(d) for n, d in zoo_models().items()}
    assert sizes["shapes-shuffle"] > 2 * shared_mb  # what loading it reads, the shared VQGAN included
    assert abs(sum(sizes.values()) - zoo_mb() - shared_mb) < 0.01  # stored once


def test_a_broken_reference_is_named(tmp_path):
    import json
    import shutil

    from mmgen.pipelines import verify
    from mmgen.zoo import ZOO_DIR
    from tokenizers_vis import VQGAN

    zoo = tmp_path / "zoo"
    shutil.copytree(ZOO_DIR / "shapes-emoji", zoo / "shapes-emoji")
    shutil.copytree(ZOO_DIR / "shapes-shuffle", zoo / "shapes-shuffle")
    verify(zoo / "shapes-shuffle")
    weights = zoo / "shapes-emoji" / "vq_model" / "diffusion_pytorch_model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 1
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"shared by .*shapes-shuffle/vq_model/shared.json.*is not the file it records"):
        verify(zoo / "shapes-shuffle")
    config = zoo / "shapes-emoji" / "vq_model" / "config.json"
    config.write_text(json.dumps({**json.loads(config.read_text()), "num_codes": 7}))
    with pytest.raises(ValueError, match=r"whose config.json differs"):
        VQGAN.from_pretrained(zoo / "shapes-shuffle", subfolder="vq_model")
    shutil.rmtree(zoo / "shapes-emoji")
    with pytest.raises(ValueError, match=r"shares \.\./\.\./shapes-emoji/vq_model/diffusion_pytorch_model"
                                         r"\.safetensors, which does not exist"):
        verify(zoo / "shapes-shuffle")


def test_package_zoo_shares_a_tokenizer_by_reference(tmp_path):
    """Packaging a model whose tokenizer another zoo model ships byte for byte writes a shared.json in place of the
    weights (a reference a wheel keeps as it is, where a link becomes a second copy); the tokenizer loads the same
    tensors; a component whose class cannot follow a reference (the transformer) keeps its file; the shared-from
    model cannot be replaced by one that drops what the other reads."""
    import importlib.util
    import shutil

    import torch
    from safetensors.torch import load_file, save_file

    from mmgen.pipelines import load_pipeline
    from mmgen.zoo import ZOO_DIR, model_mb, zoo_mb

    spec = importlib.util.spec_from_file_location("package_zoo", ROOT / "scripts" / "package_zoo.py")
    package_zoo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(package_zoo)
    zoo = tmp_path / "zoo"
    card = {"paradigm": "next_scale", "data": "shapes", "description": "", "train": []}
    a = package_zoo.package(ZOO_DIR / "shapes-nextscale", "a", card, zoo=zoo)
    b = package_zoo.package(ZOO_DIR / "shapes-nextscale", "b", card, zoo=zoo)
    assert not [f for f in zoo.rglob("*") if f.is_symlink()]
    names = {p.name for p in (b / "vq_model").iterdir()}
    assert "shared.json" in names and "diffusion_pytorch_model.safetensors" not in names, names
    assert (b / "transformer" / "diffusion_pytorch_model.safetensors").is_file()  # NextScaleModel: no reference
    assert abs(model_mb(b) - model_mb(a)) < 0.01 and zoo_mb(zoo) < 2 * model_mb(a) - 2  # the 2.4 MB VQ once
    pa, pb = load_pipeline(a), load_pipeline(b)
    for (k, v), w in zip(pa.vq_model.state_dict().items(), pb.vq_model.state_dict().values()):
        assert torch.equal(v, w), k
    changed = tmp_path / "changed"
    shutil.copytree(ZOO_DIR / "shapes-nextscale", changed)
    w = changed / "vq_model" / "diffusion_pytorch_model.safetensors"
    save_file({k: v.float() + 1e-2 for k, v in load_file(w).items()}, w)
    with pytest.raises(ValueError, match="b shares a/vq_model/diffusion_pytorch_model.safetensors, which the new a"):
        package_zoo.package(changed, "a", card, zoo=zoo)
    for (k, v), w in zip(pb.vq_model.state_dict().items(), load_pipeline(b).vq_model.state_dict().values()):
        assert torch.equal(v, w), k  # b still loads what it did
