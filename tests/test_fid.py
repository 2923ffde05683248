"""FID / IS / precision-recall of ADM `.npz` batches (`mmgen.eval.fid`, `mmgen eval --samples`).

No real Inception weights exist offline, so the metric checks run on a tiny seeded stand-in extractor, and one
test saves a randomly initialised Inception v3 in the FID weights' format (a state dict of the same keys and
shapes, `torch.save`d) and runs the whole command on it against torchmetrics' own FID and IS on that file.
"""

import json
import sys

import numpy as np
import pytest
import torch
import torch.nn as nn

from mmgen.cli import main as mmgen_main
from mmgen.eval.adm_npz import image_shape, iter_images, write_npz
from mmgen.eval.fid import evaluate_npz, extract, inception_score, precision_recall, statistics

pytest.importorskip("torch_fidelity")  # the `fid` extra; installed with `dev` so CI runs these


class TinyExtractor(nn.Module):
    """uint8 (B, 3, H, W) -> (pooled features (B, 16), logits (B, 10)): a seeded stand-in for the Inception."""

    description = "tiny seeded stand-in"

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.conv = nn.Conv2d(3, 16, 3)
        self.fc = nn.Linear(16, 10)
        with torch.no_grad():
            for p in self.parameters():
                p.copy_(torch.randn(p.shape, generator=g) * 0.5)

    def forward(self, x):
        h = torch.relu(self.conv(x.float() / 127.5 - 1)).mean((2, 3))
        return h, self.fc(h)


def images(n, seed=0, size=8):
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def save(path, **arrays):
    np.savez(path, **arrays)
    return path


def perturb(x, sigma, seed=1):
    noise = np.random.default_rng(seed).normal(0, sigma, x.shape)
    return np.clip(x + noise, 0, 255).astype(np.uint8)


def test_adm_npz_streams_in_and_out_and_leaves_nothing_on_failure(tmp_path):
    x, labels = images(7), np.arange(7)
    path = tmp_path / "a.npz"
    write_npz(path, x.shape, (x[i:i + 3] for i in range(0, 7, 3)), {"arr_1": labels})
    with np.load(path) as d:  # an ordinary npz to numpy (and to ADM's evaluator)
        assert np.array_equal(d["arr_0"], x) and np.array_equal(d["arr_1"], labels)
    assert np.array_equal(np.concatenate(list(iter_images(path, 2))), x)
    bad = tmp_path / "b.npz"
    with pytest.raises(ValueError, match="6 images written, 7 announced"):
        write_npz(bad, x.shape, [x[:6]])
    assert list(tmp_path.iterdir()) == [path]  # no half-written file


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_perturbation(tmp_path):
    x = images(64)
    ref = save(tmp_path / "ref.npz", arr_0=x)
    fids = []
    for sigma in (0, 8, 32):
        s = save(tmp_path / f"s{sigma}.npz", arr_0=perturb(x, sigma) if sigma else x)
        fids.append(evaluate_npz(s, ref, metrics=["fid"], extractor=TinyExtractor(), progress=False)["fid"])
    assert abs(fids[0]) < 1e-9
    assert 1e-4 < fids[1] < fids[2], fids


