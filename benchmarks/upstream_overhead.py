"""What a thinkgate gateway adds in front of an OpenAI-compatible upstream: time to first token, each token's
delay, and the gateway process's CPU, at 1 and 32 concurrent streams.

    python benchmarks/upstream_overhead.py [--streams 1,32] [--rounds 5] [--tokens 64] [--interval-ms 20]
                                           [--arrivals burst|steady]
    python benchmarks/upstream_overhead.py --upstream model      # a real tiny model as the upstream

Three processes on this machine: the upstream (a second thinkgate), the front (`thinkgate serve --config` with
keys on SQLite: every request authenticated, held and captured, as in production; `--front-auth none` for
`--no-auth`) and this one, the client.
Rounds alternate: C streams straight to the upstream, then C streams through the front, so both see the same
machine. The C streams of a round start at once (`--arrivals burst`, the worst case: C intakes queue on the
front's one event loop), or one by one with C kept in flight (`--arrivals steady`: C workers each running 3
streams back to back, their starts spread over one stream's length; the first of each is the ramp and not
counted), as C independent clients load a server. Figures are front minus direct:
- added TTFT: the client's time to the first token (content or reasoning), p50 and p99 over all requests of all rounds;
- added per-token delay: the upstream (`--upstream paced`, the default) is thinkgate's API serving a paced
  provider that writes its monotonic clock into each token (every `--interval-ms`, the first after `--ttft-ms`),
  so the client measures each token's delay from upstream to client exactly; the difference of the p50s (p99s)
  of those delays is what the gateway adds to each token. Inter-token latency (the gap between two tokens at the
  client) is reported too; a gateway that adds a constant delay leaves it unchanged;
- with `--upstream model` (thinkgate serving `random:tiny` on this CPU, no timestamps) the added inter-token
  latency is the difference of the ITL percentiles, noisier because the model competes for the same cores;
- the front's and the upstream's CPU over the rounds at the highest concurrency (process CPU seconds / wall
  seconds: 1.0 = one core busy).
Results print as JSON lines.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time

import httpx

PACED = "paced"
STAMP = re.compile(r"\|(\d+)")


# -- the upstream: thinkgate's API over a paced provider -----------------------------------------------------
def serve_paced(port: int, interval_s: float, ttft_s: float) -> None:
    import uvicorn

    from thinkgate.api.app import create_app
    from thinkgate.gateway.providers.base import ChunkEvent, PreparedRequest, UsageEvent, UsageRecord

    class Paced:
        """Writes `max_tokens` tokens, each `|<monotonic ns>`, the first after ttft_s, then one every interval_s."""

        model_id = PACED

        def card(self):
            return {"id": PACED, "object": "model", "created": 0, "owned_by": "bench"}

        def num_active(self):
            return 0

        async def prepare(self, params):
            return PreparedRequest(params, "none", prompt_tokens=10, max_tokens=params.max_tokens or 16)

        async def stream(self, prep, ctx):
            yield ChunkEvent([{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                               "finish_reason": None}])
            await asyncio.sleep(ttft_s)
            n = 0
            for n in range(1, prep.max_tokens + 1):
                if ctx.cancelled.is_set():
                    break
                yield ChunkEvent([{"index": 0, "delta": {"content": f"|{time.monotonic_ns()}"}, "logprobs": None,
                                   "finish_reason": None}])
                if n < prep.max_tokens:
                    await asyncio.sleep(interval_s)
            yield ChunkEvent([{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "length",
                               "native_finish_reason": "max_tokens"}])
            yield UsageEvent(UsageRecord(ctx.request_id, PACED, 1, 10, 0, n, 0, "length", "max_tokens", "finished",
                                         None, 0.0))

    uvicorn.run(create_app({PACED: Paced()}), host="127.0.0.1", port=port, log_level="warning", access_log=False)


# -- processes -----------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(proc: subprocess.Popen, base: str, what: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode}")
        try:
            if httpx.get(base + "/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"{what} did not start")


def start_upstream(args) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    if args.upstream == PACED:
        cmd = [sys.executable, __file__, "--serve-paced", "--port", str(port), "--interval-ms", str(args.interval_ms),
               "--ttft-ms", str(args.ttft_ms)]
    else:
        cmd = [sys.executable, "-m", "thinkgate.cli", "serve", "--model", args.model, "--no-auth", "--port", str(port),
               "--max-num-seqs", "32", "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base, "the upstream")
    model = httpx.get(base + "/v1/models").json()["data"][0]["id"]
    return proc, base, model


def start_front(upstream_base: str, model: str, tmp: str, keys: bool, db_url: str | None = None
                ) -> tuple[subprocess.Popen, str, str]:
    import sqlalchemy as sa

    from thinkgate.gateway.keys import display_prefix, hash_secret, new_secret
    from thinkgate.gateway.money import to_units
    from thinkgate.storage.accounts import AccountStore
    from thinkgate.storage.db import Database

    db_url = db_url or f"sqlite:///{tmp}/front.db"
    db = Database(db_url)
    if not db.is_sqlite:  # a PostgreSQL database given to the benchmark: start from nothing
        with db.engine.begin() as c:
            c.execute(sa.text("DROP SCHEMA public CASCADE"))
            c.execute(sa.text("CREATE SCHEMA public"))
    db.upgrade()
    store = AccountStore(db)
    store.create_account("bench", balance_units=to_units("1000000"))
    secret = new_secret()
    store.create_key("bench", "bench", hash_secret(secret), display_prefix(secret), rpm=10**6, tpm=10**9,
                     concurrency=1000)
    db.dispose()
    catalog = os.path.join(tmp, "catalog.toml")
    with open(catalog, "w") as f:
        f.write(f'[[models]]\nid = "front"\nprice_input_per_1k = 0.00275\nprice_output_per_1k = 0.0095\n'
                f'[models.backend]\ntype = "openai"\nbase_url = "{upstream_base}/v1"\nremote_model = "{model}"\n')
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "thinkgate.cli", "serve", "--config", catalog, "--db", db_url,
                             "--port", str(port), "--log-level", "warning", "--auth" if keys else "--no-auth"])
    base = f"http://127.0.0.1:{port}"
    wait_ready(proc, base, "the front")
    return proc, base, secret


# -- the client ----------------------------------------------------------------------------------------------
async def one_stream(client: httpx.AsyncClient, url: str, model: str, tokens: int, headers: dict) -> dict:
    body = {"model": model, "messages": [{"role": "user", "content": "Tell me about the weather"}],
            "max_tokens": tokens, "stream": True, "temperature": 0, "ignore_eos": True}
    t0 = time.monotonic_ns()
    ttft, arrivals, delays = None, [], []
    async with client.stream("POST", url, json=body, headers=headers) as r:
        assert r.status_code == 200, (await r.aread())[:300]
        async for line in r.aiter_lines():
            if not line.startswith("data: {"):
                continue
            now = time.monotonic_ns()
            obj = json.loads(line[6:])
            deltas = [c.get("delta") or {} for c in obj.get("choices") or []]  # a thinking model's tokens count too
            text = "".join((d.get("content") or "") + (d.get("reasoning_content") or d.get("reasoning") or "")
                           for d in deltas)
            if not text:
                continue
            if ttft is None:
                ttft = (now - t0) / 1e6
            arrivals.append(now)
            delays += [(now - int(s)) / 1e6 for s in STAMP.findall(text)]
    itl = [(b - a) / 1e6 for a, b in zip(arrivals, arrivals[1:], strict=False)]
    return {"ttft": ttft, "itl": itl, "delays": delays}


async def round_of(base: str, model: str, streams: int, tokens: int, headers: dict, steady_s: float | None = None,
                   per_worker: int = 3) -> list[dict]:
    """A burst (`steady_s` None): `streams` requests started at once. Steady: `streams` workers, each running
    `per_worker` streams back to back, the workers' starts spread evenly over `steady_s` (one stream's length),
    so about `streams` are in flight at any time and starts arrive one by one, as from many independent
    clients; a worker's first stream (the ramp) is not counted."""
    async with httpx.AsyncClient(base_url=base, timeout=120, limits=httpx.Limits(max_connections=streams)) as c:
        if steady_s is None:
            return await asyncio.gather(*(one_stream(c, "/v1/chat/completions", model, tokens, headers)
                                          for _ in range(streams)))

        async def worker(i: int) -> list[dict]:
            await asyncio.sleep(i * steady_s / streams)
            return [await one_stream(c, "/v1/chat/completions", model, tokens, headers)
                    for _ in range(per_worker)][1:]

        return [r for rs in await asyncio.gather(*(worker(i) for i in range(streams))) for r in rs]


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(q * len(xs)))] if xs else float("nan")


