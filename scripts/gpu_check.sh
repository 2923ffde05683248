#!/usr/bin/env bash
# One GPU for at most 8 minutes, one call, one JSON report:
#   bash scripts/gpu_check.sh [--device DEV] [REPORT.json]    (default REPORT.json: $OUT/gpu_check.json)
# 1. the device tests (tests/test_device.py: compiled AR step / CUDA graphs, compiled SJD window step, seeds, bf16)
# 2. the sjd and decode suites on the default model: eager and compiled AR, the exact SJD chain modes, batch 1/8/32
# 3. a verify pass's time against its window width on a random decoder of Janus-Pro-1B's shape
# 4. bf16 (and fp32) training throughput of the default model's config
# Each step has a time budget (exit status 124 in the report when it ran out; its partial JSON is kept).
# --device cpu: a dry run of every step at toy sizes, compilation off, no GPU needed (tests/test_bench.py runs it).
set -uo pipefail
cd "$(dirname "$0")/.."

device=cuda
report=""
while [ $# -gt 0 ]; do
    case "$1" in
        --device) device="$2"; shift 2 ;;
        -h|--help) sed -n '2,10p' "$0"; exit 0 ;;
        -*) echo "gpu_check.sh: unknown option $1" >&2; exit 2 ;;
        *) report="$1"; shift ;;
    esac
done
if [ -z "$report" ]; then
    [ -n "${OUT:-}" ] || { echo "gpu_check.sh: give REPORT.json, or set \$OUT" >&2; exit 2; }
    report="$OUT/gpu_check.json"
fi
[ -f .venv/bin/activate ] && . .venv/bin/activate

parts=$(mktemp -d)
trap 'rm -rf "$parts"' EXIT
tiny=()
budgets=(100 260 60 50)  # seconds: tests, suites, pass time, training (8 minutes with start-up to spare)
if [ "$device" = cpu ]; then
    tiny=(--tiny)
    export TORCH_COMPILE_DISABLE=1  # the dry run checks the plumbing; compiled values are tests/test_compiled_decode.py's
    budgets=(300 300 120 120)
fi

step() {  # step NAME BUDGET COMMAND...: run it under its budget, log "NAME STATUS SECONDS"
    local name=$1 budget=$2 t0=$SECONDS status
    shift 2
    echo "gpu_check: $name (at most ${budget}s)" >&2
    timeout "$budget" "$@" > "$parts/$name.log" 2>&1
    status=$?
    echo "$name $status $((SECONDS - t0))" >> "$parts/steps.txt"
    [ "$status" = 0 ] || tail -5 "$parts/$name.log" >&2
}

step tests "${budgets[0]}" env MMGEN_TEST_DEVICE="$device" python -m pytest -q -p no:cacheprovider \
    tests/test_device.py --junitxml="$parts/tests.xml"
step suites "${budgets[1]}" python -m mmgen.bench.device suites "$parts/suites.json" --device "$device" "${tiny[@]}"
step pass_time "${budgets[2]}" python -m mmgen.bench.device pass-time "$parts/pass_time.json" --device "$device" \
    "${tiny[@]}"
step train "${budgets[3]}" python -m mmgen.bench.device train "$parts/train.json" --device "$device" "${tiny[@]}"
mkdir -p "$(dirname "$report")"
python -m mmgen.bench.device report "$parts" > "$report" && echo "gpu_check: report in $report" >&2