def test_fid_and_is_equal_torchmetrics_and_a_numpy_reference(tmp_path):
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.inception import InceptionScore

    a, b = images(40, 0), perturb(images(40, 0), 24)
    s, r = save(tmp_path / "s.npz", arr_0=a), save(tmp_path / "r.npz", arr_0=b)
    ours = evaluate_npz(s, r, metrics=["fid", "is"], is_splits=1, extractor=TinyExtractor(), progress=False)

    net = TinyExtractor()
    pool_net = type("Pool", (nn.Module,), {"forward": lambda self, x: net(x)[0]})()
    logit_net = type("Logits", (nn.Module,), {"forward": lambda self, x: net(x)[1]})()
    tm_fid = FrechetInceptionDistance(feature=pool_net, input_img_size=(3, 8, 8))
    tm_fid.update(torch.from_numpy(b).permute(0, 3, 1, 2), real=True)
    tm_fid.update(torch.from_numpy(a).permute(0, 3, 1, 2), real=False)
    assert ours["fid"] == pytest.approx(float(tm_fid.compute()), rel=1e-5)  # torchmetrics returns float32
    tm_is = InceptionScore(feature=logit_net, splits=1)
    tm_is.update(torch.from_numpy(a).permute(0, 3, 1, 2))
    assert ours["inception_score"]["mean"] == pytest.approx(float(tm_is.compute()[0]), rel=1e-6)

    # the Frechet distance written out: tr sqrt(S1 S2) = tr sqrt(S1^1/2 S2 S1^1/2), through symmetric eigh
    with torch.no_grad():
        f1, f2 = (net(torch.from_numpy(v).permute(0, 3, 1, 2))[0].double().numpy() for v in (a, b))
    m1, m2, c1, c2 = f1.mean(0), f2.mean(0), np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    w, v = np.linalg.eigh(c1)
    root = (v * np.sqrt(w.clip(0))) @ v.T
    cross = np.sqrt(np.linalg.eigvalsh(root @ c2 @ root).clip(0)).sum()
    assert ours["fid"] == pytest.approx(((m1 - m2) ** 2).sum() + np.trace(c1) + np.trace(c2) - 2 * cross, rel=1e-6)


def test_inception_score_counts_confident_classes_and_shuffles_class_ordered_batches():
    assert inception_score(torch.zeros(20, 10), splits=2)["mean"] == pytest.approx(1.0)  # uniform predictions
    k, per = 5, 20
    logits = 50 * torch.eye(10)[:k].repeat_interleave(per, 0)  # class-ordered rows, each confident
    assert inception_score(logits, splits=1)["mean"] == pytest.approx(k, rel=1e-6)
    # 5 splits of a class-ordered batch would each hold one class (IS 1) without the shuffle
    assert inception_score(logits, splits=5)["mean"] > 3.5
    with pytest.raises(ValueError, match=r"--is-splits\) must be an integer in \[1, 100\]"):
        inception_score(logits, splits=101)


def test_precision_and_recall_of_the_same_and_of_disjoint_sets():
    f = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    assert precision_recall(f, f) == {"precision": 1.0, "recall": 1.0}
    assert precision_recall(f + 100, f) == {"precision": 0.0, "recall": 0.0}
    half = precision_recall(torch.cat([f[:25], f[:25] + 100]), f)  # half the samples far off the data
    assert half["precision"] == pytest.approx(0.5)


def test_stored_reference_statistics_give_the_fid_of_the_images(tmp_path):
    x, y = images(30, 0), images(30, 5)
    pool, _ = extract([y], len(y), TinyExtractor(), progress=False)
    stats = statistics(pool)
    both = save(tmp_path / "both.npz", arr_0=y, **stats)  # an ADM reference batch: images, mu, sigma
    only = save(tmp_path / "stats.npz", **stats)
    s = save(tmp_path / "s.npz", arr_0=x)
    run = dict(extractor=TinyExtractor(), progress=False, is_splits=3)
    stored = evaluate_npz(s, both, **run)
    from_images = evaluate_npz(s, both, reference_stats="images", **run)
    assert stored["reference_statistics"].startswith("mu / sigma stored")
    assert from_images["reference_statistics"].startswith("computed from the 30 images")
    assert stored["fid"] == pytest.approx(from_images["fid"], rel=1e-9)
    assert "precision" in stored  # the reference holds images: pr by default
    stats_only = evaluate_npz(s, only, **run)
    assert stats_only["fid"] == pytest.approx(stored["fid"], rel=1e-9) and "precision" not in stats_only
    with pytest.raises(ValueError, match="has no images .arr_0., which precision / recall need"):
        evaluate_npz(s, only, metrics=["pr"], **run)
    with pytest.raises(ValueError, match="has no stored mu / sigma"):
        evaluate_npz(s, s, reference_stats="stored", **run)


