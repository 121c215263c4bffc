"""The CPU comparison behind BENCHMARKS.md: thinkgate vs llama.cpp (same GGUF) vs transformers (same weights).

    python benchmarks/cpu_compare.py --llama-server /path/to/llama-server [--llama-bench /path/to/llama-bench]
        [--skip-transformers] [--interleave [--repeats 6] [--levels 1,4,8] [--also-modes mixed,gguf-q8]
        [--serve-only]] [--out results/cpu.json]

Every figure is a median of several runs, peers measured in the same run on the same machine. With --interleave
both servers stay up (each idles at no CPU while the other works) and each level's rounds alternate between
them, in swapped order every other round, with each round's ratio reported: on a host whose speed drifts by
10-20 % within minutes, measuring one server's levels and then the other's minutes later moved the one-stream
ratio by more than the difference being measured (BENCHMARKS.md, "CPU, eleventh round"). llama.cpp
comes from llama-cpp-python's sources on the package index, built in a separate venv/folder (see
BENCHMARKS.md); it is not a dependency of thinkgate.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from thinkgate.bench.prompts import synthetic_prompts
from thinkgate.bench.serve import one_request, run_level
from thinkgate.models.default_model import pull_default_model

OUT_LEN = 128


def wait_ready(url: str, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"{url} not ready")


def serve_levels(base: str, model: str, levels=(1, 4, 8), repeats: int = 3) -> dict:
    out = {}
    for c in levels:
        runs = []
        for r in range(repeats):
            prompts = synthetic_prompts(max(4, 2 * c), 64, seed=100 * r + c, jitter=0.2)
            runs.append(asyncio.run(run_level(base + "/v1/chat/completions", model, prompts, c, OUT_LEN, True, None,
                                              600)))
        out[c] = {"output_tok_s": statistics.median(x["output_throughput"] for x in runs),
                  "ttft_s": statistics.median(x["ttft_s"]["median"] for x in runs),
                  "tpot_s": statistics.median(x["tpot_s"]["median"] for x in runs)}
        print(f"  concurrency {c}: {out[c]}", flush=True)
    return out


def serve_levels_interleaved(servers: dict[str, tuple[str, str]], levels=(1, 4, 8), repeats: int = 6) -> dict:
    """servers: name -> (base URL, model). Per level, `repeats` rounds, each server once a round (the order swapped
    every other round); medians per server and the first server's output tok/s over the second's, round by round."""
    names = list(servers)
    out: dict = {n: {} for n in names}
    ratios: dict = {}
    for c in levels:
        runs: dict = {n: [] for n in names}
        for r in range(repeats):
            prompts = synthetic_prompts(max(4, 2 * c), 64, seed=100 * r + c, jitter=0.2)
            for n in (names if r % 2 == 0 else names[::-1]):
                base, model = servers[n]
                runs[n].append(asyncio.run(run_level(base + "/v1/chat/completions", model, prompts, c, OUT_LEN, True,
                                                     None, 600)))
        for n in names:
            out[n][c] = {"output_tok_s": statistics.median(x["output_throughput"] for x in runs[n]),
                         "ttft_s": statistics.median(x["ttft_s"]["median"] for x in runs[n]),
                         "tpot_s": statistics.median(x["tpot_s"]["median"] for x in runs[n]),
                         "rounds_output_tok_s": [x["output_throughput"] for x in runs[n]]}
        # Each server against the last one (llama.cpp), round by round: the first server's in `ratios`, as before;
        # with more than two servers every other's too, under its name.
        for i, n in enumerate(names[:-1]):
            rs = [a["output_throughput"] / b["output_throughput"]
                  for a, b in zip(runs[n], runs[names[-1]], strict=True)]
            if i == 0:
                ratios[c] = {"per_round": rs, "median": statistics.median(rs)}
            else:
                ratios.setdefault(n, {})[c] = {"per_round": rs, "median": statistics.median(rs)}
        print(f"  concurrency {c}: " + "; ".join(f"{n} {out[n][c]}" for n in names) + f"; ratios {ratios.get(c)}",
              flush=True)
    return {"servers": out, "ratios": ratios}


async def _ttft(url: str, model: str, prompt: str) -> float:
    async with httpx.AsyncClient(timeout=600) as client:
        r = await one_request(client, url, model, prompt, 1, True, {})
    return r.ttft


def ttft_512(base: str, model: str, repeats: int = 5) -> float:
    prompts = synthetic_prompts(repeats, 512, seed=7)
    return statistics.median(asyncio.run(_ttft(base + "/v1/chat/completions", model, p)) for p in prompts)


def prefix_gain(base: str, model: str, repeats: int = 3) -> dict:
    cold, warm = [], []
    for r in range(repeats):
        a, b = synthetic_prompts(2, 2000, seed=1000 + r, shared_prefix_len=1980)
        cold.append(asyncio.run(_ttft(base + "/v1/chat/completions", model, a)))
        warm.append(asyncio.run(_ttft(base + "/v1/chat/completions", model, b)))
    return {"cold_ttft_s": statistics.median(cold), "warm_ttft_s": statistics.median(warm),
            "ratio": statistics.median(cold) / statistics.median(warm)}


def run_server(cmd: list[str], health: str, log: Path) -> subprocess.Popen:
    proc = subprocess.Popen(cmd, stdout=open(log, "w"), stderr=subprocess.STDOUT)
    wait_ready(health, proc)
    return proc


def transformers_generate(gguf: Path, repeats: int = 3) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from thinkgate.devtools.gguf_export import gguf_to_hf_dir

    d = gguf_to_hf_dir(gguf, Path(tempfile.mkdtemp()) / "hf")
    model = AutoModelForCausalLM.from_pretrained(d, dtype=torch.bfloat16).eval()
    res = {}
    for batch in (1, 8):
        ids = torch.randint(100, 20000, (batch, 64))
        rates = []
        for _ in range(repeats):
            t = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=OUT_LEN,
                               min_new_tokens=OUT_LEN, do_sample=False)
            rates.append(batch * OUT_LEN / (time.perf_counter() - t))
        res[batch] = statistics.median(rates)
        print(f"  transformers bf16 batch {batch}: {res[batch]:.1f} tok/s", flush=True)
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--llama-server", default=None)
    ap.add_argument("--llama-bench", default=None)
    ap.add_argument("--skip-transformers", action="store_true")
    ap.add_argument("--weight-quant", default="auto")
    ap.add_argument("--head-quant", default="auto")
    ap.add_argument("--out", default="results/cpu.json")
    ap.add_argument("--interleave", action="store_true",
                    help="both servers up at once, each level's rounds alternating between them (needs --llama-server)")
    ap.add_argument("--repeats", type=int, default=6, help="rounds per level with --interleave")
    ap.add_argument("--levels", default="1,4,8", help="concurrency levels with --interleave")
    ap.add_argument("--also-modes", default="", help="with --interleave: more thinkgate servers, one per weight mode "
                    "named here (comma-separated), in the same rounds")
    ap.add_argument("--serve-only", action="store_true", help="with --interleave: the levels only (no 512-word TTFT, "
                    "no shared-prefix gain)")
    args = ap.parse_args()
    gguf = pull_default_model()
    results: dict = {"machine": machine_info()}
    logs = Path(tempfile.mkdtemp())
    if args.interleave:
        if not args.llama_server:
            raise SystemExit("--interleave needs --llama-server")
        interleaved(args, gguf, results, logs)
    else:
        sequential(args, gguf, results, logs)
    if args.llama_bench:
        out = subprocess.run([args.llama_bench, "-m", str(gguf), "-t", "2", "-p", "512", "-n", "128", "-r", "3",
                              "-o", "json"], capture_output=True, text=True)
        results["llama-bench"] = json.loads(out.stdout) if out.returncode == 0 else out.stderr[-500:]
    if not args.skip_transformers:
        print("transformers", flush=True)
        results["transformers"] = transformers_generate(gguf)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(results, indent=2))
    print(json.dumps(results, indent=2))


def thinkgate_cmd(args, port: int, weight_quant: str | None = None) -> list[str]:
    return [sys.executable, "-m", "thinkgate.cli", "serve", "--port", str(port), "--log-level", "warning",
            "--weight-quant", weight_quant or args.weight_quant, "--head-quant", args.head_quant]


def llama_cmd(args, gguf: Path, port: int) -> list[str]:
    return [args.llama_server, "-m", str(gguf), "-t", "2", "-np", "8", "-c", str(8 * 2560), "--port", str(port),
            "--host", "127.0.0.1"]


def interleaved(args, gguf: Path, results: dict, logs: Path) -> None:
    model = "qwen/qwen2.5-coder-0.5b-instruct"
    procs = [run_server(thinkgate_cmd(args, 8101), "http://127.0.0.1:8101/health", logs / "thinkgate.log")]
    servers = {"thinkgate": ("http://127.0.0.1:8101", model)}
    try:
        # Other weight modes of ours side by side (e.g. the first round's `mixed`), each its own server.
        for i, mode in enumerate(m for m in args.also_modes.split(",") if m):
            port = 8103 + i
            procs.append(run_server(thinkgate_cmd(args, port, mode), f"http://127.0.0.1:{port}/health",
                                    logs / f"thinkgate-{mode}.log"))
            servers[f"thinkgate {mode}"] = (f"http://127.0.0.1:{port}", model)
        procs.append(run_server(llama_cmd(args, gguf, 8102), "http://127.0.0.1:8102/health", logs / "llama.log"))
        servers["llama.cpp"] = ("http://127.0.0.1:8102", "default")
        print("servers up, levels interleaved", flush=True)
        inter = serve_levels_interleaved(servers, levels=tuple(int(c) for c in args.levels.split(",")),
                                         repeats=args.repeats)
        results["ratios"] = inter["ratios"]
        for name, (base, model) in servers.items():
            results[name] = {"serve": inter["servers"][name]}
            if not args.serve_only:
                results[name] |= {"ttft_512_s": ttft_512(base, model), "prefix": prefix_gain(base, model)}
                print(f"  {name}", results[name]["ttft_512_s"], results[name]["prefix"], flush=True)
    finally:
        for proc in procs:
            proc.terminate()
            proc.wait()


def sequential(args, gguf: Path, results: dict, logs: Path) -> None:
    print("thinkgate", flush=True)
    port = 8101
    proc = run_server(thinkgate_cmd(args, port), f"http://127.0.0.1:{port}/health", logs / "thinkgate.log")
    try:
        base = f"http://127.0.0.1:{port}"
        model = "qwen/qwen2.5-coder-0.5b-instruct"
        results["thinkgate"] = {"serve": serve_levels(base, model), "ttft_512_s": ttft_512(base, model),
                                "prefix": prefix_gain(base, model)}
        print("  ", results["thinkgate"]["ttft_512_s"], results["thinkgate"]["prefix"], flush=True)
    finally:
        proc.terminate()
        proc.wait()

    if args.llama_server:
        print("llama.cpp server", flush=True)
        port = 8102
        proc = run_server(llama_cmd(args, gguf, port), f"http://127.0.0.1:{port}/health", logs / "llama.log")
        try:
            base = f"http://127.0.0.1:{port}"
            results["llama.cpp"] = {"serve": serve_levels(base, "default"), "ttft_512_s": ttft_512(base, "default"),
                                    "prefix": prefix_gain(base, "default")}
            print("  ", results["llama.cpp"]["ttft_512_s"], results["llama.cpp"]["prefix"], flush=True)
        finally:
            proc.terminate()
            proc.wait()


def machine_info() -> dict:
    import platform

    import torch

    cpu = ""
    if os.path.exists("/proc/cpuinfo"):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cpu": cpu, "cores": os.cpu_count(), "torch": torch.__version__, "python": platform.python_version(),
            "isa": torch.backends.cpu.get_cpu_capability(), "threads": torch.get_num_threads()}


if __name__ == "__main__":
    main()
