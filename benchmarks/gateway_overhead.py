"""What the gateway path (auth, limits, hold, capture) adds to a request, with a provider that answers at once.

    python benchmarks/gateway_overhead.py [--requests 1000] [--concurrency 16] [--postgres URL]

Each configuration runs in a server process of its own (uvicorn, as `thinkgate serve` runs it); this process
is the client. Configurations: no gateway at all; `--no-auth` (usage metered under the anonymous account);
keys required on SQLite; with --postgres, `--no-auth` and keys required on PostgreSQL (`--only` picks some). Latency: sequential requests on one
keep-alive connection (p50, p99), and the server process's CPU per request over them; throughput:
`--concurrency` clients at once (requests per second), from Python (httpx, which on two cores takes about as
much CPU as the server) and, where `wrk` is installed (Debian's package), from wrk, a C client that leaves
the server the cores: the figure for what one server process can do.
Results print as JSON lines; the median of `--repeats` runs of each figure is what BENCHMARKS.md quotes.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

MSGS = [{"role": "user", "content": "hi"}]


def serve(mode: str, db_url: str | None, port: int) -> None:
    import uvicorn

    from thinkgate.api.app import create_app
    from thinkgate.gateway.limits import MemoryRateLimiter
    from thinkgate.gateway.money import Price
    from thinkgate.gateway.providers.base import ChunkEvent, PreparedRequest, UsageEvent, UsageRecord
    from thinkgate.gateway.service import Gateway
    from thinkgate.storage.db import Database

    class Instant:
        """Answers every request at once: what remains is the API's and the gateway's own time."""

        model_id = "fast"

        def card(self):
            return {"id": self.model_id, "object": "model", "created": 0, "owned_by": "bench"}

        def num_active(self):
            return 0

        async def prepare(self, params):
            return PreparedRequest(params, "none", prompt_tokens=10, max_tokens=params.max_tokens or 16)

        async def stream(self, prep, ctx):
            yield ChunkEvent([{"index": 0, "delta": {"role": "assistant", "content": "ok"}, "logprobs": None,
                               "finish_reason": None}])
            yield ChunkEvent([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop",
                               "native_finish_reason": "eos"}])
            yield UsageEvent(UsageRecord(ctx.request_id, self.model_id, 1, 10, 0, 1, 0, "stop", "eos", "finished",
                                         0.0, 0.0))

    gateway = None
    if mode != "none":
        db = Database(db_url)
        gateway = Gateway(db, {"fast": Price.cny("0.00275", "0.0095")}, require_keys=mode == "keys",
                          limiter=MemoryRateLimiter())
        gateway.start_sync()
    app = create_app({"fast": Instant()}, gateway=gateway)
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def make_key(db_url: str) -> str:
    from thinkgate.gateway.keys import display_prefix, hash_secret, new_secret
    from thinkgate.gateway.money import to_units
    from thinkgate.storage.accounts import AccountStore
    from thinkgate.storage.db import Database

    db = Database(db_url)
    db.upgrade()
    store = AccountStore(db)
    name = f"bench-{os.getpid()}-{time.monotonic_ns()}"
    store.create_account(name, balance_units=to_units("1000000"))
    secret = new_secret()
    store.create_key(name, name, hash_secret(secret), display_prefix(secret), rpm=10**6, tpm=10**9,
                     concurrency=1000)
    db.dispose()
    return secret


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(mode: str, db_url: str | None) -> tuple[subprocess.Popen, str]:
    port = free_port()
    proc = subprocess.Popen([sys.executable, __file__, "--serve", mode, "--port", str(port)]
                            + (["--db", db_url] if db_url else []))
    base = f"http://127.0.0.1:{port}"
    for _ in range(300):
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return proc, base
        except httpx.HTTPError:
            time.sleep(0.1)
    raise RuntimeError(f"{mode} server did not start")


def latency(base: str, headers: dict, n: int) -> list[float]:
    body = {"model": "fast", "messages": MSGS, "max_tokens": 16}
    out = []
    with httpx.Client(base_url=base, headers=headers, timeout=30) as c:
        for i in range(n + 50):
            t = time.perf_counter()
            r = c.post("/v1/chat/completions", json=body)
            dt = time.perf_counter() - t
            assert r.status_code == 200, r.text
            if i >= 50:  # warm-up
                out.append(dt * 1000)
    return out


async def throughput(base: str, headers: dict, n: int, concurrency: int) -> float:
    body = {"model": "fast", "messages": MSGS, "max_tokens": 16}
    todo = iter(range(n))
    async with httpx.AsyncClient(base_url=base, headers=headers, timeout=30,
                                 limits=httpx.Limits(max_connections=concurrency)) as c:
        async def worker():
            for _ in todo:
                r = await c.post("/v1/chat/completions", json=body)
                assert r.status_code == 200, r.text

        t = time.perf_counter()
        await asyncio.gather(*(worker() for _ in range(concurrency)))
        return n / (time.perf_counter() - t)


def wrk(base: str, headers: dict, concurrency: int, seconds: float) -> float | None:
    """Requests per second from wrk (None without it); any non-2xx answer fails the run."""
    if shutil.which("wrk") is None:
        return None
    body = json.dumps({"model": "fast", "messages": MSGS, "max_tokens": 16})
    script = "".join([f"wrk.method = 'POST'\nwrk.body = {json.dumps(body)}\n",
                      "wrk.headers['Content-Type'] = 'application/json'\n",
                      *(f"wrk.headers[{json.dumps(k)}] = {json.dumps(v)}\n" for k, v in headers.items())])
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(script)
    try:
        out = subprocess.run(["wrk", "-t1", f"-c{concurrency}", f"-d{seconds:g}s", "-s", f.name,
                              base + "/v1/chat/completions"], capture_output=True, text=True, check=True).stdout
    finally:
        os.unlink(f.name)
    if "Non-2xx" in out:
        raise RuntimeError(f"wrk got errors:\n{out}")
    return float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))


def cpu_seconds(pid: int) -> float:
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve", default=None)
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--db", default=None)
    ap.add_argument("--requests", type=int, default=1000)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--wrk-seconds", type=float, default=10.0)
    ap.add_argument("--postgres", default=os.environ.get("THINKGATE_TEST_POSTGRES_URL"))
    ap.add_argument("--only", default=None, help="run only these configurations: comma-separated of "
                    "none, open, sqlite, open-postgres, postgres")
    args = ap.parse_args()
    if args.serve:
        return serve(args.serve, args.db, args.port)
    tmp = tempfile.mkdtemp(prefix="thinkgate-bench-")
    configs = [("no gateway", "none", None), ("--no-auth (metered)", "open", f"sqlite:///{tmp}/open.db"),
               ("keys, SQLite", "keys", f"sqlite:///{tmp}/keys.db")]
    if args.postgres:
        configs += [("--no-auth (metered), PostgreSQL", "open", args.postgres),
                    ("keys, PostgreSQL", "keys", args.postgres)]
    if args.only:
        wanted = set(args.only.split(","))
        short = {"no gateway": "none", "--no-auth (metered)": "open", "keys, SQLite": "sqlite",
                 "--no-auth (metered), PostgreSQL": "open-postgres", "keys, PostgreSQL": "postgres"}
        configs = [c for c in configs if short[c[0]] in wanted]
    # Repeats interleave the configurations (each round runs every one), so a change in the machine's load
    # falls on all of them alike rather than on whichever ran at that moment.
    runs: dict[str, list] = {name: [] for name, _, _ in configs}
    for _ in range(args.repeats):
        for name, mode, db_url in configs:
            runs[name].append(measure(mode, db_url, args))
    for name, _, _ in configs:
        p50, p99, rps, cpu_ms, rps_wrk = (statistics.median(r[k] for r in runs[name]) for k in range(5))
        print(json.dumps({"config": name, "p50_ms": round(p50, 3), "p99_ms": round(p99, 3),
                          "p50_ms_runs": [round(r[0], 3) for r in runs[name]],
                          "server_cpu_ms_per_request": round(cpu_ms, 3), "requests_per_s": round(rps, 1),
                          "requests_per_s_wrk": round(rps_wrk, 1) if rps_wrk else None, "runs": args.repeats,
                          "requests": args.requests, "concurrency": args.concurrency,
                          "load_average_1m": round(os.getloadavg()[0], 2)}), flush=True)


def measure(mode: str, db_url: str | None, args) -> tuple:
    """One run of one configuration: (p50 ms, p99 ms, requests/s from httpx, server CPU ms per request,
    requests/s from wrk or 0)."""
    headers = {"Authorization": f"Bearer {make_key(db_url)}"} if mode == "keys" else {}
    proc, base = start(mode, db_url)
    try:
        latency(base, headers, 50)
        c0 = cpu_seconds(proc.pid)
        lat = latency(base, headers, args.requests)
        cpu_ms = (cpu_seconds(proc.pid) - c0) / (args.requests + 50) * 1000
        rps = asyncio.run(throughput(base, headers, args.requests, args.concurrency))
        rps_wrk = wrk(base, headers, args.concurrency, args.wrk_seconds)
    finally:
        proc.terminate()
        proc.wait()
    return statistics.median(lat), pct(lat, 0.99), rps, cpu_ms, rps_wrk or 0.0

if __name__ == "__main__":
    main()
