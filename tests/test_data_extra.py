"""Optional real data sets: country flags (Debian iso-flags-png-320x240 + iso-codes) and named icons (the Font
Awesome fonts of the qtawesome 1.4.2 wheel), as `bash scripts/install_data.sh` installs them; the counts are
those of these pinned versions."""

import re

import numpy as np
import pytest
import torch
from PIL import Image

from mmgen.data import Flags, Icons
from mmgen.data.flags import country_name, letterbox, load_countries
from mmgen.data.icons import IconEntry, article, icon_words, load_entries, render_glyph
from mmgen.training.data import DATASET_NAMES, DataConfig, make_dataset

FLAGS_TEST = ["the flag of Benin", "the flag of Hungary", "the flag of Iraq", "the flag of Kiribati",
              "the flag of Nicaragua", "the flag of Qatar", "the flag of Romania", "the flag of South Sudan"]


def test_flags_counts_skipped_files_and_split():
    full, train, test = Flags(split="all"), Flags(split="train"), Flags(split="test")
    assert (len(full), len(train), len(test)) == (249, 241, 8)
    assert full.skipped == ["_basque", "_catalonia", "_earth_pernefeldt", "_galicia", "_generic", "_olympic",
                            "_scotland", "_united_nations", "_wales", "brl", "eo", "eu", "zz"]
    assert test.captions == FLAGS_TEST
    assert train.entries == Flags(split="train").entries  # deterministic
    assert not set(train.captions) & set(test.captions)
    assert sorted(train.captions + test.captions) == sorted(full.captions)
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test', 'all'\), got 'heldout'"):
        Flags(split="heldout")
    with pytest.raises(ValueError, match="image_size must be an integer >= 1, got 0"):
        Flags(image_size=0)


def test_flag_captions_use_readable_country_names():
    captions = {e.code: e.caption for e in Flags(split="all").entries}
    assert captions["fr"] == "the flag of France"
    assert captions["bo"] == "the flag of Bolivia"  # common_name over "Bolivia, Plurinational State of"
    assert captions["nl"] == "the flag of the Netherlands"
    assert captions["gb"] == "the flag of the United Kingdom"
    assert captions["va"] == "the flag of the Holy See"  # "(Vatican City State)" dropped
    assert captions["vg"] == "the flag of the British Virgin Islands"  # "Virgin Islands, British" turned round
    assert captions["cd"] == "the flag of the Democratic Republic of the Congo"
    assert captions["bq"] == "the flag of Bonaire, Sint Eustatius and Saba"  # a list keeps its comma
    assert captions["bb"] == "the flag of Barbados" and captions["vc"] == "the flag of Saint Vincent and the Grenadines"
    assert len(set(captions.values())) == 249
    assert country_name({"name": "Palestine, State of"}) == "State of Palestine"
    assert len(load_countries()) == 249


def test_flag_images_are_letterboxed_on_white():
    data = Flags(split="all")
    x = data[[e.code for e in data.entries].index("fr")]["image"]
    assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and x.min() >= -1 and x.max() == 1
    # The 268x188 flag becomes 64x45, centred: 9 white rows above, 10 below; the flag fills every column.
    assert torch.equal(x[:, :9], torch.ones(3, 9, 64)) and torch.equal(x[:, 54:], torch.ones(3, 10, 64))
    assert not torch.equal(x[:, 9], torch.ones(3, 64)) and not torch.equal(x[:, 53], torch.ones(3, 64))
    blue, white, red = x[:, 32, 12], x[:, 32, 32], x[:, 32, 52]  # the tricolour, hoist to fly
    assert blue[2] > blue[0] + 0.5 and red[0] > red[2] + 0.5 and white.min() > 0.7
    assert Flags(image_size=32, split="test")[0]["image"].shape == (3, 32, 32)
    tall = letterbox(Image.new("RGB", (10, 20), (0, 0, 0)), 8)
    assert tall.getpixel((1, 4)) == (255, 255, 255) and tall.getpixel((2, 4)) == (0, 0, 0)  # bars at the sides


def test_icon_counts_and_split():
    assert (len(load_entries("fa5s")), len(load_entries("fa6s"))) == (1001, 1401)
    names = {e.name for e in load_entries("fa5s")} | {e.name for e in load_entries("fa6s")}
    assert "font-awesome-logo-full" not in names and "notdef" not in names  # glyphs that draw nothing / a box
    train, test = Icons(split="train"), Icons(split="test")
    assert (len(train), len(test)) == (957, 44)
    assert [e.name for e in test.entries[:5]] == ["atlas", "border-style", "calendar-minus", "charging-station",
                                                  "file-invoice-dollar"]
    assert not set(train.captions) & set(test.captions)
    assert train.entries == Icons(split="train").entries
    # The split hashes the name, not the font: a name both sets hold is on the same side in each.
    test5 = {e.name for e in test.entries}
    both = {e.name for e in load_entries("fa5s")} & {e.name for e in load_entries("fa6s")}
    assert {e.name for e in load_entries("fa6s", split="test")} & both == test5 & both
    with pytest.raises(ValueError, match=r"font must be one of \('fa5s', 'fa6s'\), got 'fa4'"):
        Icons(font="fa4")
    with pytest.raises(ValueError, match=r"split must be one of \('train', 'test', 'all'\), got 'heldout'"):
        Icons(split="heldout")
    with pytest.raises(ValueError, match="image_size must be an integer >= 8, got 4"):
        Icons(image_size=4)