def test_bad_batches_and_weights_are_named(tmp_path, capsys):
    good = save(tmp_path / "good.npz", arr_0=images(4))
    cases = {
        "does not exist": (tmp_path / "missing.npz", FileNotFoundError),
        r"must be uint8 images \(N, H, W, 3\)": (save(tmp_path / "f.npz", arr_0=images(4).astype(np.float32)),
                                                ValueError),
        "has no arr_0": (save(tmp_path / "l.npz", arr_1=np.arange(3)), ValueError),
    }
    (tmp_path / "text.npz").write_text("not a zip")
    cases["is not an .npz archive"] = (tmp_path / "text.npz", ValueError)
    for message, (path, error) in cases.items():
        with pytest.raises(error, match=message):
            image_shape(path, "--samples")
    with pytest.raises(ValueError, match=r"metrics \(--metrics\) must be a non-empty list drawn from fid, is, pr"):
        evaluate_npz(good, good, metrics=["kid"], extractor=TinyExtractor())
    with pytest.raises(FileNotFoundError, match="--inception-weights .* does not exist"):
        evaluate_npz(good, good, tmp_path / "none.pth", is_splits=2)
    torch.save({"fc.weight": torch.zeros(10, 2048)}, tmp_path / "other.pth")
    with pytest.raises(ValueError, match="is not the FID Inception v3"):
        evaluate_npz(good, good, tmp_path / "other.pth", is_splits=2)

    def cli(*args):
        with pytest.raises(SystemExit) as e:
            mmgen_main(["eval", *map(str, args)])
        return e.value.code, capsys.readouterr().err

    assert cli("--samples", good, "--reference", good) == (
        2, "mmgen eval: error: --samples needs --inception-weights FILE: the FID Inception weights (e.g. "
           "pt_inception-2015-12-05-6726825d.pth); nothing is downloaded\n")
    code, err = cli("--samples", good, "--model", "shapes-emoji", "--inception-weights", good)
    assert code == 2 and "--samples scores an existing sample batch and takes no --model" in err
    code, err = cli("--reference", good)
    assert code == 2 and "--reference score a sample batch: pass --samples NPZ" in err
    code, err = cli("--samples", tmp_path / "f.npz", "--inception-weights", good, "--metrics", "is")
    assert code == 2 and "--samples" in err and "uint8 images (N, H, W, 3)" in err


def test_missing_torch_fidelity_names_the_extra(tmp_path, capsys, monkeypatch):
    good = save(tmp_path / "good.npz", arr_0=images(4))
    torch.save({}, tmp_path / "w.pth")
    monkeypatch.setitem(sys.modules, "torch_fidelity", None)  # import torch_fidelity now raises ImportError
    with pytest.raises(SystemExit) as e:
        mmgen_main(["eval", "--samples", str(good), "--metrics", "is", "--is-splits", "2",
                    "--inception-weights", str(tmp_path / "w.pth")])
    assert e.value.code == 2 and "pip install 'mmgen[fid]'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def random_inception(tmp_path_factory):
    """A randomly initialised Inception v3 in the FID weights' format: torchvision's network with 1008 classes and
    no aux head has the same keys and shapes; He-initialised convs keep the features O(1), a small classifier
    gives near-uniform predictions."""
    import torchvision

    torch.manual_seed(0)
    net = torchvision.models.inception_v3(weights=None, aux_logits=False, num_classes=1008, init_weights=False)
    for m in net.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, nonlinearity="relu")
    nn.init.normal_(net.fc.weight, std=0.02)
    nn.init.zeros_(net.fc.bias)
    path = tmp_path_factory.mktemp("inception") / "pt_inception-random.pth"
    torch.save(net.state_dict(), path)
    return path


