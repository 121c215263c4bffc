"""Soak: mixed traffic against a real `thinkgate serve` for a set time, then a check that nothing leaked.

    python benchmarks/soak.py [--minutes 20] [--clients 8] [--model qwen2.5-coder-0.5b-instruct] [--out FILE]

It writes a catalog (the model on our engine, priced, with a per-model request timeout), creates accounts and
keys with the gateway CLI on a fresh SQLite database, and starts `thinkgate serve --config ... --db ...` (keys
required). `--clients` workers then send requests until the time is up, each picked at random (seeded) from:
- chat completions, plain and streamed (with usage), some with n=2, some with a system prompt;
- streams the client drops after a few chunks, and plain requests the client gives up on (a short read
  timeout): client disconnects, which must be billed for what was generated and leave nothing held;
- tools (a function and tool_choice auto), json_schema response formats (strict), text completions;
- bad inputs, each expecting its own 4xx (a missing or wrong parameter, an unknown model, broken JSON, a
  context overflow, an unknown key, an account with no money, a key past its requests-per-minute limit);
- several keys: a rich account, a small one that runs dry during the soak (then 402), an empty one, a
  rate-limited key.
Each request's outcome is its HTTP status ("dropped" for a planned disconnect, "200+<code>" for a stream that
ended with an error chunk, "error:<Exception>" when the connection failed). At the end it reports requests by
kind and outcome, every 5xx and every outcome the kind did not expect, the server's resident memory (VmRSS)
after the warm-up, during and at the end, and checks from /metrics (parsed with prometheus-client's parser)
that no sequence runs or waits and no KV block is in use, from the ledger that no hold is open (and `thinkgate
keys show` says held 0 for every key), that /metrics' spend equals the ledger's, and that the server exits 0 on
SIGTERM. Not a CI test: run it by hand; results go in BENCHMARKS.md ("Soak").
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import platform
import random
import signal
import socket
import subprocess
import sys
import tempfile
import time
from decimal import Decimal
from pathlib import Path

import httpx
from prometheus_client.parser import text_string_to_metric_families

MODEL = "soak/model"
PRICE_IN, PRICE_OUT = "0.5", "1"  # CNY per 1000 tokens: high, so the small account runs dry within the soak
ACCOUNTS = {"rich": "1000", "small": "0.5", "empty": "0"}  # CNY
KEYS = {"rich-a": ("rich", []), "rich-b": ("rich", []), "small": ("small", []), "empty": ("empty", []),
        "limited": ("rich", ["--rpm", "1"])}  # at 8 clients it is asked more than once a minute: 429s
WORDS = ("list", "sort", "parse", "merge", "graph", "cache", "queue", "tree", "string", "matrix", "file", "date")
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                           "count": {"type": "integer", "minimum": 0, "maximum": 99}},
          "required": ["name", "count"], "additionalProperties": False}
TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


# -- the server ---------------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cli(*args: str) -> str:
    done = subprocess.run([sys.executable, "-m", "thinkgate.cli", *args], capture_output=True, text=True,
                          check=False)
    if done.returncode != 0:
        raise SystemExit(f"thinkgate {' '.join(args)} failed:\n{done.stderr}")
    return done.stdout


def write_catalog(path: Path, model: str, timeout_s: float) -> None:
    path.write_text(f'''[[models]]
id = "{MODEL}"
context_length = 2048
price_input_per_1k = {PRICE_IN}
price_output_per_1k = {PRICE_OUT}
request_timeout_s = {timeout_s}
[models.backend]
type = "local"
model = "{model}"
''')


class Server:
    def __init__(self, workdir: Path, model: str, timeout_s: float, extra: list[str]):
        self.db = f"sqlite:///{workdir / 'gateway.db'}"
        catalog = workdir / "catalog.toml"
        write_catalog(catalog, model, timeout_s)
        for name, balance in ACCOUNTS.items():
            cli("accounts", "create", name, "--balance", balance, "--db", self.db)
        self.keys = {name: cli("keys", "create", "--account", acct, "--name", name, *opts, "--db", self.db).strip()
                     for name, (acct, opts) in KEYS.items()}
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "server.log", "w+")
        cmd = [sys.executable, "-m", "thinkgate.cli", "serve", "--config", str(catalog), "--db", self.db,
               "--port", str(self.port), "--log-level", "warning", *extra]
        self.proc = subprocess.Popen(cmd, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                raise SystemExit(f"the server exited at start:\n{self.log.read()[-3000:]}")
            try:
                if httpx.get(self.base + "/health/ready", timeout=2).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        raise SystemExit("the server did not get ready in 10 minutes")

    def rss_mib(self) -> float:
        for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS")

    def stop(self, grace_s: float = 60) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(grace_s)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return -9


# -- the traffic --------------------------------------------------------------------------------------------
def prompt(rng: random.Random) -> str:
    return f"Write a short Python function to {rng.choice(WORDS)} a {rng.choice(WORDS)}. Be brief."


def chat(rng: random.Random, max_tokens: int, **extra) -> dict:
    messages = [{"role": "user", "content": prompt(rng)}]
    if rng.random() < 0.3:
        messages.insert(0, {"role": "system", "content": "You are a terse assistant."})
    return {"model": MODEL, "messages": messages, "max_tokens": max_tokens, "temperature": rng.choice([0, 0.7]),
            **extra}


def bad_requests(rng: random.Random) -> tuple[str, dict | bytes, int]:
    """(name, body, the status it must get)."""
    good = chat(rng, 4)
    cases = [
        ("no_messages", {"model": MODEL, "max_tokens": 4}, 400),
        ("negative_max_tokens", {**good, "max_tokens": -1}, 400),
        ("temperature_9", {**good, "temperature": 9}, 400),
        ("bad_role", {**good, "messages": [{"role": "wizard", "content": "hi"}]}, 400),
        ("unknown_model", {**good, "model": "nope/none"}, 404),
        ("broken_json", b'{"model": "' + MODEL.encode() + b'", "messages": [', 400),
        ("context_overflow", {**good, "messages": [{"role": "user", "content": "word " * 2100}]}, 400),
        ("bad_schema", {**good, "response_format": {"type": "json_schema", "json_schema": {"name": "x",
                                                                                             "schema": 5}}}, 400),
        ("bad_tool_choice", {**good, "tools": [TOOL], "tool_choice": {"type": "function",
                                                                       "function": {"name": "missing"}}}, 400),
    ]
    return rng.choice(cases)


KINDS = {  # weight
    "chat": 20, "chat_stream": 20, "chat_n2": 4, "stream_drop": 8, "chat_drop": 4, "tools": 8, "json_schema": 8,
    "completions": 6, "bad_input": 10, "bad_key": 2, "small_account": 4, "empty_account": 2, "rate_limited": 4,
}
EXPECTED = {"bad_key": {"401"}, "empty_account": {"402"}, "small_account": {"200", "402"},
            "rate_limited": {"200", "429"}, "stream_drop": {"dropped", "200"}, "chat_drop": {"dropped", "200"}}


class Traffic:
    def __init__(self, server: Server, max_tokens: int, seed: int):
        self.server = server
        self.max_tokens = max_tokens
        self.seed = seed
        self.outcomes: collections.Counter = collections.Counter()  # (kind, outcome)
        self.unexpected: list[dict] = []
        self.latencies: dict[str, list[float]] = collections.defaultdict(list)

    async def run(self, clients: int, seconds: float) -> None:
        stop_at = time.monotonic() + seconds
        limits = httpx.Limits(max_connections=clients * 2)
        async with httpx.AsyncClient(base_url=self.server.base, timeout=900, limits=limits) as http:
            await asyncio.gather(*(self.client(http, random.Random(self.seed * 1000 + i), stop_at)
                                   for i in range(clients)))

    async def client(self, http: httpx.AsyncClient, rng: random.Random, stop_at: float) -> None:
        kinds, weights = list(KINDS), list(KINDS.values())
        while time.monotonic() < stop_at:
            kind = rng.choices(kinds, weights)[0]
            t0 = time.monotonic()
            try:
                outcome, detail = await self.one(http, rng, kind)
            except httpx.HTTPError as e:
                outcome, detail = f"error:{type(e).__name__}", str(e)
            self.latencies[kind].append(time.monotonic() - t0)
            self.outcomes[(kind, outcome)] += 1
            expected = EXPECTED.get(kind, {"400", "404"} if kind == "bad_input" else {"200"})
            if outcome not in expected:
                self.unexpected.append({"kind": kind, "outcome": outcome, "detail": detail[:300]})

    async def one(self, http: httpx.AsyncClient, rng: random.Random, kind: str) -> tuple[str, str]:
        keys, mt = self.server.keys, self.max_tokens
        key = keys[rng.choice(["rich-a", "rich-b"])]
        if kind == "chat":
            return await post(http, key, "/v1/chat/completions", chat(rng, mt))
        if kind == "chat_n2":
            return await post(http, key, "/v1/chat/completions", chat(rng, mt, n=2, temperature=0.8))
        if kind == "chat_stream":
            return await stream(http, key, chat(rng, mt, stream=True, stream_options={"include_usage": True}))
        if kind == "stream_drop":
            return await stream(http, key, chat(rng, 4 * mt, stream=True), drop_after=rng.randint(1, 4))
        if kind == "chat_drop":  # the client gives up waiting: a disconnect before anything was sent
            try:
                return await post(http, key, "/v1/chat/completions", chat(rng, 4 * mt), timeout=rng.uniform(0.2, 1))
            except httpx.TimeoutException:
                return "dropped", ""
        if kind == "tools":
            body = chat(rng, mt, tools=[TOOL], tool_choice="auto")
            body["messages"][-1]["content"] = f"What is the weather in {rng.choice(['Paris', 'Oslo', 'Lima'])}?"
            return await post(http, key, "/v1/chat/completions", body)
        if kind == "json_schema":
            body = chat(rng, 2 * mt, response_format={"type": "json_schema", "json_schema": {
                "name": "item", "strict": True, "schema": SCHEMA}})
            return await post(http, key, "/v1/chat/completions", body)
        if kind == "completions":
            return await post(http, key, "/v1/completions", {"model": MODEL, "prompt": "def " + rng.choice(WORDS),
                                                             "max_tokens": mt})
        if kind == "bad_input":
            name, body, want = bad_requests(rng)
            outcome, detail = await post(http, key, "/v1/chat/completions", body)
            return (outcome if outcome == str(want) else f"{outcome} (wanted {want} for {name})"), detail
        if kind == "bad_key":
            return await post(http, "sk-tg-not-a-key", "/v1/chat/completions", chat(rng, mt))
        return await post(http, keys[{"small_account": "small", "empty_account": "empty",
                                      "rate_limited": "limited"}[kind]], "/v1/chat/completions", chat(rng, mt))


async def post(http, key: str, path: str, body, timeout: float | None = None) -> tuple[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    if isinstance(body, bytes):
        r = await http.post(path, content=body, headers={**headers, "Content-Type": "application/json"})
    else:
        r = await http.post(path, json=body, headers=headers, **({"timeout": timeout} if timeout else {}))
    return str(r.status_code), r.text if r.status_code != 200 else ""


async def stream(http, key: str, body: dict, drop_after: int | None = None) -> tuple[str, str]:
    headers = {"Authorization": f"Bearer {key}"}
    async with http.stream("POST", "/v1/chat/completions", json=body, headers=headers) as r:
        if r.status_code != 200:
            return str(r.status_code), (await r.aread()).decode(errors="replace")
        n = 0
        async for line in r.aiter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                return f"200+{chunk['error'].get('code')}", line
            n += 1
            if drop_after is not None and n >= drop_after:
                return "dropped", ""  # leaving the block closes the connection
    return "200", ""


# -- the checks at the end ----------------------------------------------------------------------------------
def scrape(base: str) -> dict:
    text = httpx.get(base + "/metrics", timeout=10).text
    out: dict = collections.defaultdict(float)
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[s.name] += s.value  # summed over labels (one model)
    return out


def settle(base: str, timeout_s: float = 60) -> dict:
    """/metrics once nothing runs or waits (or after the timeout, as it is then)."""
    deadline = time.monotonic() + timeout_s
    while True:
        m = scrape(base)
        idle = m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0 and \
            m["vllm:kv_cache_usage_perc"] == 0
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.5)


def ledger_state(db_url: str) -> dict:
    from thinkgate.gateway.money import to_cny
    from thinkgate.storage.db import Database
    from thinkgate.storage.ledger import Ledger

    db = Database(db_url)
    try:
        ledger = Ledger(db)
        rows = ledger.totals("key")
        return {"open_holds": ledger.open_holds(), "requests": sum(r["requests"] for r in rows),
                "cost_cny": str(to_cny(sum(r["cost_units"] for r in rows))),
                "completion_tokens": sum(r["completion_tokens"] for r in rows),
                "prompt_tokens": sum(r["prompt_tokens"] for r in rows)}
    finally:
        db.dispose()


def held_by_key(db_url: str) -> dict:
    out = {}
    for name in KEYS:
        fields = dict(line.split(": ", 1) for line in cli("keys", "show", name, "--db", db_url).splitlines()
                      if ": " in line)
        out[name] = fields["held"]
    return out


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor())
    return f"{cpu}, {os.cpu_count()} CPUs, {platform.system()} {platform.release()}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--minutes", type=float, default=20)
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--model", default="qwen2.5-coder-0.5b-instruct", help="the catalog's local model")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--timeout", type=float, default=600, help="the model's request_timeout_s in the catalog")
    ap.add_argument("--warmup", type=float, default=90, help="seconds of the same traffic before the RSS baseline")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="also write the report as JSON here")
    ap.add_argument("serve_args", nargs="*", help="more `thinkgate serve` options (after --)")
    args = ap.parse_args()

    workdir = Path(tempfile.mkdtemp(prefix="thinkgate-soak-"))
    os.environ.setdefault("THINKGATE_DATA_DIR", str(workdir))
    print(f"soak: {workdir}; starting the server", file=sys.stderr, flush=True)
    server = Server(workdir, args.model, args.timeout, args.serve_args)
    try:
        warm = Traffic(server, args.max_tokens, seed=10_000 + args.seed)
        asyncio.run(warm.run(args.clients, args.warmup))  # every path taken, memory at its working size
        settle(server.base)
        rss = [(0.0, server.rss_mib())]
        traffic = Traffic(server, args.max_tokens, seed=args.seed)
        print(f"soak: warm ({rss[0][1]:.0f} MiB); {args.clients} clients for {args.minutes} min", file=sys.stderr,
              flush=True)
        t0 = time.monotonic()

        async def soak():
            task = asyncio.create_task(traffic.run(args.clients, args.minutes * 60))
            while not task.done():
                await asyncio.wait([task], timeout=30)
                rss.append((round(time.monotonic() - t0, 1), server.rss_mib()))
                done = sum(traffic.outcomes.values())
                print(f"soak: {rss[-1][0]:.0f} s, {done} requests, rss {rss[-1][1]:.0f} MiB", file=sys.stderr,
                      flush=True)
            await task

        asyncio.run(soak())
        wall = time.monotonic() - t0
        metrics = settle(server.base)
        rss.append((round(time.monotonic() - t0, 1), server.rss_mib()))
        ledger = ledger_state(server.db)
        held = held_by_key(server.db)
        exit_code = server.stop()
    finally:
        if server.proc.poll() is None:
            server.proc.kill()
    by_kind: dict = collections.defaultdict(dict)
    for (kind, outcome), n in sorted(traffic.outcomes.items()):
        by_kind[kind][outcome] = n
    by_outcome = collections.Counter()
    for (_, outcome), n in traffic.outcomes.items():
        by_outcome[outcome.split(" ")[0]] += n
    five_xx = {o: n for o, n in by_outcome.items() if o[:1] == "5" or "+" in o or o.startswith("error")}
    spend_metrics = Decimal(str(round(metrics["thinkgate_spend_cny_total"], 8)))
    report = {
        "machine": machine(), "model": args.model, "clients": args.clients, "minutes": args.minutes,
        "max_tokens": args.max_tokens, "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "load_average_at_end": os.getloadavg(), "warmup_requests": sum(warm.outcomes.values()), "wall_s": round(wall, 1), "requests": sum(traffic.outcomes.values()),
        "by_outcome": dict(sorted(by_outcome.items())), "by_kind": by_kind, "five_xx_or_errors": five_xx,
        # Every request that reached the model (answered, or dropped by its client) has its ledger row.
        "reached_model": sum(n for t in (warm, traffic) for (_, o), n in t.outcomes.items() if o in ("200", "dropped")),
        "unexpected": traffic.unexpected[:50], "unexpected_count": len(traffic.unexpected),
        "median_latency_s": {k: round(sorted(v)[len(v) // 2], 3) for k, v in sorted(traffic.latencies.items())},
        "rss_mib": {"after_warmup": round(rss[0][1], 1), "end": round(rss[-1][1], 1),
                    "max": round(max(r for _, r in rss), 1), "growth": round(rss[-1][1] - rss[0][1], 1),
                    "samples": [(t, round(r, 1)) for t, r in rss]},
        "end_state": {
            "running": metrics["vllm:num_requests_running"], "waiting": metrics["vllm:num_requests_waiting"],
            "kv_cache_usage": metrics["vllm:kv_cache_usage_perc"], "open_holds": ledger["open_holds"],
            "held_by_key": held, "spend_metrics_cny": str(spend_metrics), "spend_ledger_cny": ledger["cost_cny"],
            "ledger_requests": ledger["requests"], "exit_code_on_sigterm": exit_code},
    }
    report["ok"] = (not five_xx and report["end_state"]["running"] == 0 and report["end_state"]["waiting"] == 0
                    and report["end_state"]["kv_cache_usage"] == 0 and ledger["open_holds"] == 0
                    and all(Decimal(v) == 0 for v in held.values()) and exit_code == 0
                    and spend_metrics == Decimal(ledger["cost_cny"]))
    text = json.dumps(report, indent=1, default=str)
    print(text)
    if args.out:
        Path(args.out).write_text(text + "\n")


if __name__ == "__main__":
    main()
