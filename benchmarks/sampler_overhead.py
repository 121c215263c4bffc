"""Per-step sampler cost for a batch of 32 over a 151,936-token vocabulary, every transform on.

    python benchmarks/sampler_overhead.py [--batch 32] [--vocab 151936] [--repeats 30]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from thinkgate.sampling.params import SamplingParams
from thinkgate.sampling.sampler import Sampler, SamplingRow


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--vocab", type=int, default=151936)
    ap.add_argument("--repeats", type=int, default=30)
    args = ap.parse_args()
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(args.batch, args.vocab, generator=g) * 3
    history = [torch.randint(0, args.vocab, (600,), generator=g).tolist() for _ in range(args.batch)]
    configs = {
        "greedy only": dict(temperature=0),
        "temperature 1 (the OpenAI default)": dict(temperature=1.0),
        "temperature 1, seeded": dict(temperature=1.0, seed=1),
        "Qwen3's (t 0.6, top_p 0.95, top_k 20)": dict(temperature=0.6, top_p=0.95, top_k=20),
        "temperature + top_p": dict(temperature=0.7, top_p=0.9),
        "all transforms": dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, top_a=0.1, frequency_penalty=0.3,
                               presence_penalty=0.2, repetition_penalty=1.1, logit_bias={5: 2.0, 7: -3.0},
                               logprobs=True, top_logprobs=5),
        "all transforms, seeded": dict(temperature=0.7, top_k=50, top_p=0.9, min_p=0.05, top_a=0.1,
                                       frequency_penalty=0.3, presence_penalty=0.2, repetition_penalty=1.1,
                                       logit_bias={5: 2.0, 7: -3.0}, logprobs=True, top_logprobs=5, seed=1),
    }
    sampler = Sampler(args.vocab, args.vocab)
    print(f"batch {args.batch}, vocab {args.vocab}, threads {torch.get_num_threads()}")
    for name, kw in configs.items():
        rows = [SamplingRow(SamplingParams(**kw).resolved(), history[i][:500], history[i][500:],
                            torch.Generator().manual_seed(i) if "seed" in kw else None)
                for i in range(args.batch)]
        for _ in range(3):
            sampler(logits, rows)
        times = []
        for _ in range(args.repeats):
            t = time.perf_counter()
            sampler(logits, rows)
            times.append(time.perf_counter() - t)
        print(f"{name:<40} median {1000 * statistics.median(times):7.2f} ms/step   "
              f"min {1000 * min(times):7.2f} ms")


if __name__ == "__main__":
    main()
