"""Named icons: glyphs of the Font Awesome icon fonts drawn black on white, captioned by their names.

The fonts and their name maps (`<font>-charmap-<version>.json`: icon name -> code point, hex) come from the
PyPI wheel of qtawesome (pinned in `scripts/install_data.sh`, which `pip download`s the wheel and unzips only
its `fonts/` folder and license into `${MMGEN_DATA:-~/.cache/mmgen}/qtawesome/`). qtawesome itself is never
installed or imported (it needs Qt); Pillow's FreeType binding draws the glyphs. Font Awesome Free's fonts
are under the SIL Open Font License 1.1.

Icon sets, by qtawesome's prefix:
- "fa5s" (default): Font Awesome 5.15.4 solid, 1001 icons ("arrow-up", "user-md", "hourglass-half").
- "fa6s": Font Awesome 6.7.2 solid, 1401 icons (renamed and extended; also "a".."z" and "0".."9").
A name map entry whose glyph draws nothing or draws the font's missing-glyph box is skipped (fa5s:
"font-awesome-logo-full"; fa6s: "notdef").

Image: the glyph's ink box (`ImageFont.getbbox`) is scaled so its long side fills S - 2 * margin, with a
margin of `MARGIN` (10%) of S on each side, and the box is centred on a white S x S square, so every icon
has the same scale and position however the font places it in its em square. Items match
`ShapesDataset`: {"image": float (3, S, S) in [-1, 1], "caption": str}.

Caption: "an icon of a <name words>": "fa5s.arrow-up" -> "an icon of an arrow up". Single letters and digits
say what they are ("an icon of the letter A", "an icon of the number 8"). The article follows the sound of
the first word: "a user", "a universal access", "an hdd", "an x ray" (see `article`).

Split: an icon is in "test" when the SHA-256 of its name words falls in the lowest 5% of the
range (as for Twemoji), else in "train"; "all" keeps both. The font prefix is not hashed, so an icon name
that both sets hold is on the same side in each.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

from mmgen.data.entries import EntryDataset, in_test_split as hashed_test_split
from mmgen.data.shapes import to_tensor

SPLITS: tuple[str, ...] = ("train", "test", "all")

MARGIN = 0.1  # of the image side, on each side of the glyph
INSTALL_HINT = "install it with `bash scripts/install_data.sh` (font files of the PyPI wheel qtawesome)"
# prefix -> (font file, name map) under <root>/fonts/, as named in the pinned qtawesome wheel
FONTS: dict[str, tuple[str, str]] = {
    "fa5s": ("fontawesome5-solid-webfont-5.15.4.ttf", "fontawesome5-solid-webfont-charmap-5.15.4.json"),
    "fa6s": ("fontawesome6-solid-webfont-6.7.2.ttf", "fontawesome6-solid-webfont-charmap-6.7.2.json"),
}
_REFERENCE_SIZE = 256  # font size (px) at which a glyph is measured to estimate its fitting size
_CHECK_SIZE = 32  # font size (px) at which the name map entries are checked to draw a glyph
_VOWEL_SOUND_LETTERS = set("aefhilmnorsx")  # letters whose spoken name starts with a vowel ("an x")
# Spelling-based exceptions: a vowel letter sounding "y"/"w" ("a user"), a silent "h" ("an hour").
_A_BEFORE = ("uni", "us", "ut", "eu", "one")
_AN_BEFORE = ("hour", "honest")


def default_root() -> Path:
    return Path(os.environ.get("MMGEN_DATA") or Path.home() / ".cache" / "mmgen") / "qtawesome"


def article(words: str) -> str:
    """ "a" or "an" before lower-case `words`, by the sound of the first word."""
    first = words.split()[0]
    if first.isdigit():  # eight, eleven, eighteen, eighty...
        return "an" if first.startswith("8") or first in ("11", "18") else "a"
    if len(first) == 1 or not re.search(r"[aeiouy]", first):  # a letter or an initialism ("hdd"): said letter by letter
        return "an" if first[0] in _VOWEL_SOUND_LETTERS else "a"
    if first.startswith(_AN_BEFORE):
        return "an"
    return "an" if first[0] in "aeiou" and not first.startswith(_A_BEFORE) else "a"


def icon_words(name: str) -> str:
    """Name map key -> caption words: "arrow-up" -> "arrow up"; "a" -> "the letter A"; "8" -> "the number 8"."""
    words = name.replace("-", " ")
    if re.fullmatch(r"[a-z]", words):
        return f"the letter {words.upper()}"
    if re.fullmatch(r"[0-9]+", words):
        return f"the number {words}"
    return words


def in_test_split(words: str) -> bool:
    return hashed_test_split("icons", words)


@dataclass(frozen=True)
class IconEntry:
    name: str  # the name map key, e.g. "arrow-up"
    char: str  # the glyph's character

    @property
    def caption(self) -> str:
        words = icon_words(self.name)
        if words.startswith("the "):
            return f"an icon of {words}"
        return f"an icon of {article(words)} {words}"


@lru_cache(maxsize=64)
def _font(path: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(path, size)


def ink_box(font: ImageFont.FreeTypeFont, char: str) -> tuple[int, int, int, int] | None:
    """The box of the pixels `char` draws, relative to the text origin; None when it draws none. (`getbbox`
    spans the advance width and reaches down to the baseline, so it does not bound the ink of an icon.)"""
    mask, (dx, dy) = font.getmask2(char)
    box = mask.getbbox()
    return None if box is None else (dx + box[0], dy + box[1], dx + box[2], dy + box[3])


def glyph_size(font_path: str | Path, char: str, box: int) -> int:
    """The largest font size at which `char`'s ink fits in box x box pixels."""
    left, top, right, bottom = ink_box(_font(str(font_path), _REFERENCE_SIZE), char)
    size = max(1, int(_REFERENCE_SIZE * box / max(right - left, bottom - top)))
    # Hinting and pixel rounding can make the ink at the scaled size a pixel larger than the linear estimate.
    while size > 1:
        left, top, right, bottom = ink_box(_font(str(font_path), size), char)
        if max(right - left, bottom - top) <= box:
            break
        size -= 1
    return size


