"""How faithful each CPU weight mode, and llama.cpp, is to the exact default model (issue 19).

The exact model is our engine in float32 on the GGUF's dequantized weights (`--dtype float32 --weight-quant
none`, an fp32 KV pool), which matches transformers. It writes a greedy answer of --tokens tokens (stopping
at <|im_end|>) to each of 18 varied chat prompts (code in several languages, Chinese, prose, math, data);
then every mode in --modes answers the same prompt token ids the same way, and so does llama.cpp's
llama-server on the same GGUF where --llama-server is given (pure greedy: the top_k sampler alone, k=1).
Per mode: how many answers are text-identical to the exact ones, and the mean common prefix in characters
(with the exact answers' mean length for scale). Texts are compared, not token ids, so two tokenizations of
one text count as the same answer.

Prompts run one at a time (one sequence per engine step), so a mode's batched numerics (W8A8's activation
scale per call) do not enter; --batched submits them all at once, the rows a loaded server's steps have (the
exact answers are always computed one at a time). The exact model is slow on a small CPU: --reference-cache
FILE keeps its answers for reruns (reused only for the same model, prompts and --tokens).

    python benchmarks/fidelity.py [--modes none,w8a8,int4,int8,gguf] [--dtype auto] [--kv-cache-dtype auto]
        [--batched] [--tokens 96] [--llama-server /tmp/llamacpp/bin/llama-server] [--reference-cache FILE]
        [--json FILE]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import torch

from thinkgate.chat.template import render_chat
from thinkgate.config import EngineConfig
from thinkgate.engine.llm_engine import LLMEngine
from thinkgate.models.default_model import pull_default_model
from thinkgate.models.loader import load_model
from thinkgate.sampling.params import SamplingParams

PROMPTS = [
    "Write a Python function that returns the n-th Fibonacci number iteratively.",
    "Write a SQL query that finds the three customers with the highest total order value.",
    "Write a JavaScript function that deep-clones a plain object without using JSON.",
    "Implement a singly linked list reversal in C.",
    "Write a Rust function that counts word frequencies in a string using a HashMap.",
    "Write a bash script that backs up every .conf file in /etc to a dated tar.gz archive.",
    "用 Python 写一个快速排序函数，并加上中文注释。",
    "请用三句话解释什么是 HTTP 缓存。",
    "把下面这句话翻译成英文：今天的天气很好，我们去公园散步吧。",
    "Explain the difference between a process and a thread to a new programmer.",
    "Write a short poem about the sea at night.",
    "A train travels 180 km in 2.5 hours. What is its average speed in km/h? Show your steps.",
    "Solve for x: 3x + 7 = 22. Explain each step.",
    "What is the derivative of x^3 * sin(x)?",
    "Give me a JSON object describing a book with title, author, year and a list of genres.",
    "Write a regular expression that matches an email address and explain its parts.",
    "What are the main differences between TCP and UDP?",
    "Write a Go HTTP handler that returns the current time as JSON.",
]


def common_prefix(a: str, b: str) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def engine_answers(gguf: str, dtype: str, weight_quant: str, kv: str, prompts: list[list[int]], tokens: int,
                   batched: bool) -> list[list[int]]:
    """Greedy answers from our engine; its model and engine are freed before returning (one model in memory)."""
    cfg = EngineConfig(max_model_len=2048, max_num_seqs=len(prompts) if batched else 1, dtype=dtype,
                       weight_quant=weight_quant, kv_cache_dtype=kv, enable_prefix_caching=False)
    lm = load_model(gguf, dtype=cfg.dtype, device="cpu", max_model_len=cfg.max_model_len,
                    weight_quant=cfg.weight_quant, head_quant=cfg.head_quant, cpu_kernels=cfg.cpu_kernels)
    eng = LLMEngine(lm, cfg)
    params = SamplingParams(temperature=0, max_tokens=tokens)
    try:
        if batched:
            return eng.generate(prompts, params)
        return [eng.generate([p], params)[0] for p in prompts]
    finally:
        del eng, lm
        gc.collect()


def post(url: str, body: dict | None = None, timeout: float = 600) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def llama_answers(server: str, gguf: str, prompts: list[list[int]], tokens: int) -> tuple[list[dict], dict]:
    """Greedy answers from llama-server on the same GGUF, fed our prompt token ids (so both see one prompt)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    log = tempfile.NamedTemporaryFile("w+", prefix="llama-server-", suffix=".log", delete=False)
    env = dict(os.environ, LD_LIBRARY_PATH=os.pathsep.join(
        p for p in (str(Path(server).resolve().parent), os.environ.get("LD_LIBRARY_PATH")) if p))
    proc = subprocess.Popen([server, "-m", gguf, "-t", str(min(2, os.cpu_count() or 2)), "-c", "4096", "-np", "1",
                             "--no-warmup", "--host", "127.0.0.1", "--port", str(port)],
                            stdout=log, stderr=subprocess.STDOUT, env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"llama-server exited ({proc.returncode}); see {log.name}")
            try:
                if post(base + "/health", timeout=5).get("status") == "ok":
                    break
            except OSError:
                pass  # not listening yet, or 503 while the model loads
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama-server not healthy after 300 s; see {log.name}")
            time.sleep(0.5)
        try:
            props = post(base + "/props")
            info = {k: props.get(k) for k in ("build_info", "model_path") if k in props}
        except OSError:
            info = {}
        out = []
        for ids in prompts:
            # samplers=[top_k] with k=1 is pure argmax (no penalties, no min_p/top_p on the way); the prompt
            # is token ids, not text, so llama.cpp's own tokenizer and template cannot change it.
            r = post(base + "/completion", {"prompt": ids, "n_predict": tokens, "temperature": 0, "top_k": 1,
                                            "samplers": ["top_k"], "cache_prompt": False, "return_tokens": True})
            if r.get("tokens_evaluated") not in (None, len(ids)):
                raise RuntimeError(f"llama-server evaluated {r['tokens_evaluated']} prompt tokens, not {len(ids)}")
            out.append({"content": r["content"], "tokens": r.get("tokens") or [], "stop_type": r.get("stop_type")})
        return out, info
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def score(exact: list[str], texts: list[str]) -> tuple[dict, list[int]]:
    prefix = [common_prefix(a, b) for a, b in zip(exact, texts, strict=True)]
    same = sum(a == b for a, b in zip(exact, texts, strict=True))
    return {"identical": same, "n": len(exact), "mean_common_prefix_chars": sum(prefix) / len(prefix),
            "mean_exact_chars": sum(map(len, exact)) / len(exact)}, prefix


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--modes", default="none,w8a8,int4,int8,gguf", help="comma list of --weight-quant values")
    ap.add_argument("--dtype", default="auto", help="the compared modes' dtype (the exact model is float32)")
    ap.add_argument("--kv-cache-dtype", default="auto", help="the compared modes' KV pool (the exact one: float32)")
    ap.add_argument("--tokens", type=int, default=96)
    ap.add_argument("--batched", action="store_true", help="each mode answers all prompts at once")
    ap.add_argument("--llama-server", default=None, help="path of a llama-server binary to compare too")
    ap.add_argument("--reference-cache", default=None, help="JSON file for the exact answers (read, else written)")
    ap.add_argument("--json", default=None, help="write the results with every prompt's texts here")
    args = ap.parse_args()
    t0 = time.monotonic()
    gguf = str(pull_default_model())
    from thinkgate.models.gguf_file import GGUFModel  # the tokenizer alone, without building a model

    tok = GGUFModel(gguf).tokenizer()
    prompts = [tok.encode(render_chat(tok.chat_template, [{"role": "user", "content": p}])) for p in PROMPTS]
    result = {"machine": {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
                          "cpu_count": os.cpu_count(), "torch": torch.__version__,
                          "cpu_capability": torch.backends.cpu.get_cpu_capability(),
                          "torch_threads": torch.get_num_threads()},
              "load_avg_start": os.getloadavg(), "model": gguf, "tokens": args.tokens, "batched": args.batched,
              "dtype": args.dtype, "kv_cache_dtype": args.kv_cache_dtype, "prompts": PROMPTS, "rows": {}}

    def save() -> None:
        if args.json:
            Path(args.json).write_text(json.dumps(result, indent=1, ensure_ascii=False))

    key = {"model": gguf, "tokens": args.tokens, "prompt_ids": prompts}
    cache = Path(args.reference_cache) if args.reference_cache else None
    cached = json.loads(cache.read_text()) if cache and cache.exists() else None
    if cached and cached.get("key") == key:
        exact_ids = cached["answers"]
        print(f"exact answers from {cache}", flush=True)
    else:
        t = time.monotonic()
        exact_ids = engine_answers(gguf, "float32", "none", "float32", prompts, args.tokens, batched=False)
        print(f"exact answers: {time.monotonic() - t:.0f} s", flush=True)
        if cache:
            cache.write_text(json.dumps({"key": key, "answers": exact_ids}))
    exact = [tok.decode(a) for a in exact_ids]
    result["exact"] = [{"text": x, "tokens": len(a)} for x, a in zip(exact, exact_ids, strict=True)]
    save()

    def record(name: str, texts: list[str], extra: dict, per_prompt: list[dict]) -> None:
        summary, prefix = score(exact, texts)
        for d, x, e, n in zip(per_prompt, texts, exact, prefix, strict=True):
            d.update(text=x, identical=x == e, common_prefix_chars=n)
        result["rows"][name] = {**summary, **extra, "answers": per_prompt}
        print(f"{name}: {summary['identical']}/{summary['n']} identical, mean common prefix "
              f"{summary['mean_common_prefix_chars']:.1f} chars", flush=True)
        save()

    for mode in [m for m in args.modes.split(",") if m]:
        t = time.monotonic()
        try:
            ids = engine_answers(gguf, args.dtype, mode, args.kv_cache_dtype, prompts, args.tokens, args.batched)
        except ValueError as e:  # a mode this build or machine does not have
            result["rows"][mode] = {"unavailable": str(e)}
            print(f"{mode}: unavailable ({e})", flush=True)
            save()
            continue
        record(mode, [tok.decode(a) for a in ids], {"seconds": round(time.monotonic() - t, 1)},
               [{"tokens": len(a)} for a in ids])

    if args.llama_server:
        t = time.monotonic()
        answers, info = llama_answers(args.llama_server, gguf, prompts, args.tokens)
        # Our decoding of its tokens, so both sides are detokenized alike; its own content is kept to check.
        texts = [tok.decode(a["tokens"]) if a["tokens"] else a["content"] for a in answers]
        record("llama.cpp", texts, {"seconds": round(time.monotonic() - t, 1), "server": info},
               [{"tokens": len(a["tokens"]), "stop_type": a["stop_type"], "content_matches": a["content"] == x}
                for a, x in zip(answers, texts, strict=True)])

    print(f"\n{len(PROMPTS)} prompts, {args.tokens} tokens greedy, vs the exact fp32 model "
          f"({'batched' if args.batched else 'one at a time'}; dtype {args.dtype}, KV {args.kv_cache_dtype}; "
          f"{result['machine']['cpu_capability']}, {os.cpu_count()} CPUs)\n")
    print("| mode | identical answers | mean common prefix chars | mean exact length |")
    print("|---|---|---|---|")
    for name, r in result["rows"].items():
        if "unavailable" in r:
            print(f"| {name} | unavailable | | |")
        else:
            print(f"| {name} | {r['identical']}/{r['n']} | {r['mean_common_prefix_chars']:.1f} | "
                  f"{r['mean_exact_chars']:.1f} |")
    result["seconds"] = round(time.monotonic() - t0, 1)
    save()
    print(f"\n{result['seconds']:.0f} s in all")


if __name__ == "__main__":
    main()
