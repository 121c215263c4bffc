"""How fast cpu_compare.py's 8-stream level could be at best, from the work it holds and a kernel speed (issue 19).

The level sends 16 chat prompts of ~64 words, 8 at a time, each answered with 128 greedy tokens: two waves of 8
prefills and 127 decode steps of 8 rows. Its multiply-adds are counted from the default model's shapes and the
prompts' real token counts (their mean over cpu_compare's 6 rounds of the level, with the model's chat template,
less the system prompt's first full KV block, shared by the prefix cache); every multiply-add is then given the cost of a kernel speed in cycles per 32 weights and input
row (decode_ceiling.cpp prints the ideal loops', decode_linears.py / prefill_linears.py the real kernels'), on
the two cores at the given clock with perfect scaling, and nothing else (attention, norms, sampling, HTTP) costs
anything. The printed tok/s is an upper bound for that speed; divided by llama-server's measured 8-stream tok/s
it is the best ratio the level could show.

    python benchmarks/batched_ceiling.py --llama-tok-s 41.2 --decode-cycles 1.5 2.0 2.38 3.0 --prefill-cycles 1.7
"""

from __future__ import annotations

import argparse

from gguf import GGUFReader

from thinkgate.bench.prompts import synthetic_prompts
from thinkgate.chat.template import render_chat
from thinkgate.models.default_model import pull_default_model
from thinkgate.models.gguf_file import GGUFModel

STREAMS, REQUESTS, OUT_LEN, BLOCK, ROUNDS = 8, 16, 128, 16, 6


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--llama-tok-s", type=float, required=True, help="llama-server's 8-stream output tok/s")
    ap.add_argument("--decode-cycles", type=float, nargs="+", required=True)
    ap.add_argument("--prefill-cycles", type=float, required=True)
    ap.add_argument("--ghz", type=float, default=3.16)
    ap.add_argument("--cores", type=int, default=2)
    args = ap.parse_args()
    path = pull_default_model(progress=False)
    reader = GGUFReader(str(path))
    layer_w = head_w = 0
    for t in reader.tensors:
        if len(t.shape) != 2 or t.name == "token_embd.weight":
            continue
        n = int(t.n_elements)
        if t.name == "output.weight":
            head_w = n
        else:
            layer_w += n
    tok = GGUFModel(path).tokenizer()
    template = tok.chat_template
    # cpu_compare's rounds of the level (seeds 100 r + 8): their mean token counts
    counts = []
    for r in range(ROUNDS):
        prompts = synthetic_prompts(max(4, 2 * STREAMS), 64, seed=100 * r + STREAMS, jitter=0.2)
        counts.append([len(tok.encode(render_chat(template, [{"role": "user", "content": p}]))) for p in prompts])
    lens = [sum(c[i] for c in counts) / ROUNDS for i in range(REQUESTS)]
    computed = sum(n - BLOCK for n in lens)  # the system prompt's first block comes from the prefix cache
    prefill_units = computed * layer_w / 32 + REQUESTS * head_w / 32  # one row of logits a prompt
    decode_rows = REQUESTS * (OUT_LEN - 1)  # the first token of each answer comes with its prefill
    decode_units = decode_rows * (layer_w + head_w) / 32
    rate = args.cores * args.ghz * 1e9  # cycles a second on all cores
    prefill_s = prefill_units * args.prefill_cycles / rate
    print(f"weights: layers {layer_w / 1e6:.1f} M, head {head_w / 1e6:.1f} M; prompts {sum(lens):.0f} tokens, "
          f"{computed:.0f} computed (mean of {ROUNDS} rounds); {decode_rows} decode rows in {decode_rows // STREAMS} steps of {STREAMS}")
    print(f"prefill {prefill_units / 1e9:.2f} G units at {args.prefill_cycles} cycles: {prefill_s:.2f} s")
    for c in args.decode_cycles:
        decode_s = decode_units * c / rate
        tok_s = REQUESTS * OUT_LEN / (prefill_s + decode_s)
        print(f"decode at {c} cycles per 32 weights and row: {decode_s:.2f} s ({decode_s / (decode_rows / STREAMS) * 1e3:.1f} "
              f"ms a step); at best {tok_s:.0f} tok/s = {tok_s / args.llama_tok_s:.2f}x llama-server")


if __name__ == "__main__":
    main()
