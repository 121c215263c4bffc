"""Resident memory of `thinkgate serve` against llama.cpp's `llama-server` on the same GGUF (issue 23).

Each server is started alone, answers one warm-up chat request (greedy, 32 tokens), and its resident set is
read from /proc (VmRSS of the server and any processes it started; RssAnon and RssFile of the server split it).
Configurations:
  - `8x8192`: both configured for 8 sequences of 8192 tokens: thinkgate `--max-model-len 8192 --max-num-seqs 8`,
    llama-server `-np 8 -c 65536` (llama.cpp's -c is the total context, shared by the slots);
  - `defaults`: each server with its own defaults (llama-server: the model's training context and its automatic
    slot count).
thinkgate's own split (weights / KV pool / the rest) is taken from its log line.

    python benchmarks/memory_compare.py --llama-server /tmp/llamacpp/bin/llama-server [--runs 2] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

CONFIGS = {
    "8x8192": (["--max-model-len", "8192", "--max-num-seqs", "8"], ["-np", "8", "-c", "65536"]),
    "defaults": ([], []),
}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def status(pid: int) -> dict[str, int]:
    out = {}
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            key = line.split(":")[0]
            if key in ("VmRSS", "RssAnon", "RssFile", "VmHWM"):
                out[key] = int(line.split()[1]) * 1024
    return out


def tree_rss(pid: int) -> int:
    """VmRSS of `pid` and its descendants (a server that forks workers counts them too)."""
    total, todo = 0, [pid]
    while todo:
        p = todo.pop()
        try:
            total += status(p)["VmRSS"]
            with open(f"/proc/{p}/task/{p}/children") as f:
                todo += [int(c) for c in f.read().split()]
        except (OSError, KeyError):
            continue
    return total


def get_json(url: str, body: dict | None = None, timeout: float = 600) -> dict:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.loads(r.read())


def wait_ready(base: str, proc: subprocess.Popen, timeout: float) -> str:
    """The served model's id, once /v1/models answers."""
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}")
        try:
            return get_json(base + "/v1/models", timeout=5)["data"][0]["id"]
        except Exception:
            time.sleep(1)
    raise TimeoutError(f"{base} not ready after {timeout:.0f} s")


def measure(cmd: list[str], port: int, env: dict | None = None, timeout: float = 900) -> dict:
    with tempfile.NamedTemporaryFile("w+", suffix=".log") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(env or {})})
        try:
            base = f"http://127.0.0.1:{port}"
            model = wait_ready(base, proc, timeout)
            loaded = status(proc.pid)
            t0 = time.monotonic()
            get_json(base + "/v1/chat/completions", {
                "model": model, "temperature": 0, "max_tokens": 32,
                "messages": [{"role": "user", "content": "Write a Python function that reverses a string."}]})
            warm_s = time.monotonic() - t0
            time.sleep(1)
            after = status(proc.pid)
            res = {"rss": tree_rss(proc.pid), "rss_anon": after.get("RssAnon", 0), "rss_file": after.get("RssFile", 0),
                   "rss_loaded": loaded["VmRSS"], "peak": after.get("VmHWM", 0), "warmup_s": warm_s}
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        log.seek(0)
        text = log.read()
    m = re.search(r"resident memory after loading: ([\d,]+) MiB = weights ([\d,]+) MiB \+ KV pool ([\d,]+) MiB "
                  r"\+ the rest (-?[\d,]+) MiB", text)
    if m:
        res["split_mib"] = dict(zip(("rss", "weights", "kv", "rest"),
                                    (int(g.replace(",", "")) for g in m.groups()), strict=True))
    kv = re.search(r"KV cache: (\d+) tokens \(.*?\) in (\w+), ([\d.]+) MiB", text)
    if kv:
        res["kv"] = {"tokens": int(kv[1]), "dtype": kv[2], "mib": float(kv[3])}
    llama_kv = re.search(r"llama_kv_cache: size = +([\d.]+) MiB \((\d+) cells", text)
    if llama_kv:
        res["kv"] = {"mib": float(llama_kv[1]), "tokens": int(llama_kv[2])}
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--llama-server", required=True)
    ap.add_argument("--gguf", default=None, help="default: thinkgate's default model (fetched if needed)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--runs", type=int, default=2)
    ap.add_argument("--configs", default="8x8192,defaults")
    ap.add_argument("--thinkgate-args", default="", help="extra thinkgate serve arguments (e.g. --kv-cache-dtype float32)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    from thinkgate.models.default_model import pull_default_model

    gguf = args.gguf or str(pull_default_model())
    results: dict = {}
    for name in args.configs.split(","):
        ours_extra, theirs_extra = CONFIGS[name]
        for run in range(args.runs):  # alternate the two servers
            port = free_port()
            ours = [sys.executable, "-m", "thinkgate.cli", "serve", "--model", gguf, "--port", str(port),
                    "--db", f"sqlite:///{tempfile.mkdtemp()}/tg.db", *ours_extra, *args.thinkgate_args.split()]
            r = measure(ours, port, env={"OMP_NUM_THREADS": str(args.threads)})
            results.setdefault(name, {}).setdefault("thinkgate", []).append(r)
            print(name, "thinkgate", run, json.dumps(r), flush=True)
            port = free_port()
            theirs = [args.llama_server, "-m", gguf, "--port", str(port), "-t", str(args.threads), *theirs_extra]
            r = measure(theirs, port)
            results[name].setdefault("llama.cpp", []).append(r)
            print(name, "llama.cpp", run, json.dumps(r), flush=True)
    print("\n| config | thinkgate RSS (MiB) | llama-server RSS (MiB) | ratio |")
    print("| --- | ---: | ---: | ---: |")
    for name, by in results.items():
        ours = statistics.median(r["rss"] for r in by["thinkgate"]) / 2**20
        theirs = statistics.median(r["rss"] for r in by["llama.cpp"]) / 2**20
        print(f"| {name} | {ours:,.0f} | {theirs:,.0f} | {ours / theirs:.2f}x |")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
