#!/usr/bin/env bash
# The GPU checks of docs/gpu.md in one command, for a machine with a CUDA device and the project's Python
# dependencies (diffusers for the comparison): the CUDA-only tests, then the bench, results in OUT_DIR.
#   tools/gpu_check.sh OUT_DIR [BUDGET_SECONDS] [PHASES]   (PHASES: comma-separated, see bench --phases)
# Every step is bounded and none stops the next: the tests by GPU_TESTS_TIMEOUT (default 300 s; SIGINT first, so
# pytest still prints its summary), the bench by BUDGET_SECONDS + BENCH_GRACE (default 120 s; its JSON is
# rewritten after every phase, so a run cut short keeps what it measured). OUT_DIR/gpu_check_status.txt gets one
# line per step with its exit status and seconds (124: its time ran out), written as the steps end.
set -uo pipefail
out=${1:?usage: tools/gpu_check.sh OUT_DIR [BUDGET_SECONDS] [PHASES]}
budget=${2:-420}
phases=${3:-}
mkdir -p "$out"
out=$(cd "$out" && pwd)
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
status="$out/gpu_check_status.txt"
: >"$status"
worst=0
step() {  # step NAME SECONDS_STARTED EXIT_STATUS
    echo "$1 rc=$3 seconds=$(($(date +%s) - $2))" | tee -a "$status"
    [ "$3" = 0 ] || worst=1
}
case "$budget" in '' | *[!0-9]*) echo "BUDGET_SECONDS must be a whole number of seconds, got '$budget'" | tee -a "$status"; exit 2 ;; esac
t=$(date +%s)
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.__version__, torch.cuda.get_device_name())" \
    2>&1 | tail -3 | tee "$out/device.txt"
rc=$?
step device "$t" "$rc"
[ "$rc" = 0 ] || exit 2
# diffusers (the comparison engine) is not in the device image: carried as a wheel under .whl/ (an ignored path:
# the run tool's carry list names it). Without it the bench's diffusers phases fail in one line each; the rest runs.
if ! "$py" -c "import diffusers" 2>/dev/null; then
    t=$(date +%s)
    wheel=$(ls .whl/diffusers-*.whl 2>/dev/null | head -1)
    if [ -n "$wheel" ]; then
        "$py" -m pip install -q --no-deps "$wheel" 2>&1 | tail -3
        rc=$?
    else
        echo "diffusers missing and no .whl/diffusers-*.whl to install: the diffusers phases will fail"
        rc=1
    fi
    step install_diffusers "$t" "$rc"
fi
# The bench's model folder (SD 1.5's architecture, random fp16 weights; reused when there, written whole or not at
# all) is CPU work: written in the background while the GPU tests run, waited for before the bench.
workdir=/tmp/sdengine-gpu-check
t_folder=$(date +%s)
"$py" -c "import sys; from sdengine.bench import make_random_folder; make_random_folder(sys.argv[1], 'sd15', dtype='fp16')" \
    "$workdir/random-sd15-fp16" >"$out/model_folder.log" 2>&1 &
folder_pid=$!
# The tests that only run on a GPU (marked `cuda`: CUDA graphs, the whole loop and ControlNet steps recorded for
# real, AOT packages and fp8 on the device, masked attention off cuDNN, previews on the device). Only those: the
# CPU tests need the shipped models (which a device copy may leave out) and this project's torch. Only the files
# that have such tests are collected: the others may import what a GPU machine's image lacks (the server's stack).
# -v: one line per test as it ends, so a log cut short still says which passed; faulthandler_timeout: the stacks
# of a test that hangs.
if [ "${GPU_TESTS_TIMEOUT:-300}" != 0 ]; then
    t=$(date +%s)
    SDENGINE_GPU_OUT="$out" timeout -s INT -k 15 "${GPU_TESTS_TIMEOUT:-300}" "$py" -m pytest -v -rfE -p no:cacheprovider \
        -o faulthandler_timeout=150 --durations=10 -m cuda $(grep -l "pytest.mark.cuda" tests/test_*.py) \
        >"$out/gpu_tests.log" 2>&1
    rc=$?
    grep -E "(PASSED|FAILED|ERROR|SKIPPED)( |$)|^(FAILED|ERROR) |passed|failed|Timeout" "$out/gpu_tests.log" | tail -25
    step gpu_tests "$t" "$rc"
fi
wait "$folder_pid"
rc=$?
tail -3 "$out/model_folder.log"
step model_folder "$t_folder" "$rc"
t=$(date +%s)
timeout -k 15 $((budget + ${BENCH_GRACE:-120})) "$py" -m sdengine bench --random sd15 --workdir "$workdir" \
    --device cuda --compare diffusers --out "$out" --budget-s "$budget" ${phases:+--phases "$phases"} 2>&1 |
    grep --line-buffered -v "Loading" | tee "$out/bench.log"
rc=${PIPESTATUS[0]}
step bench "$t" "$rc"
exit "$worst"  # 1 when a step failed (gpu_check_status.txt says which); the bench's own phase errors are in its JSON
