"""How much the CPU weight-only modes change the default model's predictions.

For a few chat prompts, the bf16 model (the GGUF dequantized, no re-quantization) writes a greedy
continuation; each mode is then teacher-forced along it and scored: top-1 agreement with bf16 and the mean
absolute difference of the chosen token's log-probability.

    python benchmarks/quant_quality.py [--tokens 64] [--modes int4,w8a8] [--batched] [--no-cpu-kernels]

--batched scores all prompts together, one decode step for every sequence at once (the rows a batched
server step has), so modes whose numerics depend on the rows (W8A8: one activation scale per call) are
scored as they run under load.
"""

from __future__ import annotations

import argparse

import torch

from thinkgate.chat.template import render_chat
from thinkgate.config import EngineConfig
from thinkgate.engine.llm_engine import LLMEngine
from thinkgate.layers.attention import AttentionMetadata
from thinkgate.models.default_model import pull_default_model
from thinkgate.models.loader import load_model
from thinkgate.sampling.params import SamplingParams

PROMPTS = ["Write a Python function that checks whether a number is prime.",
           "Explain what a hash map is in two sentences.",
           "Write a SQL query that counts orders per customer.",
           "What is the difference between a list and a tuple in Python?",
           "Write a bash one-liner that counts lines in all .py files.",
           "写一个计算斐波那契数列的函数。"]


def logits_along(lm, ids: list[int]) -> torch.Tensor:
    """Logits at every position, computed one token at a time (the decode path, as served)."""
    cfg = lm.config
    bs, n_blocks = 16, len(ids) // 16 + 2
    dtype = torch.float32  # the KV cache dtype the CPU engine serves with (attention computes in fp32)
    kv = [(torch.zeros(n_blocks, bs, cfg.num_kv_heads, cfg.head_dim, dtype=dtype),
           torch.zeros(n_blocks, bs, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)) for _ in range(cfg.num_layers)]
    table = list(range(n_blocks))
    out = []
    with torch.inference_mode():
        for i, t in enumerate(ids):
            meta = AttentionMetadata.build([1], [i + 1], [table], bs, torch.device("cpu"))
            h = lm.model(torch.tensor([t]), torch.tensor([i]), kv, meta)
            out.append(lm.model.compute_logits(h)[0])
    return torch.stack(out)


def logits_along_batched(lm, seqs: list[list[int]]) -> list[torch.Tensor]:
    """`logits_along` for every sequence at once: step i feeds token i of each sequence that has one."""
    cfg = lm.config
    bs = 16
    dtype = torch.float32  # as in logits_along
    tables, start = [], 0
    for ids in seqs:
        n = len(ids) // bs + 2
        tables.append(list(range(start, start + n)))
        start += n
    kv = [(torch.zeros(start, bs, cfg.num_kv_heads, cfg.head_dim, dtype=dtype),
           torch.zeros(start, bs, cfg.num_kv_heads, cfg.head_dim, dtype=dtype)) for _ in range(cfg.num_layers)]
    outs: list[list[torch.Tensor]] = [[] for _ in seqs]
    with torch.inference_mode():
        for i in range(max(map(len, seqs))):
            rows = [k for k, ids in enumerate(seqs) if i < len(ids)]
            meta = AttentionMetadata.build([1] * len(rows), [i + 1] * len(rows), [tables[k] for k in rows], bs,
                                           torch.device("cpu"))
            h = lm.model(torch.tensor([seqs[k][i] for k in rows]), torch.full((len(rows),), i), kv, meta)
            for r, k in enumerate(rows):
                outs[k].append(lm.model.compute_logits(h[r:r + 1])[0])
    return [torch.stack(o) for o in outs]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--modes", default=None, help="comma-separated subset of the mode names' keys, e.g. int4,w8a8")
    ap.add_argument("--batched", action="store_true", help="score all prompts in one batch per step")
    ap.add_argument("--no-cpu-kernels", action="store_true", help="int4 on torch's kernel, not our VNNI one")
    args = ap.parse_args()
    gguf = str(pull_default_model())
    ref = load_model(gguf, dtype="bfloat16", device="cpu", weight_quant="none")
    eng = LLMEngine(ref, EngineConfig(kv_cache_memory=2**28))
    tok = ref.tokenizer
    seqs = []
    for p in PROMPTS:
        prompt = tok.encode(render_chat(tok.chat_template, [{"role": "user", "content": p}]))
        out = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=args.tokens, ignore_eos=True))[0]
        seqs.append((prompt, out))
    modes = {"bf16 (reference)": ("none", "none"), "int8": ("int8", "int8"), "int8 + int4 head": ("int8", "int4"),
             "int4": ("int4", "int4"), "int4 + int8 head": ("int4", "int8"), "w8a8": ("w8a8", "w8a8")}
    if args.modes:
        keep = set(args.modes.split(","))
        modes = {k: v for k, v in modes.items() if k == "bf16 (reference)" or v[0] in keep and v[0] == v[1]}
    ref_lp = None
    for name, (wq, hq) in modes.items():
        lm = ref if wq == "none" else load_model(gguf, dtype="bfloat16", device="cpu", weight_quant=wq, head_quant=hq,
                                                       cpu_kernels=not args.no_cpu_kernels)
        agree, total, dlp, lps = 0, 0, 0.0, []
        together = logits_along_batched(lm, [p + o for p, o in seqs]) if args.batched else None
        for k, (prompt, out) in enumerate(seqs):
            ids = prompt + out
            logits = together[k] if together is not None else logits_along(lm, ids)
            lp = torch.log_softmax(logits[len(prompt) - 1:-1].float(), dim=-1)
            lps.append(lp)
            target = torch.tensor(out)
            agree += int((lp.argmax(-1) == target).sum())
            total += len(out)
            if ref_lp is not None:
                chosen = lp.gather(1, target[:, None]).squeeze(1)
                ref_chosen = ref_lp[k].gather(1, target[:, None]).squeeze(1)
                dlp += float((chosen - ref_chosen).abs().sum())
        if ref_lp is None:
            ref_lp = lps
        print(f"{name:<18} top-1 agreement with the bf16 greedy text {100 * agree / total:5.1f}%   "
              f"mean |d logprob| {dlp / total:.4f}")


if __name__ == "__main__":
    main()
