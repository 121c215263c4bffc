"""How long the server takes to answer a cheap request (`GET /health`) while it decodes a stream: whether the
event loop runs during the engine's steps (the kernels release the GIL) or waits for the gaps between them.

    python benchmarks/loop_during_decode.py [--model M] [--tokens 300] [--rounds 3]

Starts `thinkgate serve` on a free port, streams one long greedy answer, and meanwhile GETs /health every
~40 ms from another thread; prints p50 / p90 / max latency per round and their medians. To compare two
checkouts, run it with each one's `src` first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_compare import run_server  # noqa: E402


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def one_round(base: str, model: str, tokens: int) -> list[float]:
    done, lat = threading.Event(), []

    def stream() -> None:
        body = {"model": model, "messages": [{"role": "user", "content": "Write a long story about a cat."}],
                "max_tokens": tokens, "ignore_eos": True, "stream": True, "temperature": 0}
        try:
            with httpx.stream("POST", base + "/v1/chat/completions", timeout=600, json=body) as r:
                for _ in r.iter_lines():
                    pass
        finally:
            done.set()

    worker = threading.Thread(target=stream)
    worker.start()
    time.sleep(2.0)  # past the prefill: only decode steps from here
    with httpx.Client() as client:
        while not done.is_set():
            t0 = time.perf_counter()
            client.get(base + "/health")
            lat.append(time.perf_counter() - t0)
            time.sleep(0.037)  # not a multiple of a step
    worker.join()
    return sorted(lat)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=None, help="what `thinkgate serve` serves (default: its default model)")
    ap.add_argument("--tokens", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()
    port = free_port()
    cmd = [sys.executable, "-m", "thinkgate.cli", "serve", "--port", str(port), "--log-level", "warning"]
    if args.model:
        cmd += ["--model", args.model]
    proc = run_server(cmd, f"http://127.0.0.1:{port}/health", Path(tempfile.mkdtemp()) / "serve.log")
    base = f"http://127.0.0.1:{port}"
    try:
        model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
        rows = []
        for r in range(args.rounds):
            lat = one_round(base, model, args.tokens)
            row = (statistics.median(lat), lat[int(0.9 * len(lat))], lat[-1])
            rows.append(row)
            print(f"round {r + 1}: n={len(lat)} p50 {row[0] * 1e3:.1f} ms, p90 {row[1] * 1e3:.1f} ms, "
                  f"max {row[2] * 1e3:.1f} ms", flush=True)
        med = [statistics.median(x[i] for x in rows) * 1e3 for i in range(3)]
        print(f"medians of {args.rounds} rounds: p50 {med[0]:.1f} ms, p90 {med[1]:.1f} ms, max {med[2]:.1f} ms")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
