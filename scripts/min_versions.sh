#!/usr/bin/env bash
# The declared lower bounds, actually installed and tested: a fresh virtual environment gets every direct
# dependency of pyproject.toml at the lowest version its bound allows (uv's `--resolution lowest-direct`; the
# indirect ones resolve as a user's would), mmgen itself, and a fast subset of the tests (layers, protocols,
# pipelines and CLI, checkpoints, training switches, LlamaGen parity, Janus through transformers). Run it after
# changing a bound; docs/results/packaging.md records the last run.
#
#   bash scripts/min_versions.sh [VENV_DIR]      # default /tmp/mmgen-minver
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-/tmp/mmgen-minver}
python3 -m venv "$VENV"
. "$VENV/bin/activate"
pip install -q uv
uv pip compile -q pyproject.toml --resolution lowest-direct --python-version "$(python -c 'import sys; print(f"{sys.version_info[0]}.{sys.version_info[1]}")')" \
  -o "$VENV/minimums.txt"
uv pip install -q -r "$VENV/minimums.txt" "pytest>=7"
uv pip install -q --no-deps -e .
echo "the direct dependencies as installed:"
uv pip list 2>/dev/null | grep -iE "^(torch|torchvision|diffusers|transformers|accelerate|tokenizers|safetensors|torchmetrics|pyyaml|tqdm|pillow|numpy) "
# deselected: the seeded (not greedy) LlamaGen parity draws, recorded with the tested torch; torch.multinomial's
# stream differs between torch releases (greedy parity, which does not depend on it, runs)
python -m pytest -q -p no:cacheprovider tests/test_layers.py tests/test_protocols.py tests/test_pipeline_cli.py \
  tests/test_config_checkpoint.py tests/test_training_features.py tests/test_llamagen.py tests/test_janus.py \
  -k "not sampled"
