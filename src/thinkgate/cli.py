"""`thinkgate serve | version | model random | pull | bench | db | accounts | keys | codes`."""

from __future__ import annotations

import argparse
import logging
import os
import sys

from thinkgate import __version__
from thinkgate.config import DEFAULT_MODEL, EngineConfig, ServerConfig
from thinkgate.serve_settings import document, env_defaults, parse_serve


def _serve_args(p: argparse.ArgumentParser) -> None:
    e, s = EngineConfig(), ServerConfig()
    p.add_argument("--model", default=None, help=f"directory, .gguf file or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--host", default=s.host)
    p.add_argument("--port", type=int, default=s.port)
    p.add_argument("--config", default=None, help="TOML catalog of models (gateway; see the spec)")
    p.add_argument("--db", default=None, help="database URL for accounts, keys and the ledger (default: SQLite "
                                              "under the user's data directory; or postgresql+psycopg://...)")
    auth = p.add_mutually_exclusive_group()
    auth.add_argument("--auth", action="store_true", help="require API keys (the default with --config)")
    auth.add_argument("--no-auth", action="store_true", help="serve without API keys (usage is still metered)")
    p.add_argument("--admin-token", default=None, help="enables /admin/... (default: $THINKGATE_ADMIN_TOKEN)")
    p.add_argument("--redis", default=None, help="redis://... URL: rate-limit counters shared by gateway processes")
    p.add_argument("--price-input", default=None, help="CNY per 1000 prompt tokens of --model (e.g. 0.00275)")
    p.add_argument("--price-output", default=None, help="CNY per 1000 completion tokens, reasoning included")
    p.add_argument("--price-cached-input", default=None, help="CNY per 1000 cached prompt tokens (default: input)")
    p.add_argument("--served-model-name", default=None, help="the id clients send as `model`")
    p.add_argument("--dtype", default=e.dtype, choices=["auto", "bfloat16", "float32"])
    p.add_argument("--device", default=e.device, choices=["auto", "cpu", "cuda"])
    p.add_argument("--max-model-len", type=int, default=None)
    p.add_argument("--max-num-seqs", type=int, default=e.max_num_seqs)
    p.add_argument("--max-num-batched-tokens", type=int, default=e.max_num_batched_tokens)
    p.add_argument("--block-size", type=int, default=e.block_size)
    p.add_argument("--kv-cache-memory", type=int, default=None, help="bytes for the KV cache pool (default on CPU: "
                   "--max-model-len x --max-num-seqs tokens when --max-model-len is given, else 8 x 8192)")
    p.add_argument("--kv-cache-dtype", default=e.kv_cache_dtype, choices=["auto", "float16", "bfloat16", "float32"],
                   help="KV pool dtype (auto: fp32 where thinkgate's C++ kernels read it, else fp16 for a GGUF "
                        "served from its own blocks as llama.cpp does, bf16 for other quantized CPU models)")
    p.add_argument("--no-prefix-caching", action="store_true")
    p.add_argument("--weight-quant", default=e.weight_quant, choices=["auto", "none", "int8", "int4", "w8a8", "mixed",
                                                                       "gguf", "gguf-q8"],
                   help="quantized linear layers on CPU, held in their serving form only (auto: for a GGUF on an "
                        "x86 CPU with AVX2, gguf = the file's own quantized blocks, input rows in 16-bit blocks, "
                        "gguf-q8 = the same with llama.cpp's 8-bit activation blocks; "
                        "else mixed = int4 for one-row steps and int8 weights x int8 activations for the rest where "
                        "thinkgate's AVX-512 VNNI kernels run, W8A8 throughout on other x86 CPUs; none with "
                        "--dtype float32)")
    p.add_argument("--head-quant", default=e.head_quant, choices=["auto", "none", "int8", "int4", "w8a8", "mixed"],
                   help="quantization of the output projection (auto: same as --weight-quant)")
    p.add_argument("--quantization", default=e.quantization, choices=["none", "fp8"],
                   help="GPU weights: fp8 = e4m3 with a scale per output channel for the attention, MLP and "
                        "expert linears (halves the bytes a decode step reads; needs compute capability 8.9+)")
    p.add_argument("--enforce-eager", action="store_true", help="GPU: no CUDA graphs for decode")
    p.add_argument("--no-cpu-kernels", action="store_true",
                   help="CPU: torch's ops only, not thinkgate's C++ kernels (built on first use, ~40 s)")
    p.add_argument("--grammar-backend", default=e.grammar_backend, choices=["auto", "llguidance", "xgrammar"],
                   help="structured outputs (auto: xgrammar on a GPU if installed, else llguidance)")
    p.add_argument("--speculative", default=e.speculative, choices=["off", "ngram"],
                   help="speculative decoding on the CPU/eager path: ngram drafts tokens from earlier text of the "
                        "same sequence (helps answers that repeat their prompt; a request may send speculative: false)")
    p.add_argument("--max-waiting", type=int, default=s.max_waiting,
                   help="sequences each engine may hold waiting beyond its batch (--max-num-seqs); past that a "
                        "request gets 429 with Retry-After at once")
    p.add_argument("--request-timeout", type=float, default=s.request_timeout_s, metavar="S",
                   help="end a request running longer than S seconds (an error chunk, or 504), billed for what it "
                        "generated (default: no timeout; a catalog model's request_timeout_s replaces it)")
    p.add_argument("--drain-timeout", type=float, default=s.drain_timeout_s, metavar="S",
                   help="on SIGTERM: readiness (/health/ready) turns false, new connections are refused, running "
                        "requests may finish for S seconds, the rest end with an error (billed); then exit 0")
    p.add_argument("--docs", action="store_true", default=s.docs,
                   help="serve /docs and /redoc (their pages load scripts from a CDN); /openapi.json is always served")
    p.add_argument("--log-level", default="info")
    document(p)  # each option's variable and [server] key, and which wins
    env_defaults(p)


