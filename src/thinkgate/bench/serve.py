"""`thinkgate bench serve`: a streaming load generator against any OpenAI-compatible chat endpoint.

Reports per concurrency level: request and token throughput, TTFT, TPOT, ITL and end-to-end latency
(mean, median, p99), with time to the first reasoning token and to the first content token apart.
Bounded in request count and wall time.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import time
from dataclasses import asdict, dataclass, field

import httpx

from thinkgate.bench.prompts import synthetic_prompts


@dataclass
class RequestResult:
    ok: bool
    prompt_tokens: int = 0
    output_tokens: int = 0
    ttft: float | None = None
    t_first_reasoning: float | None = None
    t_first_content: float | None = None
    latency: float = 0.0
    itl: list[float] = field(default_factory=list)
    error: str = ""


async def one_request(client: httpx.AsyncClient, url: str, model: str, prompt: str, output_len: int,
                      ignore_eos: bool, headers: dict) -> RequestResult:
    body = {"model": model, "messages": [{"role": "user", "content": prompt}], "max_tokens": output_len,
            "stream": True, "stream_options": {"include_usage": True}, "temperature": 0}
    if ignore_eos:
        body["ignore_eos"] = True
    res = RequestResult(ok=False)
    start = time.perf_counter()
    last = None
    chunks = 0
    try:
        async with client.stream("POST", url, json=body, headers=headers) as r:
            if r.status_code != 200:
                res.error = f"HTTP {r.status_code}: {(await r.aread())[:200]!r}"
                return res
            async for line in r.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                data = json.loads(line[6:])
                if data.get("usage"):
                    res.prompt_tokens = data["usage"].get("prompt_tokens", 0)
                    res.output_tokens = data["usage"].get("completion_tokens", 0)
                for ch in data.get("choices") or []:
                    d = ch.get("delta") or {}
                    reasoning = d.get("reasoning") or d.get("reasoning_content")
                    if not (reasoning or d.get("content")):
                        continue
                    now = time.perf_counter()
                    if res.ttft is None:
                        res.ttft = now - start
                    if reasoning and res.t_first_reasoning is None:
                        res.t_first_reasoning = now - start
                    if d.get("content") and res.t_first_content is None:
                        res.t_first_content = now - start
                    if last is not None:
                        res.itl.append(now - last)
                    last = now
                    chunks += 1
        res.latency = time.perf_counter() - start
        res.output_tokens = res.output_tokens or chunks
        res.ok = res.ttft is not None
    except (httpx.HTTPError, json.JSONDecodeError) as e:
        res.error = f"{type(e).__name__}: {e}"
    return res


def _stats(xs: list[float]) -> dict:
    if not xs:
        return {"mean": None, "median": None, "p99": None}
    s = sorted(xs)
    return {"mean": statistics.fmean(s), "median": statistics.median(s),
            "p99": s[min(len(s) - 1, int(round(0.99 * (len(s) - 1))))]}


async def run_level(url: str, model: str, prompts: list[str], concurrency: int, output_len: int,
                    ignore_eos: bool, api_key: str | None, max_seconds: float) -> dict:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency + 4)
    deadline = time.perf_counter() + max_seconds
    async with httpx.AsyncClient(timeout=httpx.Timeout(max_seconds + 30), limits=limits) as client:

        async def guarded(p: str):
            async with sem:
                if time.perf_counter() > deadline:
                    return None
                return await one_request(client, url, model, p, output_len, ignore_eos, headers)

        t0 = time.perf_counter()
        results = [r for r in await asyncio.gather(*(guarded(p) for p in prompts)) if r is not None]
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    out_tok = sum(r.output_tokens for r in ok)
    in_tok = sum(r.prompt_tokens for r in ok)
    tpot = [(r.latency - r.ttft) / (r.output_tokens - 1) for r in ok if r.output_tokens > 1]
    return {
        "concurrency": concurrency, "requests": len(results), "completed": len(ok),
        "errors": [r.error for r in results if not r.ok][:5], "duration_s": wall,
        "request_throughput": len(ok) / wall, "output_throughput": out_tok / wall,
        "total_token_throughput": (in_tok + out_tok) / wall, "mean_prompt_tokens": in_tok / max(1, len(ok)),
        "mean_output_tokens": out_tok / max(1, len(ok)),
        "ttft_s": _stats([r.ttft for r in ok]), "tpot_s": _stats(tpot),
        "itl_s": _stats([x for r in ok for x in r.itl]), "e2e_s": _stats([r.latency for r in ok]),
        "first_reasoning_s": _stats([r.t_first_reasoning for r in ok if r.t_first_reasoning is not None]),
        "first_content_s": _stats([r.t_first_content for r in ok if r.t_first_content is not None]),
    }


def format_table(levels: list[dict]) -> str:
    def ms(x):
        return "-" if x is None else f"{1000 * x:.0f}"

    head = ("conc  reqs  ok  req/s  out tok/s  total tok/s  TTFT mean/med/p99 ms  TPOT med ms  ITL med/p99 ms  "
            "E2E med s  1st reasoning/content med ms")
    rows = [head]
    for lv in levels:
        t, tp, itl, e2e = lv["ttft_s"], lv["tpot_s"], lv["itl_s"], lv["e2e_s"]
        rows.append(
            f"{lv['concurrency']:>4}  {lv['requests']:>4}  {lv['completed']:>2}  {lv['request_throughput']:>5.2f}  "
            f"{lv['output_throughput']:>9.1f}  {lv['total_token_throughput']:>11.1f}  "
            f"{ms(t['mean'])}/{ms(t['median'])}/{ms(t['p99'])}".ljust(0)
            + f"  {ms(tp['median'])}  {ms(itl['median'])}/{ms(itl['p99'])}  "
            f"{(e2e['median'] or 0):.2f}  {ms(lv['first_reasoning_s']['median'])}/{ms(lv['first_content_s']['median'])}")
    return "\n".join(rows)


def bench_serve(url: str, model: str, concurrency: list[int], num_requests: int, input_len: int, output_len: int,
                ignore_eos: bool, api_key: str | None, shared_prefix_len: int = 0, seed: int = 0,
                max_seconds: float = 600, out: str | None = None) -> list[dict]:
    endpoint = url.rstrip("/")
    if not endpoint.endswith("/chat/completions"):
        endpoint += "/chat/completions" if endpoint.endswith("/v1") else "/v1/chat/completions"
    levels = []
    for c in concurrency:
        prompts = synthetic_prompts(num_requests, input_len, seed=seed, shared_prefix_len=shared_prefix_len,
                                    jitter=0.2)
        levels.append(asyncio.run(run_level(endpoint, model, prompts, c, output_len, ignore_eos, api_key,
                                            max_seconds)))
    print(format_table(levels))
    if out:
        with open(out, "w") as f:
            json.dump({"url": url, "model": model, "input_len": input_len, "output_len": output_len,
                       "levels": levels}, f, indent=2)
    return levels


__all__ = ["bench_serve", "RequestResult", "asdict"]
