#!/usr/bin/env bash
# The GPU checks of docs/gpu.md in one command, for a machine with a CUDA device and the project's Python
# dependencies (diffusers for the comparison): the CUDA-only tests, then the bench, results in OUT_DIR.
#   tools/gpu_check.sh OUT_DIR [BUDGET_SECONDS] [PHASES]   (PHASES: comma-separated, see bench --phases)
set -uo pipefail
out=${1:?usage: tools/gpu_check.sh OUT_DIR [BUDGET_SECONDS]}
budget=${2:-420}
phases=${3:-}
mkdir -p "$out"
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
py=${PYTHON:-python3}
"$py" -c "import torch; assert torch.cuda.is_available(), 'no CUDA device'; print(torch.cuda.get_device_name())" || exit 2
# The tests that only run on a GPU (marked `cuda`: CUDA graphs, the whole loop and ControlNet steps recorded for
# real, AOT packages and fp8 on the device, masked attention off cuDNN, previews on the device). Only those: the
# CPU tests need the shipped models (which a device copy may leave out) and this project's torch. Only the files
# that have such tests are collected: the others may import what a GPU machine's image lacks (the server's stack).
SDENGINE_GPU_OUT="$out" timeout "${GPU_TESTS_TIMEOUT:-300}" "$py" -m pytest -q -p no:cacheprovider -m cuda $(grep -l "pytest.mark.cuda" tests/test_*.py) \
    2>&1 | tee "$out/gpu_tests.log" | tail -5
"$py" -m sdengine bench --random sd15 --workdir /tmp/sdengine-gpu-check --device cuda --compare diffusers \
    --out "$out" --budget-s "$budget" ${phases:+--phases "$phases"} 2>&1 | grep -v "Loading" | tee "$out/bench.log"
