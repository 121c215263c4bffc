"""One decode linear of the default model's shapes through the block kernels (csrc/ggml_linear.cpp, the default's
16-bit activation blocks), 1 and 8 input rows, as the C++ decoder calls them. Random blocks of the model's types.

    python benchmarks/decode_linears.py [--repeats 40] [--threads 2]

Also prints, for one row on one thread, the kernel's time per 32 weights in ns: the figure
benchmarks/ggml_vec_dot.c prints for llama.cpp's own dot products (its 8-bit activation blocks) on the same shapes.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import torch
from gguf import GGMLQuantizationType as T

from thinkgate.layers import cpu_kernels
from thinkgate.layers.ggml_linear import GGMLLinear

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the tests' random GGUF blocks, the timer
from benchmarks.prefill_linears import median_time  # noqa: E402
from tests.layers.test_ggml_linear import random_blocks  # noqa: E402

SHAPES = [("q/k/v 1152 x 896, Q5_0", T.Q5_0, 1152, 896), ("o 896 x 896, Q5_0", T.Q5_0, 896, 896),
          ("gate/up 9728 x 896, Q5_0", T.Q5_0, 9728, 896), ("down 896 x 4864, Q4_K", T.Q4_K, 896, 4864),
          ("down 896 x 4864, Q6_K", T.Q6_K, 896, 4864), ("output head 151936 x 896, Q8_0", T.Q8_0, 151936, 896)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=40)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    ops = cpu_kernels.load_ggml()
    if ops is None:
        raise SystemExit("needs the GGUF block kernels")
    rng = np.random.default_rng(0)
    print(f"medians of {args.repeats} calls; rows 1 and 8 on {args.threads} threads, ns per 32 weights on 1 thread")
    print("| linear | 1 row (ms) | 8 rows (ms) | 1 row, 1 thread: ns per 32 weights |\n| --- | ---: | ---: | ---: |")
    for name, qtype, n, k in SHAPES:
        lin = GGMLLinear([(int(qtype), torch.from_numpy(random_blocks(qtype, n, k, rng)))], k)
        times = []
        for rows, threads in ((1, args.threads), (8, args.threads), (1, 1)):
            torch.set_num_threads(threads)
            x = torch.randn(rows, k)
            times.append(median_time(lambda: ops.ggml_linear(x, lin.types, lin.blocks, None, False, 16),  # noqa: B023
                                     args.repeats))
        torch.set_num_threads(args.threads)
        print(f"| {name} | {times[0] * 1e3:.3f} | {times[1] * 1e3:.3f} | {times[2] / (n * k / 32) * 1e9:.2f} |")


if __name__ == "__main__":
    main()
