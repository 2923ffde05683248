#!/usr/bin/env bash
# Install the real data sets mmgen trains on offline (idempotent: a second run only checks).
#   Fashion-MNIST: Debian package dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist/*.gz (idx files)
#   Twemoji 64x64: npm package emoji-datasource-twitter (CC-BY 4.0 images) -> emoji.json + img/twitter/64/*.png
#                  under ${MMGEN_DATA:-$HOME/.cache/mmgen}/emoji-datasource-twitter/
#   Flags:         Debian packages iso-flags-png-320x240 (PNGs) and iso-codes (country names, JSON)
#   Named icons:   the font files + name maps (charmap JSON) of the PyPI wheel qtawesome, fetched with
#                  `pip download` and unzipped (never installed: qtawesome needs Qt) into
#                  ${MMGEN_DATA:-$HOME/.cache/mmgen}/qtawesome/
set -euo pipefail

EMOJI_VERSION=16.0.0  # pinned: the image set and names, hence the held-out split, must not drift
QTAWESOME_VERSION=1.4.2  # pinned for the same reason (the icon names)
DATA_DIR="${MMGEN_DATA:-$HOME/.cache/mmgen}"
EMOJI_DIR="$DATA_DIR/emoji-datasource-twitter"
FONTS_DIR="$DATA_DIR/qtawesome"

# --- Fashion-MNIST, flags, country names (Debian) ---
for pkg in dataset-fashion-mnist iso-flags-png-320x240 iso-codes; do
    if dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed"; then
        echo "$pkg: already installed"
        continue
    fi
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    # Refresh the package lists only when apt does not know the package yet (a fresh container).
    if ! apt-cache show "$pkg" >/dev/null 2>&1; then
        $SUDO apt-get update -q
    fi
    # Wait for a concurrent apt/dpkg run to release its lock instead of failing at once.
    $SUDO apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 "$pkg"
done

# --- Twemoji (npm) ---
if [ -f "$EMOJI_DIR/VERSION" ] && [ "$(cat "$EMOJI_DIR/VERSION")" = "$EMOJI_VERSION" ] \
        && [ -f "$EMOJI_DIR/emoji.json" ] && [ -d "$EMOJI_DIR/img/twitter/64" ]; then
    echo "emoji-datasource-twitter@$EMOJI_VERSION: already in $EMOJI_DIR"
else
    command -v npm >/dev/null || { echo "error: npm is needed to fetch emoji-datasource-twitter" >&2; exit 1; }
    mkdir -p "$DATA_DIR"
    tmp="$(mktemp -d "$DATA_DIR/.emoji-XXXXXX")"
    trap 'rm -rf "$tmp"' EXIT
    (cd "$tmp" && npm pack --silent "emoji-datasource-twitter@$EMOJI_VERSION" >/dev/null)
    # Keep only the index, the 64 px images and the license (the package also holds sprite sheets).
    tar -xzf "$tmp"/emoji-datasource-twitter-*.tgz -C "$tmp" \
        package/emoji.json package/LICENSE package/img/twitter/64
    echo "$EMOJI_VERSION" > "$tmp/package/VERSION"
    rm -rf "$EMOJI_DIR"
    mv "$tmp/package" "$EMOJI_DIR"  # the directory appears complete or not at all
    echo "emoji-datasource-twitter@$EMOJI_VERSION: installed $(ls "$EMOJI_DIR/img/twitter/64" | wc -l) images in $EMOJI_DIR"
fi

# --- Named icons (qtawesome's fonts, PyPI) ---
if [ -f "$FONTS_DIR/VERSION" ] && [ "$(cat "$FONTS_DIR/VERSION")" = "$QTAWESOME_VERSION" ] \
        && compgen -G "$FONTS_DIR/fonts/*-charmap-*.json" >/dev/null; then
    echo "qtawesome@$QTAWESOME_VERSION fonts: already in $FONTS_DIR"
else
    mkdir -p "$DATA_DIR"
    fonts_tmp="$(mktemp -d "$DATA_DIR/.qtawesome-XXXXXX")"
    trap 'rm -rf "${tmp:-}" "$fonts_tmp"' EXIT  # also the Twemoji temp dir, whose trap this replaces
    python3 -m pip download -q --no-deps --only-binary=:all: -d "$fonts_tmp" "qtawesome==$QTAWESOME_VERSION"
    # Only the fonts, their charmaps and the license leave the wheel (Python's zipfile: no unzip needed).
    python3 - "$fonts_tmp" <<'PY'
import sys, zipfile
from pathlib import Path

tmp = Path(sys.argv[1])
out = tmp / "qtawesome"
with zipfile.ZipFile(next(tmp.glob("qtawesome-*.whl"))) as wheel:
    for name in wheel.namelist():
        if name.startswith("qtawesome/fonts/") or name.endswith("/LICENSE.txt"):
            target = out / ("fonts" if name.startswith("qtawesome/fonts/") else "") / Path(name).name
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_bytes(wheel.read(name))
PY
    echo "$QTAWESOME_VERSION" > "$fonts_tmp/qtawesome/VERSION"
    rm -rf "$FONTS_DIR"
    mv "$fonts_tmp/qtawesome" "$FONTS_DIR"  # the directory appears complete or not at all
    echo "qtawesome@$QTAWESOME_VERSION fonts: installed $(ls "$FONTS_DIR"/fonts/*.ttf | wc -l) fonts in $FONTS_DIR"
fi
