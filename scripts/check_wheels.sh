#!/usr/bin/env bash
# The two distributions as PyPI would get them: builds mmgen's wheel (the code) and mmgen-zoo's (the shipped
# models, zoo/pyproject.toml), checks each is under PyPI's 100 MB limit and that no file is stored twice (by
# sha256 across both wheels; the only repeats allowed are small text files every diffusers directory holds itself:
# configs, tokenizer JSON, the pipeline.py shim, under 64 KiB each, listed), then installs both into a bare target
# directory and runs `mmgen models` and `mmgen generate` from outside the checkout, checking that mmgen and the
# models are read from there and not from this repository. docs/results/packaging.md records the last run.
#
#   bash scripts/check_wheels.sh [OUT_DIR]      # default /tmp/mmgen-wheels; uses `python` of the active venv
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
OUT=${1:-/tmp/mmgen-wheels}
PY=${PYTHON:-python}
rm -rf "$OUT" && mkdir -p "$OUT/dist"
had_build=$([ -e build ] && echo 1 || echo 0)
"$PY" -m pip wheel . --no-deps -q -w "$OUT/dist" >"$OUT/build-mmgen.log" 2>&1 || { cat "$OUT/build-mmgen.log"; exit 1; }
[ "$had_build" = 1 ] || rm -rf build  # setuptools' staging directory, not ours to leave in the checkout
"$PY" -m pip wheel ./zoo --no-deps -q -w "$OUT/dist" >"$OUT/build-zoo.log" 2>&1 || { cat "$OUT/build-zoo.log"; exit 1; }
ls -l "$OUT"/dist/*.whl

"$PY" - "$OUT"/dist/*.whl <<'EOF'
import collections, hashlib, sys, zipfile
LIMIT, SMALL = 100 * 10**6, 64 * 1024
seen, ok = collections.defaultdict(list), True
for path in sys.argv[1:]:
    size = __import__("os").path.getsize(path)
    with zipfile.ZipFile(path) as z:
        infos = [i for i in z.infolist() if not i.is_dir()]
        stored = sum(i.file_size for i in infos)
        print(f"{path.rsplit('/', 1)[1]}: {size / 1e6:.1f} MB ({size / 2**20:.1f} MiB), {len(infos)} files, "
              f"{stored / 1e6:.1f} MB uncompressed, {'under' if size < LIMIT else 'OVER'} 100 MB")
        ok &= size < LIMIT
        for i in infos:
            if "/RECORD" not in i.filename:
                seen[hashlib.sha256(z.read(i)).hexdigest()].append((path.rsplit("/", 1)[1].split("-")[0], i.filename, i.file_size))
        for i in sorted(infos, key=lambda i: -i.file_size)[:12]:
            print(f"  {i.file_size:>10}  {i.filename}")
repeats = {h: v for h, v in seen.items() if len(v) > 1}
big = {h: v for h, v in repeats.items() if v[0][2] >= SMALL}
print(f"files stored more than once (by sha256, across both wheels): {len(repeats)} contents, "
      f"{sum(v[0][2] * (len(v) - 1) for v in repeats.values())} bytes repeated; of 64 KiB or more: {len(big)}")
for v in sorted(repeats.values(), key=lambda v: -v[0][2]):
    print(f"  {v[0][2]:>7} B x{len(v)}: {', '.join(f for _, f, _ in v)}")
ok &= not big
sys.exit(0 if ok else "FAILED: a wheel over 100 MB, or a file of 64 KiB or more stored twice")
EOF

"$PY" -m pip install -q --no-deps --target "$OUT/target" "$OUT"/dist/*.whl
cd /tmp  # outside the checkout: nothing may come from it
export PYTHONPATH="$OUT/target"
"$PY" - "$OUT/target" "$ROOT" <<'EOF'
import sys
from pathlib import Path
import mmgen, mmgen.zoo
from mmgen.pipelines import load_pipeline
target, root = Path(sys.argv[1]).resolve(), Path(sys.argv[2]).resolve()
for what, path in (("mmgen", Path(mmgen.__file__)), ("the zoo", mmgen.zoo.ZOO_DIR),
                   ("shapes-emoji", mmgen.zoo.resolve_model("shapes-emoji"))):
    path = path.resolve()
    assert target in path.parents and root not in path.parents, (what, path)
    print(f"{what}: {path}")
assert mmgen.zoo.ZOO_DIR == target / "mmgen_zoo" and not list((target / "mmgen" / "zoo").glob("*/model_index.json"))
pipe = load_pipeline("shapes-shuffle")  # the VQGAN it shares with shapes-emoji, through shared.json
from tokenizers_vis.shared import shared_source
print("shapes-shuffle loads; its vq_model is read from", shared_source(mmgen.zoo.resolve_model("shapes-shuffle") / "vq_model"))
EOF
echo "$ mmgen models    (PYTHONPATH=$OUT/target, cwd /tmp)"
"$PY" -m mmgen.cli models
echo "$ mmgen generate --model shapes-emoji"
"$PY" -m mmgen.cli generate "a red circle above a blue square" --model shapes-emoji --seed 0 --out "$OUT/emoji.png" --json
test -s "$OUT/emoji.png"
echo "check_wheels: OK"
