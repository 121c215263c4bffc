"""Frozen configuration per layer. Resolved runtime values (KV block count, EOS ids) live elsewhere."""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MODEL = "qwen2.5-coder-0.5b-instruct"


@dataclass(frozen=True)
class EngineConfig:
    model: str = DEFAULT_MODEL
    dtype: str = "auto"  # auto | bfloat16 | float32
    device: str = "auto"  # auto | cpu | cuda
    max_model_len: int | None = None  # default: the model's context, capped by the KV pool
    max_num_seqs: int = 32
    max_num_batched_tokens: int = 2048
    block_size: int = 16
    # The KV pool (engine/kv_pool.py): kv_cache_memory bytes, else on CPU max_model_len x max_num_seqs tokens
    # when max_model_len is set, else 8 x 8192 tokens (at most a quarter of available memory); on a GPU 85% of
    # the memory free after the weights.
    kv_cache_memory: int | None = None
    kv_cache_dtype: str = "auto"  # auto | float16 | bfloat16 | float32 (engine/kv_pool.resolve_kv_dtype)
    enable_prefix_caching: bool = True
    # Quantized linear layers on CPU, one serving form each (models/loader.resolve_weight_quant): auto = gguf
    # (the file's own blocks) for a GGUF on x86 with AVX2, else mixed where our AVX-512 VNNI kernels run, W8A8
    # elsewhere on x86, none when float32 is asked for.
    weight_quant: str = "auto"  # auto | none | int8 | int4 | w8a8 | mixed | gguf
    head_quant: str = "auto"  # the output projection: auto (= weight_quant) | none | int8 | int4
    # GPU weights: none (the checkpoint's dtype) | fp8 (e4m3, per-channel scales; layers/fp8.py).
    quantization: str = "none"
    # GPU: decode runs as captured CUDA graphs unless this is set (like vLLM's --enforce-eager).
    enforce_eager: bool = False
    # CPU: our C++ kernels (VNNI int4 matmul, fused norms/rotary/SwiGLU, paged decode attention) where
    # the CPU has AVX-512 VNNI and a compiler is present; off = torch's own ops only.
    cpu_kernels: bool = True
    # Account a decode step's text while the GPU runs the next step (auto: on with CUDA graphs).
    async_decode: bool | None = None
    # Constrained decoding: auto (xgrammar on GPU if installed, else llguidance) | llguidance | xgrammar.
    grammar_backend: str = "auto"
    # Speculative decoding: off | ngram (drafts looked up in the sequence itself; engine/speculative.py).
    speculative: str = "off"


@dataclass(frozen=True)
class ServerConfig:
    host: str = "127.0.0.1"
    port: int = 8000
    max_body_bytes: int = 32 * 1024 * 1024
    keepalive_s: float = 5.0
    # Admission control: each engine takes its batch (max_num_seqs) plus this many waiting sequences; past
    # that a request is refused at once with 429 and Retry-After, before anything is held or queued.
    max_waiting: int = 128
    request_timeout_s: float | None = None  # a request running longer ends (error chunk or 504), billed
    drain_timeout_s: float = 30.0  # on SIGTERM: how long running requests may still finish
    docs: bool = False  # /docs and /redoc (their pages load scripts from a CDN); /openapi.json is always on