def render_glyph(font_path: str | Path, char: str, image_size: int) -> Image.Image:
    """`char` black on a white image_size x image_size RGB square, its ink scaled to fit and centred."""
    margin = max(1, round(MARGIN * image_size))
    font = _font(str(font_path), glyph_size(font_path, char, image_size - 2 * margin))
    left, top, right, bottom = ink_box(font, char)
    image = Image.new("L", (image_size, image_size), 255)
    origin = ((image_size - (right - left)) // 2 - left, (image_size - (bottom - top)) // 2 - top)
    ImageDraw.Draw(image).text(origin, char, font=font, fill=0)
    return image.convert("RGB")


def font_files(font: str, root: str | Path | None = None) -> tuple[Path, Path]:
    """(font file, name map) of `font` under `root`, checked to exist."""
    if font not in FONTS:
        raise ValueError(f"font must be one of {tuple(FONTS)}, got {font!r}")
    fonts_dir = (Path(root) if root is not None else default_root()) / "fonts"
    paths = tuple(fonts_dir / f for f in FONTS[font])
    for p in paths:
        if not p.is_file():
            raise FileNotFoundError(f"icon font file {str(p)!r} is missing; {INSTALL_HINT}")
    return paths


def load_entries(font: str = "fa5s", root: str | Path | None = None, split: str = "all") -> list[IconEntry]:
    """The drawable icons of `font` in `split`, in name map order (alphabetical)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    font_path, charmap_path = font_files(font, root)
    charmap = json.loads(charmap_path.read_text(encoding="utf-8"))
    check = _font(str(font_path), _CHECK_SIZE)
    missing_box = bytes(check.getmask("\U0010fffd"))  # a private-use code point no icon font maps
    entries = []
    for name, code in charmap.items():
        char = chr(int(code, 16))
        mask = check.getmask(char)
        if mask.getbbox() is None or bytes(mask) == missing_box:
            continue
        if split == "all" or in_test_split(icon_words(name)) == (split == "test"):
            entries.append(IconEntry(name, char))
    return entries


class Icons(EntryDataset):
    """Captioned icon glyphs of one font; item i is {"image": (3, S, S) float in [-1, 1], "caption": str}."""

    def __init__(self, image_size: int = 64, font: str = "fa5s", split: str = "train",
                 root: str | Path | None = None):
        if not isinstance(image_size, int) or image_size < 8:
            # Below 8 px the 10% margin rounds to the 1 px minimum and the glyph to a few pixels.
            raise ValueError(f"image_size must be an integer >= 8, got {image_size!r}")
        self.root = Path(root) if root is not None else default_root()
        self.entries = load_entries(font, self.root, split)
        self.font_path = font_files(font, self.root)[0]
        self.image_size, self.font, self.split = image_size, font, split

    def __getitem__(self, i: int) -> dict:
        entry = self.entries[i]
        return {"image": to_tensor(render_glyph(self.font_path, entry.char, self.image_size)),
                "caption": entry.caption}