def model_id_for(spec: str | None) -> str:
    from pathlib import Path

    from thinkgate.models.default_model import DEFAULT_MODEL_ALIASES

    if spec is None or spec.lower() in DEFAULT_MODEL_ALIASES:
        return "qwen/qwen2.5-coder-0.5b-instruct"
    if Path(spec).expanduser().exists():
        return Path(spec).name.removesuffix(".gguf").lower()
    return spec.lower()


def build_app(args):
    require_keys = keys_required(args)
    catalog = load_catalog_for(args, require_keys) if args.config else None  # mistakes stop the start at once
    from thinkgate.api.app import create_app
    from thinkgate.catalog import pricing_card
    from thinkgate.structured.backend import xgrammar_installed

    if args.grammar_backend == "xgrammar" and not xgrammar_installed():
        raise SystemExit("--grammar-backend xgrammar needs the optional extra: pip install 'thinkgate[xgrammar]'")
    ecfg = EngineConfig(
        model=args.model or DEFAULT_MODEL, dtype=args.dtype, device=args.device, max_model_len=args.max_model_len,
        max_num_seqs=args.max_num_seqs, max_num_batched_tokens=args.max_num_batched_tokens,
        block_size=args.block_size, kv_cache_memory=args.kv_cache_memory, kv_cache_dtype=args.kv_cache_dtype,
        enable_prefix_caching=not args.no_prefix_caching, weight_quant=args.weight_quant, head_quant=args.head_quant,
        enforce_eager=args.enforce_eager, cpu_kernels=not args.no_cpu_kernels, grammar_backend=args.grammar_backend,
        quantization=args.quantization, speculative=args.speculative,
    )
    if catalog is not None:  # engine options the catalog leaves out come from the command line
        from thinkgate.catalog import CatalogError, local_providers

        prices = catalog.prices(require_keys)
        try:
            providers = local_providers(catalog, ecfg)
        except CatalogError as e:
            raise SystemExit(str(e)) from None
    else:
        # Imported here, not above: a gateway whose catalog lists only upstream models never loads torch
        # (seconds of start-up and hundreds of MiB per gateway process).
        from thinkgate.engine.async_engine import AsyncEngine
        from thinkgate.engine.llm_engine import LLMEngine
        from thinkgate.gateway.providers.local import LocalProvider

        model_id = args.served_model_name or model_id_for(args.model)
        prices = {model_id: price_from_args(args, model_id, require_keys)}
        async_engine = AsyncEngine.build(lambda: LLMEngine.from_config(ecfg))
        providers = {model_id: LocalProvider(async_engine, model_id, pricing=pricing_card(prices[model_id]))}
    gateway = build_gateway(args, prices, require_keys)
    scfg = ServerConfig(host=args.host, port=args.port, max_waiting=args.max_waiting,
                        request_timeout_s=args.request_timeout, drain_timeout_s=args.drain_timeout,
                        docs=args.docs)
    admin_token = args.admin_token or os.environ.get("THINKGATE_ADMIN_TOKEN") or None
    return create_app(providers, scfg, gateway=gateway, admin_token=admin_token), ", ".join(providers)


