"""Country flags as a captioned image set: "the flag of France", "the flag of the Netherlands".

The images come from the Debian package `iso-flags-png-320x240` (one `<iso 3166-1 alpha-2>.png` per country
under /usr/share/iso-flags-png-320x240/, glossy rounded flags on a transparent 320x240 canvas), the names
from the Debian package `iso-codes` (/usr/share/iso-codes/json/iso_3166-1.json); `bash
scripts/install_data.sh` installs both. Items match `ShapesDataset`: {"image": float (3, S, S) in [-1, 1],
"caption": str}.

Of the 262 PNGs of iso-flags-png-320x240 1.0.2, 249 are ISO 3166-1 countries and are kept. The other 13 have
no country entry and are skipped (`Flags.skipped` lists them): regions and organisations with a leading
underscore (Basque Country, Catalonia, Galicia, Scotland, Wales, United Nations, Olympic, Earth, a generic
flag) and `brl`, `eo`, `eu`, `zz`.

Image: the transparent margin is cropped off (the flag's own bounding box, about 268x188 px, shadow
included), the flag is composited on white and letterboxed: scaled so its long side is S and centred on a
white S x S square (white bars above and below). Letterboxing, not a centre crop, because a flag's
identity often sits at its edges (the canton of the United States or Australia, the hoist triangle of
Czechia, Nepal's outline); the bars are the same on every image, so they cost the model nothing to
learn.

Caption: "the flag of <country>", with the iso-codes `common_name` where it has one ("Bolivia", not
"Bolivia, Plurinational State of"), parenthesised parts dropped ("Holy See"), inverted names turned round
("Virgin Islands, British" -> "British Virgin Islands"; a comma list such as "Bonaire, Sint Eustatius and
Saba" stays), and "the" before names that take it ("the United Kingdom", "the Bahamas").

Split: a country is in "test" when the SHA-256 of its name falls in the lowest 5% (`mmgen.data.entries`) of the range
(as for Twemoji), else in "train"; "all" keeps both.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from mmgen.data.entries import EntryDataset, in_test_split as hashed_test_split
from mmgen.data.shapes import to_tensor

SPLITS: tuple[str, ...] = ("train", "test", "all")

DEFAULT_ROOT = Path("/usr/share/iso-flags-png-320x240")
ISO_3166_JSON = Path("/usr/share/iso-codes/json/iso_3166-1.json")
INSTALL_HINT = "install it with `bash scripts/install_data.sh` (Debian packages iso-flags-png-320x240, iso-codes)"
# Last words of names that are said with "the" (plurals, unions, "Republic" as a noun); an explicit list,
# since plural-looking names such as "Barbados" or "Mauritius" take none.
_THE_BEFORE_LAST_WORD = frozenset({"Islands", "Emirates", "Territories", "Republic", "Kingdom", "States",
                                   "Federation", "Netherlands", "Bahamas", "Philippines", "Maldives", "Comoros",
                                   "Seychelles", "Gambia", "See"})


def country_name(record: dict) -> str:
    """An iso-codes ISO 3166-1 record -> the name as a caption says it (see the module docstring)."""
    name = re.sub(r"\s*\([^)]*\)", "", record.get("common_name") or record["name"]).strip()
    head, sep, tail = name.partition(", ")
    if sep and " and " not in tail:  # "Congo, The Democratic Republic of the" -> "... of the Congo"
        name = f"{tail} {head}"
    if name.startswith("The "):
        return "t" + name[1:]
    if " the " not in f" {name} " and name.split()[-1] in _THE_BEFORE_LAST_WORD:
        return f"the {name}"
    return name


def in_test_split(name: str) -> bool:
    return hashed_test_split("flags", name)


def load_countries(path: str | Path = ISO_3166_JSON) -> dict[str, str]:
    """Lower-case alpha-2 code -> caption name, for every ISO 3166-1 country in the iso-codes JSON."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"ISO 3166-1 country list {str(path)!r} is missing; {INSTALL_HINT}")
    records = json.loads(path.read_text(encoding="utf-8"))["3166-1"]
    return {r["alpha_2"].lower(): country_name(r) for r in records}


def letterbox(image: Image.Image, size: int, fill: tuple[int, int, int] = (255, 255, 255)) -> Image.Image:
    """Scale `image` so its long side is `size` (bicubic, antialiased by PIL) and centre it on a square."""
    scale = size / max(image.size)
    w, h = max(1, round(image.width * scale)), max(1, round(image.height * scale))
    canvas = Image.new("RGB", (size, size), fill)
    canvas.paste(image.convert("RGB").resize((w, h), Image.Resampling.BICUBIC), ((size - w) // 2, (size - h) // 2))
    return canvas


@dataclass(frozen=True)
class FlagEntry:
    code: str  # lower-case ISO 3166-1 alpha-2, also the file stem
    country: str

    @property
    def caption(self) -> str:
        return f"the flag of {self.country}"


class Flags(EntryDataset):
    """Captioned country flags; item i is {"image": (3, S, S) float in [-1, 1], "caption": str}."""

    def __init__(self, image_size: int = 64, split: str = "train", root: str | Path | None = None):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if not isinstance(image_size, int) or image_size < 1:
            raise ValueError(f"image_size must be an integer >= 1, got {image_size!r}")
        self.root = Path(root) if root is not None else DEFAULT_ROOT
        files = sorted(self.root.glob("*.png"))
        if not files:
            raise FileNotFoundError(f"no flag PNGs under {str(self.root)!r}; {INSTALL_HINT}")
        countries = load_countries()
        self.skipped = [f.stem for f in files if f.stem not in countries]
        self.entries = [FlagEntry(f.stem, countries[f.stem]) for f in files if f.stem in countries
                        and (split == "all" or in_test_split(countries[f.stem]) == (split == "test"))]
        self.image_size, self.split = image_size, split

    def __getitem__(self, i: int) -> dict:
        entry = self.entries[i]
        with Image.open(self.root / f"{entry.code}.png") as img:
            rgba = img.convert("RGBA")
        rgba = rgba.crop(rgba.getchannel("A").getbbox())  # the flag without its transparent margin
        rgb = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        return {"image": to_tensor(letterbox(rgb, self.image_size)), "caption": entry.caption}
