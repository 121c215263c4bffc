#!/usr/bin/env bash
# The GPU check and benchmark as one prepared script, for a lent H100/H200 (which has torch, triton,
# transformers and pytest but no network): bash benchmarks/gpu.sh [parts of benchmarks/gpu2.py]
# (the first round's figures: python3 benchmarks/gpu.py [small|moe|hf-small|...]).
set -uo pipefail
export PYTHONPATH=src:. PYTHONUNBUFFERED=1 OUT=${OUT:-.}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv
timeout 240 python3 -m pytest -q -p no:cacheprovider -rs tests/gpu -s 2>&1 | tee "$OUT/gpu_tests.log" | grep -E "passed|failed|FAILED|Error|fp8 vs|^E " | head -40
python3 benchmarks/gpu2.py "$@" 2>&1 | tee "$OUT/gpu_bench.log" | grep -v "^ "
