#!/usr/bin/env bash
# The GPU check and benchmark as one prepared script, for a lent H100/H200 (which has torch, triton,
# transformers and pytest but no network): bash benchmarks/gpu.sh [parts of benchmarks/gpu.py]
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1 OUT=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
python3 -m pytest -q -p no:cacheprovider tests/gpu 2>&1 | tee "$OUT/gpu_tests.log" | tail -25
python3 benchmarks/gpu.py "$@" 2>&1 | tee "$OUT/gpu_bench.log"
