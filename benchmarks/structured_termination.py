"""Does a constrained answer finish? The default model at temperature 0 on the structured-output schema corpus
(tests/structured/schema_corpus.py) plus issue 21's schema, through the OpenAI API of thinkgate (each grammar
backend) and of llama.cpp's server (its `json_schema` request field) on the same GGUF file.

    python benchmarks/structured_termination.py [--backends llguidance,xgrammar] [--llama-server PATH]
        [--pythonpath DIR] [--label NAME] [--out FILE.json]

`--pythonpath` runs thinkgate from another source tree (e.g. a `git worktree` of an older commit's src/) to
measure "before". Each server is started here on loopback and stopped after its run. Per schema: the finish
reason, completion tokens and whether the answer validates. The figure: answers that finish with `stop` in
under `--max-tokens` tokens; answers that ran to the cap are listed with their head.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import jsonschema

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.structured.schema_corpus import CORPUS  # noqa: E402

# Issue 21: the default model wrote `{"c":"fixed","n":1000000000000...` until max_tokens.
ISSUE_SCHEMA = {"type": "object", "properties": {"c": {"const": "fixed"}, "n": {"type": "integer", "multipleOf": 5}},
                "required": ["c", "n"], "additionalProperties": False}
SCHEMAS = [*CORPUS, ISSUE_SCHEMA]


def prompt(schema: dict) -> list[dict]:
    return [{"role": "user", "content": f"Reply with a JSON value that matches this JSON Schema:\n{json.dumps(schema)}"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(proc: subprocess.Popen, base: str, log: Path, timeout: float = 1800) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(base + "/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError("server did not start in time")


def start_thinkgate(backend: str, pythonpath: str | None, gguf: str, port: int, log: Path) -> subprocess.Popen:
    env = dict(os.environ, THINKGATE_DATA_DIR=tempfile.mkdtemp(prefix="tg-bench-"))
    if pythonpath:
        env["PYTHONPATH"] = pythonpath
    cmd = [sys.executable, "-m", "thinkgate.cli", "serve", "--model", gguf, "--port", str(port),
           "--served-model-name", "m", "--grammar-backend", backend, "--no-auth", "--log-level", "warning"]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT, env=env, cwd="/")


def start_llama(binary: str, gguf: str, port: int, log: Path, parallel: int) -> subprocess.Popen:
    cmd = [binary, "-m", gguf, "--port", str(port), "-c", str(4096 * parallel), "-np", str(parallel),
           "--no-webui", "-t", str(os.cpu_count() or 2)]
    return subprocess.Popen(cmd, stdout=log.open("w"), stderr=subprocess.STDOUT)


def ask(base: str, schema: dict, max_tokens: int, llama: bool) -> dict:
    body = {"model": "m", "messages": prompt(schema), "temperature": 0, "max_tokens": max_tokens}
    if llama:
        body["json_schema"] = schema  # llama.cpp's own field: its JSON-schema-to-GBNF grammar
    else:
        body["response_format"] = {"type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    r = httpx.post(base + "/v1/chat/completions", json=body, timeout=1800)
    if r.status_code != 200:
        return {"status": r.status_code, "error": r.text[:300]}
    choice = r.json()["choices"][0]
    text = choice["message"]["content"] or ""
    try:
        jsonschema.Draft202012Validator(schema, format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
                                        ).validate(json.loads(text))
        valid = True
    except (ValueError, jsonschema.ValidationError):
        valid = False
    return {"status": 200, "finish": choice["finish_reason"], "tokens": r.json()["usage"]["completion_tokens"],
            "valid": valid, "text": text}


def run_server(name: str, proc: subprocess.Popen, base: str, log: Path, args, llama: bool) -> dict:
    try:
        wait_healthy(proc, base, log)
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(args.concurrency) as pool:
            results = list(pool.map(lambda s: ask(base, s, args.max_tokens, llama), SCHEMAS))
        seconds = time.monotonic() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            proc.kill()
    stopped = [i for i, r in enumerate(results) if r.get("finish") == "stop" and r["tokens"] < args.max_tokens]
    capped = [i for i, r in enumerate(results) if r.get("finish") == "length"]
    summary = {"server": name, "schemas": len(SCHEMAS), "stop_under_cap": len(stopped), "length": capped,
               "invalid_stops": [i for i in stopped if not results[i]["valid"]],
               "refused": {i: r["error"] for i, r in enumerate(results) if r["status"] != 200},
               "seconds": round(seconds, 1)}
    print(json.dumps(summary), flush=True)
    for i in capped:
        print(f"  capped #{i}: {results[i]['text'][:90]!r}", flush=True)
    return {"summary": summary, "results": results}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backends", default="llguidance,xgrammar", help="thinkgate grammar backends (comma-separated)")
    ap.add_argument("--llama-server", default=None, help="llama.cpp's llama-server binary")
    ap.add_argument("--llama-parallel", type=int, default=4)
    ap.add_argument("--pythonpath", default=None, help="thinkgate source tree to run (default: the installed one)")
    ap.add_argument("--label", default="")
    ap.add_argument("--model", default=None, help="GGUF file (default: the default model)")
    ap.add_argument("--max-tokens", type=int, default=200)
    ap.add_argument("--concurrency", type=int, default=8)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    if args.model is None:
        from thinkgate.models.default_model import pull_default_model

        args.model = str(pull_default_model())
    runs = {}
    logdir = Path(tempfile.mkdtemp(prefix="structured-termination-"))
    for backend in filter(None, args.backends.split(",")):
        port, log = free_port(), logdir / f"thinkgate-{backend}.log"
        proc = start_thinkgate(backend, args.pythonpath, args.model, port, log)
        name = f"thinkgate {backend} {args.label}".strip()
        runs[name] = run_server(name, proc, f"http://127.0.0.1:{port}", log, args, llama=False)
    if args.llama_server:
        port, log = free_port(), logdir / "llama-server.log"
        proc = start_llama(args.llama_server, args.model, port, log, args.llama_parallel)
        runs["llama.cpp"] = run_server("llama.cpp", proc, f"http://127.0.0.1:{port}", log, args, llama=True)
    if args.out:
        Path(args.out).write_text(json.dumps(runs, indent=1))


if __name__ == "__main__":
    main()
