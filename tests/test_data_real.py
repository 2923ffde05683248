"""Real data sets: Fashion-MNIST (Debian package) and Twemoji (npm package), as `bash scripts/install_data.sh`
installs them; counts are those of the pinned emoji-datasource-twitter 16.0.0."""

import re
from collections import Counter

import numpy as np
import pytest
import torch

from mmgen.data import FASHION_CLASSES, ConcatCaptions, FashionMNIST, ShapesDataset, Twemoji
from mmgen.data.emoji import article, clean_name, load_entries
from mmgen.data.fashion_mnist import caption_for, load_split, to_tensor
from mmgen.training.data import DATASET_NAMES, DataConfig, make_dataset


def test_fashion_mnist_splits_have_their_published_sizes_and_balanced_classes():
    train, test = FashionMNIST("train"), FashionMNIST("test")
    assert (len(train), len(test)) == (60000, 10000)
    assert np.bincount(train.labels).tolist() == [6000] * 10
    assert np.bincount(test.labels).tolist() == [1000] * 10
    assert train.labels[:10].tolist() == [9, 0, 0, 3, 0, 2, 7, 2, 5, 5]  # the data set's known first labels
    assert test.labels[:5].tolist() == [9, 2, 1, 1, 6]


def test_fashion_mnist_items_captions_agree_with_labels():
    data = FashionMNIST("test")
    for i in range(0, 10000, 97):
        item = data[i]
        assert item["label"] == int(data.labels[i])
        assert item["caption"] == caption_for(item["label"])
        assert item["caption"].endswith(" " + FASHION_CLASSES[item["label"]])
    assert data.captions[:3] == ["a photo of an ankle boot", "a photo of a pullover", "a photo of a trouser"]
    assert [caption_for(k) for k in (0, 9)] == ["a photo of a t-shirt", "a photo of an ankle boot"]
    classes = FashionMNIST("test", caption_mode="class")
    assert classes[0]["caption"] == "ankle boot" and classes.captions[1] == "pullover"
    assert len(FASHION_CLASSES) == 10 and FASHION_CLASSES[7] == "sneaker"


def test_fashion_mnist_image_format_matches_the_other_datasets():
    item = FashionMNIST("train")[0]
    x = item["image"]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() <= 1.0  # black background -> -1, like [-1, 1] shapes
    assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # gray copied into RGB
    assert ShapesDataset(size=1)[0]["image"].shape == x.shape
    # At the native size the conversion is exact: v / 127.5 - 1.
    raw = load_split("train")[0][0]
    native = FashionMNIST("train", image_size=28)[0]["image"]
    assert torch.equal(native[0], torch.from_numpy(raw.astype(np.float32)) / 127.5 - 1)
    # The batched conversion (used by training loops) equals the per-item one.
    batch = to_tensor(load_split("train")[0][:4], 64)
    assert batch.shape == (4, 3, 64, 64) and torch.equal(batch[0], x)


def test_fashion_mnist_subset_is_seeded_and_arguments_are_checked():
    a, b = FashionMNIST("test", size=50, seed=1), FashionMNIST("test", size=50, seed=1)
    c = FashionMNIST("test", size=50, seed=2)
    assert len(a) == 50 and np.array_equal(a.images, b.images) and not np.array_equal(a.images, c.images)
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test'\), got 'val'"):
        FashionMNIST("val")
    with pytest.raises(ValueError, match="caption_mode must be one of"):
        FashionMNIST("test", caption_mode="label")
    with pytest.raises(ValueError, match=r"size must be None or an integer in \[1, 10000\]"):
        FashionMNIST("test", size=10001)


def test_missing_data_errors_name_the_install_script(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"train-images-idx3-ubyte.gz.*scripts/install_data.sh"):
        FashionMNIST("train", root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"emoji.json.*scripts/install_data.sh"):
        Twemoji(root=tmp_path)
    # An interrupted install (index present, images absent) fails at construction, not mid-training.
    src = Twemoji().root / "emoji.json"
    (tmp_path / "emoji.json").write_bytes(src.read_bytes())
    with pytest.raises(FileNotFoundError, match=r"1625 Twemoji image\(s\) missing.*install_data.sh"):
        Twemoji(split="all", root=tmp_path)


