#!/usr/bin/env bash
# The device check of issue 15, prepared to run in one call on a lent GPU machine (well under ten minutes):
# the CUDA-graph and fused-step tests on CUDA, then `bench core` and `bench decoding` at gpu scale into results/gpu/bench/.
# Usage: bash ci/gpu_bench.sh [VENV]   (copy results/gpu/bench/ back and commit it)
set -euo pipefail
VENV=${1:-.venv}
BIN="$VENV/bin"
cd "$(dirname "$0")/.."
nvidia-smi --query-gpu=name,memory.total --format=csv || true
"$BIN/pytest" -q tests/test_fused.py tests/test_bench_core.py
timeout 300 "$BIN/paper-repro" bench core --scale gpu --device cuda
timeout 240 "$BIN/paper-repro" bench decoding --scale gpu --device cuda