def cpu_seconds(pid: int) -> float:
    import psutil

    t = psutil.Process(pid).cpu_times()
    return t.user + t.system


def summary(results: list[dict]) -> dict:
    ttft = [r["ttft"] for r in results]
    itl = [x for r in results for x in r["itl"]]
    delays = [x for r in results for x in r["delays"]]
    return {"ttft_p50": statistics.median(ttft), "ttft_p99": pct(ttft, 0.99), "itl_p50": statistics.median(itl),
            "itl_p99": pct(itl, 0.99), "delay_p50": statistics.median(delays) if delays else None,
            "delay_p99": pct(delays, 0.99) if delays else None, "requests": len(results)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--serve-paced", action="store_true")
    ap.add_argument("--port", type=int, default=0)
    ap.add_argument("--upstream", choices=[PACED, "model"], default=PACED)
    ap.add_argument("--model", default="random:tiny", help="the upstream's model with --upstream model")
    ap.add_argument("--streams", default="1,32")
    ap.add_argument("--rounds", type=int, default=5, help="rounds of each kind at each concurrency")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--interval-ms", type=float, default=20.0)
    ap.add_argument("--ttft-ms", type=float, default=50.0)
    ap.add_argument("--front-auth", choices=["keys", "none"], default="keys",
                    help="keys: every request authenticated, held and captured; none: --no-auth (metered only)")
    ap.add_argument("--arrivals", choices=["burst", "steady"], default="burst",
                    help="burst: each round's streams start at once; steady: they start one by one and keep "
                         "that many in flight (see round_of)")
    ap.add_argument("--front-db", default=None,
                    help="the front's database URL (default: SQLite in a temp dir); a PostgreSQL one is emptied")
    args = ap.parse_args()
    if args.serve_paced:
        return serve_paced(args.port, args.interval_ms / 1000, args.ttft_ms / 1000)
    tmp = tempfile.mkdtemp(prefix="thinkgate-upstream-bench-")
    upstream, up_base, model = start_upstream(args)
    front = None
    try:
        front, front_base, secret = start_front(up_base, model, tmp, args.front_auth == "keys", args.front_db)
        keyed = {"Authorization": f"Bearer {secret}"}
        asyncio.run(round_of(front_base, "front", 4, 8, keyed))  # warm both paths up
        asyncio.run(round_of(up_base, model, 4, 8, {}))
        levels = [int(x) for x in args.streams.split(",")]
        for streams in levels:
            direct, through = [], []
            cpu = {"front": 0.0, "upstream": 0.0}
            front_wall = 0.0
            steady = None
            if args.arrivals == "steady" and streams > 1:
                steady = (args.ttft_ms + args.tokens * args.interval_ms) / 1000
            for _ in range(args.rounds):
                direct += asyncio.run(round_of(up_base, model, streams, args.tokens, {}, steady))
                c0, u0, t0 = cpu_seconds(front.pid), cpu_seconds(upstream.pid), time.monotonic()
                through += asyncio.run(round_of(front_base, "front", streams, args.tokens, keyed, steady))
                front_wall += time.monotonic() - t0
                cpu["front"] += cpu_seconds(front.pid) - c0
                cpu["upstream"] += cpu_seconds(upstream.pid) - u0
            d, f = summary(direct), summary(through)
            out = {"upstream": args.upstream if args.upstream == PACED else args.model, "front": args.front_auth,
                   "front_db": "sqlite" if args.front_db is None else args.front_db.split(":")[0],
                   "streams": streams, "arrivals": "steady" if steady else "burst",
                   "rounds": args.rounds, "tokens": args.tokens, "direct": rounded(d), "through_front": rounded(f),
                   "added_ms": rounded({k: f[k] - d[k] for k in ("ttft_p50", "ttft_p99", "itl_p50", "itl_p99")}
                                       | ({"per_token_p50": f["delay_p50"] - d["delay_p50"],
                                           "per_token_p99": f["delay_p99"] - d["delay_p99"]}
                                          if d["delay_p50"] is not None else {})),
                   "cpu_cores_while_streaming": {k: round(v / front_wall, 3) for k, v in cpu.items()},
                   "front_cpu_us_per_token": round(cpu["front"] * 1e6 / sum(len(r["itl"]) + 1 for r in through), 1),
                   "load_average": os.getloadavg()}
            print(json.dumps(out), flush=True)
    finally:
        for p in (front, upstream):
            if p is not None:
                p.terminate()
                p.wait()


def rounded(d: dict) -> dict:
    return {k: (round(v, 3) if isinstance(v, float) else v) for k, v in d.items()}


if __name__ == "__main__":
    main()