def test_twemoji_captions_and_images():
    data = Twemoji(split="all")
    assert len(data) == 1625
    by_image = {e.image: e.caption for e in data.entries}
    assert by_image["1f600.png"] == "a grinning face emoji"
    assert by_image["2648.png"] == "an aries emoji"
    assert by_image["1f984.png"] == "a unicorn face emoji"  # spelling says "an", sound says "a"
    assert by_image["1f468-200d-1f9b0.png"] == "a man red hair emoji"  # CLDR colon dropped
    assert all(re.fullmatch(r"an? [a-z0-9][a-z0-9 ,'&.*#!\-]* emoji", c) for c in data.captions)
    assert clean_name("RESCUE WORKER\u2019S HELMET") == "rescue worker's helmet"
    assert [article(w) for w in ("eagle", "one-piece swimsuit", "hourglass", "european castle")] == \
        ["an", "a", "an", "a"]
    item = data[data.captions.index("a grinning face emoji")]
    x = item["image"]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and -1 <= x.min() < 0 and x.max() == 1
    assert torch.equal(x[:, 0, 0], torch.ones(3))  # transparent corner composited on white
    assert Twemoji(image_size=32, split="all")[0]["image"].shape == (3, 32, 32)


def test_twemoji_flags_and_named_only_change_what_is_kept():
    plain = load_entries()
    flags = load_entries(include_flags=True)
    everything = load_entries(include_flags=True, named_only=False)
    assert (len(plain), len(flags), len(everything)) == (1625, 1895, 3786)  # 3786 = every PNG shipped
    assert Counter(e.category for e in flags)["Flags"] == 270
    assert "Flags" not in {e.category for e in plain}
    assert "a jordan flag emoji" in {e.caption for e in flags}
    named = {e.caption for e in flags}
    assert "an emoji modifier fitzpatrick type-3 emoji" not in named
    assert not any("unified ideograph" in c for c in named)  # 11 code-point names; "circled ideograph secret" stays
    assert "a circled ideograph secret emoji" in named
    captions = {e.caption for e in everything}
    assert {"a squared cjk unified ideograph-7533 emoji", "a waving hand sign emoji, medium-dark skin tone",
            "a handshake emoji, light and dark skin tones"} <= captions
    assert all(e.skin_tone is None for e in flags)


def test_twemoji_split_is_deterministic_disjoint_and_complete():
    train, test, full = Twemoji(split="train"), Twemoji(split="test"), Twemoji(split="all")
    assert (len(train), len(test)) == (1552, 73)
    assert train.entries == Twemoji(split="train").entries
    assert not set(train.captions) & set(test.captions)
    assert sorted(e.image for e in train.entries + test.entries) == sorted(e.image for e in full.entries)
    # Skin-tone variants follow their base emoji, so no test name is seen in training with another tone.
    var_train = {e.name for e in load_entries(named_only=False, split="train")}
    var_test = {e.name for e in load_entries(named_only=False, split="test")}
    assert not var_train & var_test
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test', 'all'\), got 'heldout'"):
        Twemoji(split="heldout")


def test_make_dataset_builds_the_real_datasets():
    fm = make_dataset(DataConfig(name="fashion_mnist", size=300, caption_mode="class"))
    assert isinstance(fm, FashionMNIST) and len(fm) == 300 and fm.captions[0] in FASHION_CLASSES
    assert len(make_dataset(DataConfig(name="fashion_mnist", size=20000), "heldout")) == 10000  # the test split
    assert len(make_dataset(DataConfig(name="emoji"))) == 1552
    assert len(make_dataset(DataConfig(name="emoji", include_flags=True), "heldout")) == 89
    both = make_dataset(DataConfig(name="shapes+emoji", size=40))
    assert isinstance(both, ConcatCaptions) and len(both) == 40 + 1552
    assert both.captions[:40] == ShapesDataset(size=40).captions
    assert both.captions[40] == Twemoji().captions[0] and both[40]["caption"] == both.captions[40]
    assert set(DATASET_NAMES) == {"shapes", "folder", "imagefolder", "fashion_mnist", "emoji", "shapes+emoji", "flags",
                                  "icons"}
    with pytest.raises(ValueError, match=r"data.name must be one of .*'fashion_mnist', 'emoji', 'shapes\+emoji', "
                                         r"'flags', 'icons'\), got 'mnist'"):
        make_dataset(DataConfig(name="mnist"))
    with pytest.raises(ValueError, match="split must be 'train' or 'heldout', got 'test'"):
        make_dataset(DataConfig(name="emoji"), "test")
