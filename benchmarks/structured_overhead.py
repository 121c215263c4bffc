"""Decode speed with and without a json_schema constraint, batch 1 and 8, on the default model.

    python benchmarks/structured_overhead.py [--model SPEC] [--repeats 3] [--backend llguidance,xgrammar]
"""

from __future__ import annotations

import argparse
import statistics
import time

from thinkgate.chat.template import render_chat
from thinkgate.config import EngineConfig
from thinkgate.engine.llm_engine import LLMEngine
from thinkgate.sampling.params import SamplingParams
from thinkgate.structured.backend import make_backend

SCHEMA = {"type": "object", "properties": {
    "people": {"type": "array", "minItems": 40, "maxItems": 60, "items": {
        "type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                         "city": {"type": "string"}},
        "required": ["name", "age", "city"], "additionalProperties": False}}},
    "required": ["people"], "additionalProperties": False}


def run(eng: LLMEngine, prompt: list[int], batch: int, grammar_fn, max_tokens: int) -> float:
    for i in range(batch):
        eng.add_request(f"r{i}-{time.monotonic_ns()}", prompt,
                        SamplingParams(temperature=0.7, seed=i, max_tokens=max_tokens, ignore_eos=grammar_fn is None),
                        grammar=grammar_fn() if grammar_fn else None)
    eng.step()  # prefill
    t0, n = time.perf_counter(), 0
    while eng.has_unfinished():
        n += len(eng.step())
    return n / (time.perf_counter() - t0)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--backend", default="llguidance", help="comma-separated: llguidance,xgrammar")
    args = ap.parse_args()
    eng = LLMEngine.from_config(EngineConfig(model=args.model or "default", enable_prefix_caching=False))
    tok = eng.tokenizer
    backends = {name: make_backend(tok, sorted(eng.eos_ids), name) for name in args.backend.split(",")}
    prompt = tok.encode(render_chat(tok.chat_template, [
        {"role": "user", "content": "List fifty people with name, age and city, as JSON."}]))
    run(eng, prompt, 1, None, 8)
    for batch in (1, 8):
        for name, backend in backends.items():
            # Interleaved, so both sides see the same machine noise.
            free, cons = [], []
            for _ in range(args.repeats):
                free.append(run(eng, prompt, batch, None, args.max_tokens))
                cons.append(run(eng, prompt, batch, lambda b=backend: b.json_schema(SCHEMA), args.max_tokens))
            f, c = statistics.median(free), statistics.median(cons)
            print(f"batch {batch} {name:>10}: unconstrained {f:6.1f} tok/s, json_schema {c:6.1f} tok/s, "
                  f"overhead {100 * (f - c) / f:5.1f}%", flush=True)


if __name__ == "__main__":
    main()
