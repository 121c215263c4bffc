"""One prefill linear of the default model's shapes: the fp32 GEMM over the dequantized weight (`gguf-q8`'s prefill,
and the default's before the seventh round) against the 16-bit integer GEMM (csrc/ggml_gemm16.cpp), as GGMLLinear
calls them (the weight unpacked or dequantized inside each call). Random blocks of the model's types.

    python benchmarks/prefill_linears.py [--rows 1024] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from thinkgate.layers import cpu_kernels
from thinkgate.layers.ggml_linear import GGMLLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' random GGUF blocks
from tests.layers.test_ggml_linear import random_blocks  # noqa: E402

SHAPES = [("q/k/v 1152 x 896, Q5_0", T.Q5_0, 1152, 896), ("gate/up panel 1024 x 896, Q5_0", T.Q5_0, 1024, 896),
          ("down 896 x 4864, Q4_K", T.Q4_K, 896, 4864), ("down 896 x 4864, Q6_K", T.Q6_K, 896, 4864)]


def median_time(fn, repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    ops = cpu_kernels.load_ggml()
    if ops is None or not ops.ggml_gemm16_fast():
        raise SystemExit("needs the GGUF block kernels built with AVX2")
    rng = np.random.default_rng(0)
    print(f"{args.rows} rows, medians of {args.repeats}, {torch.get_num_threads()} threads")
    print("| linear | fp32 GEMM (dequantized) | 16-bit GEMM | ratio |\n| --- | ---: | ---: | ---: |")
    for name, qtype, n, k in SHAPES:
        lin = GGMLLinear([(int(qtype), torch.from_numpy(random_blocks(qtype, n, k, rng)))], k)
        x = torch.randn(args.rows, k)
        f32 = median_time(lambda: lin.forward_exact(x), args.repeats)  # noqa: B023 (called at once)
        i16 = median_time(lambda: lin.forward_int16(x), args.repeats)  # noqa: B023
        macs = args.rows * n * k / 1e9
        print(f"| {name} | {f32 * 1e3:.1f} ms ({macs / f32:.0f} GMAC/s) | {i16 * 1e3:.1f} ms ({macs / i16:.0f}) "
              f"| {i16 / f32:.2f}x |")


if __name__ == "__main__":
    main()