def load_catalog_for(args, require_keys: bool):
    """--config: the catalog, checked (a model without a price under keys included) before anything loads."""
    from thinkgate.catalog import CatalogError, load_catalog

    one_model = [opt for opt, v in (("--model", args.model), ("--served-model-name", args.served_model_name),
                                    ("--price-input", args.price_input), ("--price-output", args.price_output),
                                    ("--price-cached-input", args.price_cached_input)) if v is not None]
    if one_model:
        raise SystemExit(f"{', '.join(one_model)} cannot be used with --config: the catalog names the models and "
                         "their prices")
    try:
        catalog = load_catalog(args.config)
        catalog.prices(require_keys)
        return catalog
    except CatalogError as e:
        raise SystemExit(str(e)) from None


def keys_required(args) -> bool:
    """Open like vLLM and Ollama for one local model on loopback; keyed with --auth or a catalog; never open on
    a public address by accident."""
    import ipaddress

    if args.auth:
        return True
    if args.no_auth:
        return False
    if args.config:
        return True
    try:
        loopback = args.host == "localhost" or ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"refusing to serve without API keys on {args.host}: add --auth (keys required) or "
                         "--no-auth (open to anyone who can reach it)")
    return False


def price_from_args(args, model_id: str, require_keys: bool):
    from thinkgate.gateway.money import Price

    given = (args.price_input, args.price_output, args.price_cached_input)
    if all(v is None for v in given):
        if require_keys:
            raise SystemExit(f"a keyed server charges for {model_id!r}, which has no price: give --price-input "
                             "and --price-output (CNY per 1000 tokens; 0 is a price)")
        return Price()
    try:
        return Price.cny(args.price_input or "0", args.price_output or "0", args.price_cached_input)
    except ValueError as e:
        raise SystemExit(f"invalid price: {e}") from None


def build_gateway(args, prices: dict, require_keys: bool):
    from thinkgate.gateway.limits import make_rate_limiter
    from thinkgate.gateway.service import Gateway
    from thinkgate.storage.db import Database, redact

    db = Database(args.db)
    logging.getLogger("thinkgate").info("gateway database: %s (keys %s)", redact(db.url),
                                        "required" if require_keys else "not required")
    gateway = Gateway(db, prices, require_keys, make_rate_limiter(args.redis))
    gateway.start_sync()
    return gateway


def cmd_serve(args) -> int:
    from thinkgate.api.lifecycle import serve

    app, model_id = build_app(args)
    logging.getLogger("thinkgate").info("serving %s on http://%s:%d", model_id, args.host, args.port)
    return 0 if serve(app, args.host, args.port, args.log_level) else 3  # 3: could not start (as uvicorn.run)


def cmd_random(args) -> int:
    from thinkgate.devtools.random_checkpoint import write_random_checkpoint

    out = write_random_checkpoint(args.out, arch=args.arch, preset=args.preset, seed=args.seed, dtype=args.dtype)
    print(out)
    return 0


