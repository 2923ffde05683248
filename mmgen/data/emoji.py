"""Twemoji 64x64 (Twitter's emoji set, CC-BY 4.0) with captions from the emoji's Unicode/CLDR name.

The images and their index come from the npm package `emoji-datasource-twitter` (pinned in
`scripts/install_data.sh`, which unpacks `emoji.json` and `img/twitter/64/*.png` into
`${MMGEN_DATA:-~/.cache/mmgen}/emoji-datasource-twitter/`). Items match `ShapesDataset`:
{"image": float (3, S, S) in [-1, 1], "caption": str}; the RGBA images are composited on white.

Caption template: "a {name} emoji", e.g. "a grinning face emoji", "an aries emoji", "a jordan flag emoji".
The name is the index's `name` lower-cased, with the CLDR colon dropped ("man: red hair" -> "man red hair")
and the typographic apostrophe made plain. The article goes with "emoji", not with the name, because many
names are plurals or lists ("sparkles", "family: man, girl") that take no article of their own.

Which entries are kept:
- Flags (category "Flags", 270 country and region flags) only with `include_flags=True`: they are a
  separate, much more uniform family (rectangles of stripes) that would crowd out the pictograms.
- `named_only=True` keeps the "named icons": base emoji whose name says what the picture shows. It drops
  the five skin-tone swatches (category "Component", named "emoji modifier fitzpatrick type-3"), the
  squared CJK ideographs (named by a code point, "squared cjk unified ideograph-7121") and the skin-tone
  variants. `named_only=False` keeps all of them; a variant's caption adds its tone(s):
  "a thumbs up sign emoji, medium-dark skin tone".

Split: an entry is in "test" when the SHA-256 of its caption name falls in the lowest 5% of the
range, else in "train" ("all" keeps both). Hashing the name, not the position, keeps the split fixed when
options add or drop other entries, and keeps an emoji's skin-tone variants (and two emoji that share a name)
on one side, so no test caption is ever seen in training.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmgen.data.folder import resize_center_crop
from mmgen.data.entries import EntryDataset, in_test_split as hashed_test_split
from mmgen.data.shapes import to_tensor

SPLITS: tuple[str, ...] = ("train", "test", "all")

INSTALL_HINT = "install it with `bash scripts/install_data.sh` (npm package emoji-datasource-twitter)"
SKIN_TONES: dict[str, str] = {"1F3FB": "light", "1F3FC": "medium-light", "1F3FD": "medium",
                              "1F3FE": "medium-dark", "1F3FF": "dark"}
_CODE_POINT_NAME = re.compile(r"-[0-9A-F]{4,6}$")  # "SQUARED CJK UNIFIED IDEOGRAPH-7121"
# Spelling-based article exceptions met in the names: a vowel letter sounding "y"/"w", a silent "h".
_A_BEFORE = ("one", "uni", "u.", "uga", "ukr", "uru", "eu")
_AN_BEFORE = ("hour", "honest")


def article(name: str) -> str:
    """ "a" or "an" for a lower-case name, by its spelling plus the exceptions the emoji names contain."""
    if name.startswith(_AN_BEFORE):
        return "an"
    return "an" if name[0] in "aeiou" and not name.startswith(_A_BEFORE) else "a"


def default_root() -> Path:
    return Path(os.environ.get("MMGEN_DATA") or Path.home() / ".cache" / "mmgen") / "emoji-datasource-twitter"


@dataclass(frozen=True)
class EmojiEntry:
    name: str  # cleaned, lower-case; the caption is built from it
    image: str  # file name under img/twitter/64/
    category: str
    skin_tone: str | None = None  # "medium-dark", "light and dark" (two people), None for a base emoji

    @property
    def caption(self) -> str:
        base = f"{article(self.name)} {self.name} emoji"
        if self.skin_tone is None:
            return base
        return f"{base}, {self.skin_tone} skin tone{'s' if ' and ' in self.skin_tone else ''}"


def clean_name(raw: str) -> str:
    """Index name -> caption name: lower case, no CLDR colon, plain apostrophe, single spaces."""
    name = raw.lower().replace("\u2019", "'").replace(":", " ")
    return " ".join(name.split())


def _tone_words(key: str) -> str:
    tones = [SKIN_TONES[k] for k in key.split("-")]
    # One tone for both people of a pair reads as one tone.
    return tones[0] if len(set(tones)) == 1 else " and ".join(tones)


def is_named(record: dict) -> bool:
    """Does the index record name what its picture shows (see the module docstring)?"""
    return record["category"] != "Component" and not _CODE_POINT_NAME.search(record["name"])


def in_test_split(name: str) -> bool:
    return hashed_test_split("twemoji", name)


def load_entries(root: str | Path | None = None, include_flags: bool = False, named_only: bool = True,
                 split: str = "all") -> list[EmojiEntry]:
    """The kept entries of `split`, in the index's sort order (variants right after their base emoji)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    root = Path(root) if root is not None else default_root()
    index = root / "emoji.json"
    if not index.is_file():
        raise FileNotFoundError(f"Twemoji index {str(index)!r} is missing; {INSTALL_HINT}")
    records = sorted(json.loads(index.read_text(encoding="utf-8")), key=lambda r: r["sort_order"])
    entries = []
    for r in records:
        if not r.get("has_img_twitter") or (r["category"] == "Flags" and not include_flags):
            continue
        if named_only and not is_named(r):
            continue
        name = clean_name(r["name"])
        if split != "all" and in_test_split(name) != (split == "test"):
            continue
        entries.append(EmojiEntry(name, r["image"], r["category"]))
        if not named_only:
            for key, var in (r.get("skin_variations") or {}).items():
                if var.get("has_img_twitter"):
                    entries.append(EmojiEntry(name, var["image"], r["category"], _tone_words(key)))
    return entries


class Twemoji(EntryDataset):
    """Captioned Twemoji images; item i is {"image": (3, S, S) float in [-1, 1], "caption": str}."""

    def __init__(self, image_size: int = 64, include_flags: bool = False, named_only: bool = True,
                 split: str = "train", root: str | Path | None = None):
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
        self.root = Path(root) if root is not None else default_root()
        self.entries = load_entries(self.root, include_flags, named_only, split)
        self.image_dir = self.root / "img" / "twitter" / "64"
        # Checked up front, so an interrupted install fails here and not in the middle of training.
        missing = [e.image for e in self.entries if not (self.image_dir / e.image).is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} Twemoji image(s) missing under {str(self.image_dir)!r} "
                                    f"(first: {missing[0]!r}); {INSTALL_HINT}")
        self.image_size, self.include_flags, self.named_only, self.split = image_size, include_flags, named_only, split

    def __getitem__(self, i: int) -> dict:
        entry = self.entries[i]
        with Image.open(self.image_dir / entry.image) as img:
            rgba = img.convert("RGBA")
        white = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        rgb = Image.alpha_composite(white, rgba).convert("RGB")
        if rgb.size != (self.image_size, self.image_size):
            rgb = resize_center_crop(rgb, self.image_size)
        return {"image": to_tensor(rgb), "caption": entry.caption}
