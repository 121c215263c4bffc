"""How much the CPU weight-only modes change the default model's predictions.

For a few chat prompts, the bf16 model (the GGUF dequantized, no re-quantization) writes a greedy
continuation; each mode is then teacher-forced along it and scored: top-1 agreement with bf16 and the mean
absolute difference of the chosen token's log-probability.

    python benchmarks/quant_quality.py [--tokens 64]
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
    dtype = next(lm.model.parameters()).dtype
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--modes", default=None, help="comma-separated subset of the mode names' keys, e.g. int4,w8a8")
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
        lm = ref if wq == "none" else load_model(gguf, dtype="bfloat16", device="cpu", weight_quant=wq, head_quant=hq)
        agree, total, dlp, lps = 0, 0, 0.0, []
        for k, (prompt, out) in enumerate(seqs):
            ids = prompt + out
            lp = torch.log_softmax(logits_along(lm, ids)[len(prompt) - 1:-1].float(), dim=-1)
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