def cmd_pull(args) -> int:
    from thinkgate.models.default_model import DownloadError, pull_default_model

    try:
        print(pull_default_model())
    except DownloadError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def cmd_bench_serve(args) -> int:
    from thinkgate.bench.serve import bench_serve

    bench_serve(args.url, args.model, [int(c) for c in args.concurrency.split(",")], args.num_requests,
                args.input_len, args.output_len, args.ignore_eos, args.api_key, args.shared_prefix_len, args.seed,
                args.max_seconds, args.out)
    return 0


def cmd_bench_engine(args) -> int:
    from thinkgate.bench.engine import bench_engine
    from thinkgate.models.default_model import resolve_model_spec

    bench_engine(resolve_model_spec(args.model), [int(n) for n in args.num_seqs.split(",")], args.input_len,
                 args.output_len, args.dtype, args.device, args.repeats, profile=args.profile,
                 weight_quant=args.weight_quant, head_quant=args.head_quant, cpu_kernels=not args.no_cpu_kernels)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="thinkgate", description="OpenAI-compatible API for Qwen3 thinking models")
    sub = parser.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve the chat completions API")
    _serve_args(s)
    s.set_defaults(fn=cmd_serve)
    sub.add_parser("version", help="print the version").set_defaults(fn=lambda a: print(__version__) or 0)
    sub.add_parser("pull", help="fetch the default model into the cache").set_defaults(fn=cmd_pull)
    m = sub.add_parser("model", help="model utilities")
    msub = m.add_subparsers(dest="model_cmd", required=True)
    r = msub.add_parser("random", help="write a random-weight checkpoint in Hugging Face format")
    r.add_argument("--arch", choices=["qwen2", "qwen3", "qwen3_moe"], default="qwen3")
    r.add_argument("--preset", choices=["tiny", "small", "qwen3-0.6b", "qwen3-30b-a3b", "qwen2.5-0.5b"], default="tiny")
    r.add_argument("--out", required=True)
    r.add_argument("--seed", type=int, default=0)
    r.add_argument("--dtype", choices=["bf16", "fp32"], default="bf16")
    r.set_defaults(fn=cmd_random)
    b = sub.add_parser("bench", help="benchmarks")
    bsub = b.add_subparsers(dest="bench_cmd", required=True)
    bs = bsub.add_parser("serve", help="load-test an OpenAI-compatible chat endpoint")
    bs.add_argument("--url", required=True)
    bs.add_argument("--model", required=True)
    bs.add_argument("--concurrency", default="1,4,8,32")
    bs.add_argument("--num-requests", type=int, default=32)
    bs.add_argument("--input-len", type=int, default=256)
    bs.add_argument("--output-len", type=int, default=128)
    bs.add_argument("--shared-prefix-len", type=int, default=0)
    bs.add_argument("--ignore-eos", action="store_true")
    bs.add_argument("--api-key", default=None)
    bs.add_argument("--max-seconds", type=float, default=600)
    bs.add_argument("--seed", type=int, default=0)
    bs.add_argument("--out", default=None)
    bs.set_defaults(fn=cmd_bench_serve)
    be = bsub.add_parser("engine", help="offline engine throughput (no HTTP)")
    be.add_argument("--model", default=None)
    be.add_argument("--num-seqs", default="1,8")
    be.add_argument("--input-len", type=int, default=128)
    be.add_argument("--output-len", type=int, default=128)
    be.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"])
    be.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    be.add_argument("--repeats", type=int, default=3)
    be.add_argument("--profile", action="store_true")
    be.add_argument("--weight-quant", default="auto", choices=["auto", "none", "int8", "int4", "w8a8", "mixed", "gguf", "gguf-q8"])
    be.add_argument("--head-quant", default="auto", choices=["auto", "none", "int8", "int4", "w8a8", "mixed"])
    be.add_argument("--no-cpu-kernels", action="store_true", help="CPU: torch's ops only (the comparison run)")
    be.set_defaults(fn=cmd_bench_engine)
    from thinkgate.cli_gateway import add_gateway_commands

    add_gateway_commands(sub)  # db, accounts, keys, codes
    args = parse_serve(parser, s, argv)  # with serve --config, its [server] table too
    level = getattr(args, "log_level", "info").upper()
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
