"""Where a CPU decode step goes, in process: the C++ layer stack (csrc/ggml_decoder.cpp), the output head, the
layer stack's linears called alone (so the rest of the stack is the difference), and the engine's whole step
(scheduling, sampling, detokenizing: the step minus stack and head).

    python benchmarks/decode_step_split.py [--model M] [--rounds 3] [--tokens 40] [--rows 1]

Each round: the 96 linears of the 24 layers called back to back 15 times with --rows input rows, then a greedy
generation of --rows sequences decoded together whose decode steps are timed; medians per round, ms.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from thinkgate.config import EngineConfig
from thinkgate.engine.llm_engine import LLMEngine
from thinkgate.layers import cpu_kernels
from thinkgate.models.default_model import pull_default_model
from thinkgate.sampling.params import SamplingParams


class Timed:
    def __init__(self, fn, into: list[float]):
        self.fn, self.into = fn, into

    def __call__(self, *a, **k):
        t = time.perf_counter()
        out = self.fn(*a, **k)
        self.into.append(time.perf_counter() - t)
        return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="a GGUF file (default: the default model)")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=40)
    ap.add_argument("--rows", type=int, default=1, help="sequences decoded together (rows of each linear)")
    args = ap.parse_args()
    eng = LLMEngine.from_config(EngineConfig(model=args.model or str(pull_default_model(progress=False)),
                                             enable_prefix_caching=False))
    runner, ops = eng.runner, cpu_kernels.load_ggml()
    model = runner.model
    if runner.cpu_decoder is None or ops is None:
        raise SystemExit("needs the C++ GGUF decoder (a GGUF model on an AVX2 CPU with a compiler)")
    dec_t, head_t = [], []

    class Decoder:  # the runner calls .forward
        forward = staticmethod(Timed(runner.cpu_decoder.forward, dec_t))

    runner.cpu_decoder = Decoder()
    model.compute_logits = Timed(model.compute_logits, head_t)
    step_t = []
    eng.step = Timed(eng.step, step_t)
    xs = {}
    calls = []
    for layer in model.layers:
        for lin in (layer.self_attn.qkv_proj, layer.self_attn.o_proj, layer.mlp.gate_up_proj, layer.mlp.down_proj):
            k = lin.in_features
            xs.setdefault(k, torch.randn(args.rows, k))
            calls.append((xs[k], lin.types, lin.blocks, lin.act_bits))
    prompts = [list(range(100 + 7 * i, 164 + 7 * i)) for i in range(args.rows)]
    eng.generate(prompts, SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))  # warm-up
    print(f"{args.rows} row(s)\n| round | linears alone | layer stack | head | stack + head | engine step |\n"
          "| --- | ---: | ---: | ---: | ---: | ---: |")
    for r in range(args.rounds):
        lin_t = []
        for _ in range(15):
            t = time.perf_counter()
            for x, types, blocks, bits in calls:
                ops.ggml_linear(x, types, blocks, None, False, bits)
            lin_t.append(time.perf_counter() - t)
        dec_t.clear()
        head_t.clear()
        step_t.clear()
        eng.generate(prompts, SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True))
        d, h = statistics.median(dec_t[2:]) * 1e3, statistics.median(head_t[2:]) * 1e3
        st = statistics.median(step_t[2:]) * 1e3  # the first steps prefill
        print(f"| {r + 1} | {statistics.median(lin_t) * 1e3:.2f} | {d:.2f} | {h:.2f} | {d + h:.2f} | {st:.2f} |",
              flush=True)


if __name__ == "__main__":
    main()
