"""Fidelity on long prompts: the default mode's greedy answers against the exact model's, prompts of 1.5-2.2K tokens.

benchmarks/fidelity.py scores short prompts, which prefill in one step through the block kernels. A long prompt
takes the other prefill path: the float GEMM over the file's dequantized weights (the gate/up projection in panels)
and, past the prefill chunk (max_num_batched_tokens, 2,048 by default), a later chunk whose attention is split
into earlier keys and its own keys (layers/attention.chunk_attention_cpu). This runs the default model on three
such prompts (an edit of a 185-line file; a 2.2K-token module to explain; the same module to write tests for),
96 greedy tokens each, in the default mode and in `none` (the exact fp32 model on the same dequantized weights),
and reports, per prompt, whether the answers are identical and where they first differ.

    python benchmarks/fidelity_long.py [--modes gguf,gguf-q8] [--tokens 96] [--json out.json]
"""

from __future__ import annotations

import argparse
import fnmatch
import gc
import inspect
import json
import os
import platform
import textwrap

from thinkgate.chat.template import render_chat
from thinkgate.config import EngineConfig
from thinkgate.engine.llm_engine import LLMEngine
from thinkgate.models.default_model import pull_default_model
from thinkgate.models.loader import load_model
from thinkgate.sampling.params import SamplingParams


def prompts() -> list[str]:
    with open(fnmatch.__file__) as f:
        edit = f.read()
    module = inspect.getsource(textwrap)[:9000]
    return [
        "Here is a Python file:\n\n```python\n" + edit + "```\n\nRewrite the whole file with one change: the maxsize "
        "of the lru_cache on _compile_pattern becomes 1024. Output only the complete file in one code block.",
        "Here is a Python module:\n\n```python\n" + module + "\n```\n\nExplain what this module does and list its "
        "public functions.",
        "Here is a Python module:\n\n```python\n" + module + "\n```\n\nWrite unit tests for the dedent function.",
    ]


def answers(mode: str, texts: list[str], tokens: int) -> list[tuple[int, list[int]]]:
    cfg = EngineConfig(max_model_len=8192, max_num_seqs=1, weight_quant=mode, enable_prefix_caching=False)
    loaded = load_model(str(pull_default_model()), cfg.dtype, cfg.device, cfg.max_model_len, cfg.weight_quant,
                        cfg.head_quant, cfg.cpu_kernels, cfg.quantization)
    eng, tok = LLMEngine(loaded, cfg), loaded.tokenizer
    out = []
    for i, text in enumerate(texts):
        ids = tok.encode(render_chat(tok.chat_template, [{"role": "user", "content": text}]))
        eng.add_request(f"long-{i}", ids, SamplingParams(temperature=0, max_tokens=tokens))
        got: list[int] = []
        while eng.has_unfinished():
            for o in eng.step():
                got.extend(o.new_token_ids)
        out.append((len(ids), got))
    del eng, loaded
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--modes", default="gguf", help="comma-separated weight modes to score against `none`")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    texts = prompts()
    exact = answers("none", texts, args.tokens)
    result = {"machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs",
              "tokens": args.tokens, "prompt_tokens": [n for n, _ in exact], "modes": {}}
    print("| mode | prompt tokens | identical | first difference (token) |\n|---|---:|---|---:|")
    for mode in args.modes.split(","):
        rows = []
        for (n, want), (_, got) in zip(exact, answers(mode, texts, args.tokens), strict=True):
            first = next((i for i, (a, b) in enumerate(zip(want, got, strict=False)) if a != b),
                         None if want == got else min(len(want), len(got)))
            rows.append({"prompt_tokens": n, "identical": want == got, "first_difference": first})
            print(f"| {mode} | {n} | {'yes' if want == got else 'no'} | {'' if first is None else first} |")
        result["modes"][mode] = rows
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
