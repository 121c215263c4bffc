"""Long-context CPU speed of the default model, one stream: thinkgate's engine against llama.cpp (issue 19).

For each context length N in --contexts (default 1024,4096,8192,16384), both peers in the same run, on the
same GGUF (Qwen2.5-Coder-0.5B-Instruct Q4_K_M, `pull_default_model()`):

1. decode tokens/s at context N: the sequence already holds N tokens and generates --output-len more; the
   rate runs from the first generated token to the last, so the prefill is left out.
   - thinkgate: one request of N prompt tokens, greedy, ignore_eos; (tokens after the first) / (time from
     the first token to the last).
   - llama.cpp: `llama-bench -p 0 -n OUT -d N` (the depth is filled untimed, then OUT one-token decodes).
2. time to first token of an N-token prompt (N unique tokens, so nothing is cached):
   - thinkgate: from add_request to the step that returns the first token (same run as 1.);
   - llama.cpp: N / (the tok/s of `llama-bench -p N -n 0`).

Prompts are random token ids in 1000..100000, fresh for every run (prefix caching is off as well). The
prefill chunk is each peer's default: thinkgate's EngineConfig.max_num_batched_tokens (2048), llama.cpp's
-b 2048 / -ub 512; both peers run 2 threads' worth of CPU (llama-bench `-t 2`). The peers alternate per
context length (thinkgate N, llama.cpp N, then the next N), so drift of the machine hits both. Figures are
medians of --repeats runs (llama-bench `-r`, the median of its samples).

    python benchmarks/long_context_cpu.py --llama-bench /tmp/llamacpp/bin/llama-bench \\
        [--contexts 1024,4096,8192,16384] [--output-len 64] [--repeats 2] [--json out.json] [--plot out.png]

The llama-bench folder is put on LD_LIBRARY_PATH for it; --llama-args adds flags to both of its tests (e.g.
"-fa off": this build's default -fa auto picks flash attention on the CPU). Prints a markdown table; --json
holds every run plus machine info; --plot (default benchmarks/long_context_cpu.png) draws decode tok/s
against context length (needs matplotlib; skipped with a note without it).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import subprocess
import time

import torch

from thinkgate.config import EngineConfig
from thinkgate.engine.llm_engine import LLMEngine
from thinkgate.models.default_model import pull_default_model
from thinkgate.models.loader import load_model
from thinkgate.sampling.params import SamplingParams


def thinkgate_run(eng: LLMEngine, prompt: list[int], output_len: int) -> dict:
    """One stream: TTFT (add_request to the first token) and decode tok/s after the first token."""
    rid = f"lc-{len(prompt)}-{time.monotonic_ns()}"
    t0 = time.perf_counter()
    eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=output_len, ignore_eos=True))
    t_first, n_first, n = None, 0, 0
    while eng.has_unfinished():
        for o in eng.step():
            if o.new_token_ids and t_first is None:
                t_first, n_first = time.perf_counter(), len(o.new_token_ids)
            n += len(o.new_token_ids)
    t_end = time.perf_counter()
    decode = (n - n_first) / (t_end - t_first) if n > n_first else None
    return {"ttft_s": t_first - t0, "decode_tok_s": decode, "output_tokens": n}


def llama_bench(exe: str, gguf: str, extra: list[str], repeats: int) -> dict:
    """One llama-bench test; its median sample (tok/s) and the raw JSON record."""
    env = dict(os.environ)
    lib = os.path.dirname(os.path.abspath(exe))
    env["LD_LIBRARY_PATH"] = lib + (":" + env["LD_LIBRARY_PATH"] if env.get("LD_LIBRARY_PATH") else "")
    cmd = [exe, "-m", gguf, "-t", "2", "-r", str(repeats), "-o", "json", *extra]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if out.returncode != 0:
        return {"cmd": cmd, "error": out.stderr[-800:]}
    rec = json.loads(out.stdout)[0]
    return {"cmd": cmd, "tok_s": statistics.median(rec["samples_ts"]), "samples_ts": rec["samples_ts"],
            "record": rec}


def median(xs: list[float | None]) -> float | None:
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a and b else None


def fmt(x: float | None, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def plot(path: str, rows: list[dict]) -> str:
    try:
        import matplotlib
    except ImportError:
        return "matplotlib is not installed: no plot"
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    ns = [r["context"] for r in rows]
    for key, label in (("thinkgate_decode_tok_s", "thinkgate"), ("llama_decode_tok_s", "llama.cpp")):
        pts = [(n, r[key]) for n, r in zip(ns, rows, strict=True) if r[key] is not None]
        if pts:
            ax.plot(*zip(*pts, strict=True), marker="o", label=label)
    ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("context length (tokens already in the sequence)")
    ax.set_ylabel("decode tokens/s (one stream)")
    ax.set_title(f"Qwen2.5-Coder-0.5B Q4_K_M on CPU ({os.cpu_count()} CPUs)")
    ax.set_ylim(bottom=0)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return f"plot written to {path}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--contexts", default="1024,4096,8192,16384", help="comma-separated context lengths N")
    ap.add_argument("--output-len", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--llama-bench", default=None, help="llama.cpp's llama-bench (left out: thinkgate only)")
    ap.add_argument("--llama-args", default="", help='extra llama-bench flags, e.g. "-fa off"')
    ap.add_argument("--weight-quant", default="auto")
    ap.add_argument("--kv-cache-dtype", default="auto")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", default=None)
    ap.add_argument("--plot", default="benchmarks/long_context_cpu.png")
    args = ap.parse_args()
    contexts = [int(c) for c in args.contexts.split(",")]
    rng = random.Random(args.seed)
    extra = args.llama_args.split()
    gguf = str(pull_default_model())
    cfg = EngineConfig(max_model_len=max(contexts) + args.output_len + 64, max_num_seqs=1,
                       enable_prefix_caching=False, weight_quant=args.weight_quant,
                       kv_cache_dtype=args.kv_cache_dtype)
    loaded = load_model(gguf, cfg.dtype, cfg.device, cfg.max_model_len, cfg.weight_quant, cfg.head_quant,
                        cfg.cpu_kernels, cfg.quantization)
    eng = LLMEngine(loaded, cfg)
    thinkgate_run(eng, [rng.randrange(1000, 100000) for _ in range(32)], 4)  # warm-up
    results = {"model": gguf, "machine": {"platform": platform.platform(), "processor": platform.processor()
                                          or platform.machine(), "cpu_count": os.cpu_count(),
                                          "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                                          "torch_threads": torch.get_num_threads()},
               "load_avg_start": os.getloadavg(), "output_len": args.output_len, "repeats": args.repeats,
               "thinkgate_config": {"weight_quant": args.weight_quant, "kv_cache_dtype": args.kv_cache_dtype,
                                    "max_num_batched_tokens (prefill chunk)": cfg.max_num_batched_tokens,
                                    "max_model_len": cfg.max_model_len},
               "llama_bench": args.llama_bench, "llama_args": extra, "contexts": []}
    print(f"thinkgate prefill chunk: max_num_batched_tokens={cfg.max_num_batched_tokens} (the default); "
          f"llama.cpp: llama-bench -t 2 {' '.join(extra)} + its defaults (here -b 2048 -ub 512)", flush=True)
    for n in contexts:
        runs = []
        for rep in range(args.repeats):
            r = thinkgate_run(eng, [rng.randrange(1000, 100000) for _ in range(n)], args.output_len)
            runs.append(r)
            print(f"N={n} thinkgate run {rep}: TTFT {r['ttft_s']:.2f} s, "
                  f"decode {fmt(r['decode_tok_s'], '.2f')} tok/s ({r['output_tokens']} tokens)", flush=True)
        row = {"context": n, "thinkgate_runs": runs,
               "thinkgate_decode_tok_s": median([r["decode_tok_s"] for r in runs]),
               "thinkgate_ttft_s": statistics.median(r["ttft_s"] for r in runs),
               "llama_decode_tok_s": None, "llama_ttft_s": None}
        if args.llama_bench:
            pp = llama_bench(args.llama_bench, gguf, ["-p", str(n), "-n", "0", *extra], args.repeats)
            tg = llama_bench(args.llama_bench, gguf,
                             ["-p", "0", "-n", str(args.output_len), "-d", str(n), *extra], args.repeats)
            row["llama_prefill"], row["llama_decode"] = pp, tg
            row["llama_ttft_s"] = n / pp["tok_s"] if "tok_s" in pp else None
            row["llama_decode_tok_s"] = tg.get("tok_s")
            for name, t in (("pp", pp), ("tg", tg)):
                res = (f"{t['tok_s']:.2f} tok/s, samples {t['samples_ts']}" if "tok_s" in t
                       else f"FAILED {t['error']}")
                print(f"N={n} llama-bench {name}: {res}", flush=True)
        row["decode_ratio"] = ratio(row["thinkgate_decode_tok_s"], row["llama_decode_tok_s"])
        row["ttft_ratio"] = ratio(row["thinkgate_ttft_s"], row["llama_ttft_s"])
        results["contexts"].append(row)
    results["load_avg_end"] = os.getloadavg()
    m = results["machine"]
    print(f"\n{m['processor']}, {m['cpu_count']} CPUs, {m['cpu_capability']}; load average "
          f"{results['load_avg_start'][0]:.2f} at start, {results['load_avg_end'][0]:.2f} at end; "
          f"output {args.output_len} tokens, medians of {args.repeats}; thinkgate prefill chunk "
          f"{cfg.max_num_batched_tokens} (default)\n")
    print("| context | thinkgate decode tok/s | llama.cpp decode tok/s | ratio | thinkgate TTFT s "
          "| llama.cpp TTFT s | ratio |")
    print("|---:|---:|---:|---:|---:|---:|---:|")
    for r in results["contexts"]:
        keys = ("thinkgate_decode_tok_s", "llama_decode_tok_s", "decode_ratio", "thinkgate_ttft_s",
                "llama_ttft_s", "ttft_ratio")
        print(f"| {r['context']} | " + " | ".join(fmt(r[k], ".2f") for k in keys) + " |")
    print("\n(decode ratio = thinkgate / llama.cpp, higher is better for thinkgate; "
          "TTFT ratio = thinkgate / llama.cpp, lower is better for thinkgate)")
    if args.plot:
        print(plot(args.plot, results["contexts"]))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
