"""What a bf16 KV pool costs in fidelity against an fp32 one, on the default model as the CPU serves it (issue 23).

16 varied chat prompts (code, prose, Chinese) get greedy answers from the engine with each pool; each answer
is compared with the reference one (identical answers, mean common prefix in characters), and every
configuration is teacher-forced along the reference text, decode path, all sequences in one batched step as
under load: top-1 agreement with the reference's tokens and the mean absolute difference of the chosen
token's log-probability against the reference configuration.

Rows: the served weights (`--weight-quant auto`) with an fp32 pool (the reference) and with a bf16 pool (the
pool's own cost); then the exact model (fp32 weights and pool) against the served default (what the
default's weights and pool together cost).

    python benchmarks/kv_cache_fidelity.py [--tokens 96] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path

import torch

from thinkgate.chat.template import render_chat
from thinkgate.config import EngineConfig
from thinkgate.engine.llm_engine import LLMEngine
from thinkgate.layers.attention import AttentionMetadata
from thinkgate.models.default_model import pull_default_model
from thinkgate.models.loader import load_model
from thinkgate.sampling.params import SamplingParams

PROMPTS = [
    "Write a Python function that checks whether a number is prime.",
    "Explain what a hash map is in two sentences.",
    "Write a SQL query that counts orders per customer.",
    "What is the difference between a list and a tuple in Python?",
    "Write a bash one-liner that counts lines in all .py files.",
    "写一个计算斐波那契数列的函数。",
    "用三句话解释什么是递归。",
    "Write a JavaScript function that debounces another function.",
    "Describe the water cycle for a ten-year-old.",
    "Write a Rust function that reverses a vector in place.",
    "What are the trade-offs between REST and gRPC?",
    "Write a haiku about compilers.",
    "Implement binary search in C.",
    "Summarize the causes of the French Revolution in one paragraph.",
    "Write a regular expression that matches an IPv4 address and explain it.",
    "如何在 Python 中读取一个 JSON 文件？",
]


def chat_ids(tok, text: str) -> list[int]:
    return tok.encode(render_chat(tok.chat_template, [{"role": "user", "content": text}]))


def answers(lm, kv_dtype: str, prompts: list[list[int]], tokens: int) -> list[list[int]]:
    eng = LLMEngine(lm, EngineConfig(kv_cache_dtype=kv_dtype, max_model_len=1024, max_num_seqs=len(prompts),
                                     enable_prefix_caching=False))
    return eng.generate(prompts, SamplingParams(temperature=0, max_tokens=tokens, ignore_eos=True))


def forced_logprobs(lm, seqs: list[list[int]], kv_dtype: torch.dtype) -> list[torch.Tensor]:
    """Log-probabilities at every position of each sequence, one token a step for all sequences at once
    (the decode path, which reads the pool), with a pool of `kv_dtype`."""
    cfg, bs = lm.config, 16
    tables, start = [], 0
    for ids in seqs:
        n = len(ids) // bs + 2
        tables.append(list(range(start, start + n)))
        start += n
    shape = (start, bs, cfg.num_kv_heads, cfg.head_dim)
    kv = [(torch.zeros(shape, dtype=kv_dtype), torch.zeros(shape, dtype=kv_dtype)) for _ in range(cfg.num_layers)]
    outs: list[list[torch.Tensor]] = [[] for _ in seqs]
    with torch.inference_mode():
        for i in range(max(map(len, seqs))):
            rows = [k for k, ids in enumerate(seqs) if i < len(ids)]
            meta = AttentionMetadata.build([1] * len(rows), [i + 1] * len(rows), [tables[k] for k in rows], bs,
                                           torch.device("cpu"))
            h = lm.model(torch.tensor([seqs[k][i] for k in rows]), torch.full((len(rows),), i), kv, meta)
            logp = torch.log_softmax(lm.model.compute_logits(h).float(), -1)
            for r, k in enumerate(rows):
                outs[k].append(logp[r])
    return [torch.stack(o) for o in outs]


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def compare(tok, prompts, ref_answers, ref_lp, answers_, lp) -> dict:
    same = sum(a == b for a, b in zip(ref_answers, answers_, strict=True))
    prefix = [common_prefix(tok.decode(a), tok.decode(b)) for a, b in zip(ref_answers, answers_, strict=True)]
    agree, diffs = 0, []
    n = 0
    for p, ans, r, x in zip(prompts, ref_answers, ref_lp, lp, strict=True):
        pos = torch.arange(len(p) - 1, len(p) + len(ans) - 1)  # the positions that predict the answer
        chosen = torch.tensor(ans)
        agree += int((x[pos].argmax(-1) == chosen).sum())
        diffs.append((x[pos, chosen] - r[pos, chosen]).abs())
        n += len(ans)
    return {"identical_answers": f"{same}/{len(prompts)}", "mean_common_prefix_chars": sum(prefix) / len(prefix),
            "top1_agreement": agree / n, "mean_abs_logprob_diff": torch.cat(diffs).mean().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--skip-exact", action="store_true", help="only the pool comparison on the served weights")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", torch.get_num_threads())))
    gguf = str(pull_default_model())
    served = load_model(gguf, dtype="auto", device="cpu", weight_quant="auto")
    tok = served.tokenizer
    prompts = [chat_ids(tok, p) for p in PROMPTS]
    rows = {}
    ref = answers(served, "float32", prompts, args.tokens)
    seqs = [p + a for p, a in zip(prompts, ref, strict=True)]
    ref_lp = forced_logprobs(served, seqs, torch.float32)
    bf = answers(served, "bfloat16", prompts, args.tokens)
    rows["served weights: bf16 pool vs fp32 pool"] = compare(tok, prompts, ref, ref_lp, bf,
                                                              forced_logprobs(served, seqs, torch.bfloat16))
    print(json.dumps(rows, indent=1), flush=True)
    if not args.skip_exact:
        exact_lm = load_model(gguf, dtype="float32", device="cpu", weight_quant="none")
        exact = answers(exact_lm, "float32", prompts, args.tokens)
        exact_seqs = [p + a for p, a in zip(prompts, exact, strict=True)]
        exact_lp = forced_logprobs(exact_lm, exact_seqs, torch.float32)
        del exact_lm
        rows["served default (weights + bf16 pool) vs exact fp32"] = compare(
            tok, prompts, exact, exact_lp, bf, forced_logprobs(served, exact_seqs, torch.bfloat16))
        rows["served weights with fp32 pool vs exact fp32"] = compare(
            tok, prompts, exact, exact_lp, ref, forced_logprobs(served, exact_seqs, torch.float32))
    print(json.dumps(rows, indent=1))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