def test_icon_captions():
    captions = {e.name: e.caption for e in load_entries("fa5s")}
    assert captions["arrow-up"] == "an icon of an arrow up"
    assert captions["user-md"] == "an icon of a user md"
    assert captions["hourglass-half"] == "an icon of an hourglass half"
    assert captions["hdd"] == "an icon of an hdd" and captions["x-ray"] == "an icon of an x ray"
    assert captions["universal-access"] == "an icon of a universal access"
    assert captions["umbrella"] == "an icon of an umbrella" and captions["euro-sign"] == "an icon of a euro sign"
    fa6 = {e.name: e.caption for e in load_entries("fa6s")}
    assert (fa6["a"], fa6["8"], fa6["i-cursor"]) == ("an icon of the letter A", "an icon of the number 8",
                                                      "an icon of an i cursor")
    assert [article(w) for w in ("egg", "usb", "sms", "tv", "18", "80", "7", "hour")] == \
        ["an", "a", "an", "a", "an", "an", "a", "an"]
    assert icon_words("angle-double-up") == "angle double up"
    assert all(re.fullmatch(r"an icon of (an? [a-z0-9 ]+|the letter [A-Z]|the number [0-9])", c)
               for c in list(captions.values()) + list(fa6.values()))
    assert Icons(split="all").captions[:2] == ["an icon of an ad", "an icon of an address book"]


@pytest.mark.parametrize("font", ["fa5s", "fa6s"])
def test_icon_glyphs_are_centred_and_not_clipped(font):
    data = Icons(font=font, split="all")
    for i in range(0, len(data), 13):
        x = data[i]["image"]
        assert x.shape == (3, 64, 64) and x.dtype == torch.float32 and x.max() == 1 and x.min() < -0.9, i
        assert torch.equal(x[0], x[1]) and torch.equal(x[1], x[2])  # black on white: gray
        ink = x[0] < 0.99
        rows, cols = ink.any(1).nonzero().flatten(), ink.any(0).nonzero().flatten()
        # The 10% margin (6 px) stays white: ink touches no border; the long side fills the 52 px box.
        assert rows[0] >= 6 and cols[0] >= 6 and rows[-1] <= 57 and cols[-1] <= 57, data.entries[i]
        assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 >= 50, data.entries[i]
        assert abs((rows[0] + rows[-1]).item() / 2 - 31.5) <= 1 and abs((cols[0] + cols[-1]).item() / 2 - 31.5) <= 1


def test_a_flat_glyph_is_scaled_by_its_long_side():
    minus = next(e for e in load_entries("fa5s") if e.name == "minus")
    font_path = Icons(split="all").font_path
    x = torch.from_numpy(np.asarray(render_glyph(font_path, minus.char, 64))[..., 0].copy())
    ink = x < 250
    rows, cols = ink.any(1).nonzero().flatten(), ink.any(0).nonzero().flatten()
    assert cols[-1] - cols[0] + 1 in (51, 52) and rows[-1] - rows[0] + 1 <= 14  # a wide, thin bar
    assert abs((rows[0] + rows[-1]).item() / 2 - 31.5) <= 1  # centred by its ink, not by the font's em box
    big = render_glyph(font_path, minus.char, 128)
    assert big.size == (128, 128) and big.getpixel((64, 64)) == (0, 0, 0)
    assert IconEntry("minus", minus.char).caption == "an icon of a minus"


def test_missing_data_errors_name_the_install_script(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"no flag PNGs under .*scripts/install_data.sh"):
        Flags(root=tmp_path)
    with pytest.raises(FileNotFoundError, match=r"iso_3166-1.json.*is missing.*scripts/install_data.sh"):
        load_countries(tmp_path / "iso_3166-1.json")
    with pytest.raises(FileNotFoundError, match=r"fontawesome5-solid-webfont-5.15.4.ttf.*scripts/install_data.sh"):
        Icons(root=tmp_path)


def test_make_dataset_builds_flags_and_icons():
    assert {"flags", "icons"} <= set(DATASET_NAMES)
    flags = make_dataset(DataConfig(name="flags"))
    assert isinstance(flags, Flags) and len(flags) == 241
    assert make_dataset(DataConfig(name="flags"), "heldout").captions == FLAGS_TEST
    icons = make_dataset(DataConfig(name="icons", image_size=32))
    assert isinstance(icons, Icons) and len(icons) == 957 and icons[0]["image"].shape == (3, 32, 32)
    assert len(make_dataset(DataConfig(name="icons"), "heldout")) == 44
    with pytest.raises(ValueError, match=r"data.name must be one of .*'flags', 'icons'\), got 'logos'"):
        make_dataset(DataConfig(name="logos"))
