#!/usr/bin/env bash
# Install the real data sets mmgen trains on offline (idempotent: a second run only checks).
#   Fashion-MNIST: Debian package dataset-fashion-mnist -> /usr/share/datasets/fashion-mnist/*.gz (idx files)
#   Twemoji 64x64: npm package emoji-datasource-twitter (CC-BY 4.0 images) -> emoji.json + img/twitter/64/*.png
#                  under ${MMGEN_DATA:-$HOME/.cache/mmgen}/emoji-datasource-twitter/
set -euo pipefail

EMOJI_VERSION=16.0.0  # pinned: the image set and names, hence the held-out split, must not drift
DATA_DIR="${MMGEN_DATA:-$HOME/.cache/mmgen}"
EMOJI_DIR="$DATA_DIR/emoji-datasource-twitter"

# --- Fashion-MNIST (Debian) ---
if dpkg-query -W -f='${Status}' dataset-fashion-mnist 2>/dev/null | grep -q "install ok installed"; then
    echo "dataset-fashion-mnist: already installed"
else
    SUDO=""
    if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
    # Refresh the package lists only when apt does not know the package yet (a fresh container).
    if ! apt-cache show dataset-fashion-mnist >/dev/null 2>&1; then
        $SUDO apt-get update -q
    fi
    # Wait for a concurrent apt/dpkg run to release its lock instead of failing at once.
    $SUDO apt-get install -y -q --no-install-recommends -o DPkg::Lock::Timeout=600 dataset-fashion-mnist
fi

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