def test_fid_inception_file_gives_torchmetrics_features_and_never_downloads(random_inception, tmp_path, capsys,
                                                                            monkeypatch):
    """The real path: the weights file loaded by torch-fidelity's FID Inception, through `mmgen eval --samples`,
    and its pool3 features equal to torchmetrics' FID network on the same file (TF1-style resize, i.e.
    antialias=False, as torch-fidelity and ADM resize). FID / IS from features are compared with torchmetrics
    above; a 2048-d FID itself costs a 2048 x 2048 eigendecomposition (seconds), so it is not repeated here."""
    import torch_fidelity.feature_extractor_inceptionv3 as fe
    from torchmetrics.image.fid import NoTrainInceptionV3

    from mmgen.eval.fid import InceptionFeatures

    def no_download(*args, **kwargs):
        raise AssertionError("a download was attempted")

    monkeypatch.setattr(fe, "load_state_dict_from_url", no_download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    a = images(2, 0, 16)
    s = save(tmp_path / "s.npz", arr_0=a, arr_1=np.arange(2))
    out = tmp_path / "is.json"
    assert mmgen_main(["eval", "--samples", str(s), "--inception-weights", str(random_inception), "--metrics", "is",
                       "--is-splits", "1", "--out", str(out), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report == json.loads(out.read_text()) and report["num_samples"] == 2
    assert report["implementation"]["features"].startswith("torch-fidelity ")
    assert f"FID Inception weights from {random_inception}" in report["implementation"]["features"]
    assert report["implementation"]["inception_score"].startswith("torch-fidelity ")
    assert report["inception_score"]["mean"] == pytest.approx(1.0, abs=1e-3)  # near-uniform predictions

    pool, logits = extract(iter_images(s, 2), 2, InceptionFeatures(random_inception), progress=False)
    assert pool.shape == (2, 2048) and logits.shape == (2, 1008)
    theirs = NoTrainInceptionV3("inception-v3-compat", ["2048"], str(random_inception), antialias=False)
    with torch.no_grad():
        expected = theirs(torch.from_numpy(a).permute(0, 3, 1, 2))
    assert torch.allclose(pool, expected, rtol=1e-5, atol=1e-5 * expected.abs().max().item())
    assert pool.std() > 0.05  # features that carry something (He-initialised), not a collapsed network


def test_images_to_npz_packs_class_folders_with_adm_center_crops(tmp_path, capsys):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "scripts" / "images_to_npz.py"
    spec = importlib.util.spec_from_file_location("images_to_npz_script", script)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    from PIL import Image

    wide = np.zeros((16, 48, 3), np.uint8)
    wide[:, :] = (255, 0, 0)
    wide[:, 16:32] = (0, 255, 0)  # the center third: what a center crop keeps
    for rel, arr in (("cat/a.png", wide), ("cat/b.png", np.full((40, 40, 3), 9, np.uint8)),
                     ("dog/c.jpg", np.full((8, 8, 3), 200, np.uint8))):
        (tmp_path / "data" / rel).parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(arr).save(tmp_path / "data" / rel)
    out = tmp_path / "ref.npz"
    assert mod.main([str(tmp_path / "data"), "--out", str(out), "--size", "8", "--labels", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["classes"] == ["cat", "dog"]
    with np.load(out) as d:
        assert d["arr_0"].shape == (3, 8, 8, 3) and d["arr_1"].tolist() == [0, 0, 1]
        assert (d["arr_0"][0, :, 2:6, 1] > 200).all() and (d["arr_0"][0, :, 2:6, 0] < 50).all()
        assert (d["arr_0"][1] == 9).all()
    with pytest.raises(SystemExit) as e:
        mod.main([str(tmp_path / "data" / "cat"), "--out", str(tmp_path / "x.npz"), "--labels"])
    assert e.value.code == 2 and "--labels needs ImageNet-style class folders" in capsys.readouterr().err
    assert not (tmp_path / "x.npz").exists()
