"""`thinkgate bench engine`: offline engine throughput (no HTTP), for profiling."""

from __future__ import annotations

import statistics
import time

import torch

from thinkgate.config import EngineConfig
from thinkgate.engine.llm_engine import LLMEngine
from thinkgate.sampling.params import SamplingParams


def bench_engine(model: str, num_seqs: list[int], input_len: int, output_len: int, dtype: str = "auto",
                 device: str = "auto", repeats: int = 3, seed: int = 0, profile: bool = False,
                 engine: LLMEngine | None = None, weight_quant: str = "auto", head_quant: str = "auto",
                 cpu_kernels: bool = True) -> list[dict]:
    eng = engine or LLMEngine.from_config(EngineConfig(model=model, dtype=dtype, device=device,
                                                       enable_prefix_caching=False, weight_quant=weight_quant,
                                                       head_quant=head_quant, cpu_kernels=cpu_kernels))
    vocab = eng.tokenizer.vocab_size
    g = torch.Generator().manual_seed(seed)
    results = []
    params = SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True)
    eng.generate([torch.randint(0, vocab, (16,), generator=g).tolist()], SamplingParams(max_tokens=4))  # warm-up
    for n in num_seqs:
        decode_rates, prefill_rates = [], []
        for _ in range(repeats):
            prompts = [torch.randint(0, vocab, (input_len,), generator=g).tolist() for _ in range(n)]
            ids = [f"b{n}-{i}-{time.monotonic_ns()}" for i in range(n)]
            for rid, p in zip(ids, prompts, strict=True):
                eng.add_request(rid, p, params)
            t0 = time.perf_counter()
            first_done = None
            started: set[str] = set()
            decoded = 0  # tokens produced once every sequence had its first (long prompts are chunked, and
            # sequences whose prefill ended early decode while later ones still prefill)
            while eng.has_unfinished():
                outs = eng.step()
                if first_done is not None:
                    decoded += sum(len(o.new_token_ids) for o in outs)
                    continue
                started.update(o.request_id for o in outs if o.new_token_ids)
                if len(started) == n:
                    first_done = time.perf_counter()  # every sequence has its first token: prefill over
            t1 = time.perf_counter()
            prefill_rates.append(n * input_len / (first_done - t0))
            decode_rates.append(decoded / (t1 - first_done))
        results.append({"num_seqs": n, "input_len": input_len, "output_len": output_len,
                        "decode_tok_s": statistics.median(decode_rates), "prefill_tok_s": statistics.median(prefill_rates),
                        "runs": len(decode_rates)})
        print(f"seqs={n:>3} input={input_len} output={output_len}  decode {results[-1]['decode_tok_s']:.1f} tok/s  "
              f"prefill {results[-1]['prefill_tok_s']:.0f} tok/s  (median of {repeats})")
    if profile:
        profile_step(eng, output_len)
    return results


def profile_step(eng: LLMEngine, steps: int = 32) -> dict:
    """Split a batch-1 decode step into model time and everything else (scheduling, sampling, detok)."""
    vocab = eng.tokenizer.vocab_size
    eng.add_request("prof", list(range(10, 10 + 64)), SamplingParams(temperature=0, max_tokens=steps + 2,
                                                                      ignore_eos=True))
    eng.step()  # prefill
    runner = eng.runner
    model_time = [0.0]

    def timed(fn):
        def wrapper(*a, **k):
            t = time.perf_counter()
            out = fn(*a, **k)
            model_time[0] += time.perf_counter() - t
            return out

        return wrapper

    orig, logits_fn = runner.model.forward, runner.model.compute_logits
    runner.model.forward, runner.model.compute_logits = timed(orig), timed(logits_fn)
    decoder = runner.cpu_decoder  # the C++ layer stack (one-sequence CPU decode) is model time too
    if decoder is not None:
        runner.cpu_decoder = _TimedDecoder(decoder, timed)
    t0 = time.perf_counter()
    n = 0
    while eng.has_unfinished():
        eng.step()
        n += 1
    total = time.perf_counter() - t0
    runner.model.forward, runner.model.compute_logits = orig, logits_fn
    runner.cpu_decoder = decoder
    other = total - model_time[0]
    res = {"steps": n, "step_ms": 1000 * total / n, "model_ms": 1000 * model_time[0] / n,
           "overhead_ms": 1000 * other / n, "overhead_pct": 100 * other / total, "vocab": vocab}
    print(f"batch-1 decode step {res['step_ms']:.2f} ms: model+lm_head {res['model_ms']:.2f} ms, "
          f"engine overhead {res['overhead_ms']:.2f} ms ({res['overhead_pct']:.1f}%)")
    return res


class _TimedDecoder:
    def __init__(self, decoder, timed):
        self.forward = timed(decoder.forward)
