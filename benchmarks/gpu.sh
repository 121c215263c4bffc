#!/usr/bin/env bash
# The GPU benchmark as one prepared script (run on a lent H100/H200 with: bash benchmarks/gpu.sh).
# Random weights in real shapes, built in device memory (no files), bf16.
set -euo pipefail
pip install -q -e ".[dev]" 2>/dev/null || pip install -q -e .
nvidia-smi --query-gpu=name,memory.total --format=csv
python - <<'PY'
import time, torch
from thinkgate.bench.engine import bench_engine
from thinkgate.config import EngineConfig
from thinkgate.engine.llm_engine import LLMEngine
for spec, batches in (("random:qwen3-0.6b", [1, 32]), ("random:qwen3-30b-a3b", [1, 32])):
    t = time.time()
    eng = LLMEngine.from_config(EngineConfig(model=spec, dtype="bfloat16", device="cuda", max_num_seqs=64,
                                             enable_prefix_caching=False, max_model_len=4096))
    print(f"{spec}: start-up {time.time() - t:.1f} s")
    bench_engine(spec, batches, 128, 128, repeats=3, engine=eng)
    del eng
    torch.cuda.empty_cache()
PY
