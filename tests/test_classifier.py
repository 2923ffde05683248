"""The Fashion-MNIST classifier: shipped weights, save/load, a short training run."""

import json
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from mmgen.data import FashionMNIST
from mmgen.data.fashion_mnist import to_tensor
from mmgen.eval.classifier import DEFAULT_WEIGHTS, FashionClassifier, load_default

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_classifier_is_accurate_on_the_test_split():
    model = load_default()
    assert not model.training and model.config.image_size == 64
    assert sum(f.stat().st_size for f in DEFAULT_WEIGHTS.iterdir()) < 1_000_000
    test = FashionMNIST("test")
    images = to_tensor(test.images[:2000], 64)
    pred = model.predict(images)
    assert pred.dtype == torch.long and pred.shape == (2000,)
    accuracy = (pred == torch.from_numpy(test.labels[:2000])).float().mean().item()
    assert accuracy >= 0.85, accuracy
    # Dataset items and PIL images give the same predictions as the batched tensors.
    assert model.predict(torch.stack([test[i]["image"] for i in range(8)])).tolist() == pred[:8].tolist()
    pils = [Image.fromarray(((images[i] + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()) for i in range(8)]
    assert model.predict(pils).tolist() == pred[:8].tolist()


def test_save_load_is_bit_identical_and_predict_keeps_train_mode(tmp_path):
    torch.manual_seed(0)
    model = FashionClassifier(image_size=32, widths=(4, 8), dropout=0.0)
    x = torch.rand(5, 3, 32, 32) * 2 - 1
    model.train()(x)  # moves the BatchNorm running statistics away from their init
    model.eval()
    model.save_pretrained(tmp_path)
    loaded = FashionClassifier.from_pretrained(tmp_path).eval()
    assert (loaded.config.image_size, list(loaded.config.widths), loaded.config.num_classes) == (32, [4, 8], 10)
    for (k, a), (k2, b) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(a, b), k
    assert torch.equal(model(x), loaded(x))
    model.train()
    assert torch.equal(model.predict(x), loaded(x).argmax(-1)) and model.training


def test_bad_inputs_are_rejected_by_name():
    model = FashionClassifier(image_size=32, widths=(4, 8))
    with pytest.raises(ValueError, match=r"images must have shape \(B, 3, 32, 32\) or \(B, 1, 32, 32\), "
                                         r"got \(2, 3, 64, 64\)"):
        model.predict(torch.zeros(2, 3, 64, 64))
    with pytest.raises(ValueError, match="image_size must be a multiple of 16 for 3 stages, got 40"):
        FashionClassifier(image_size=40)


def test_short_training_run_lowers_the_loss_and_saves_a_loadable_model(tmp_path, monkeypatch, capsys):
    import importlib.util

    # the script's main in this process (no second torch import): its parsing, training, scoring and saving
    spec = importlib.util.spec_from_file_location("classifier_train_script", ROOT / "scripts" / "train_classifier.py")
    script = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, spec.name, script)
    spec.loader.exec_module(script)
    out = tmp_path / "clf"
    script.main(["--out", str(out), "--train-size", "1024", "--eval-size", "500", "--epochs", "2", "--batch-size",
                 "32", "--image-size", "32", "--json"])
    result = json.loads(capsys.readouterr().out)
    assert result["steps"] == 64 and result["train_images"] == 1024 and result["test_images"] == 500
    assert result["final_loss"] < result["first_loss"] - 1.0, result
    assert result["test_accuracy"] > 0.5, result  # ten classes: chance is 0.1
    loaded = FashionClassifier.from_pretrained(out)
    assert loaded.config.image_size == 32
    with pytest.raises(SystemExit) as bad:
        script.main(["--epochs", "0"])
    assert bad.value.code == 2 and "--epochs must be >= 1, got 0" in capsys.readouterr().err
