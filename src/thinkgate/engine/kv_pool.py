"""How many tokens a CPU engine's KV pool holds, and in which dtype.

The pool is sized from what is asked for, like llama.cpp's `-c` (the total) and `-np` (the sequences):
`max_model_len x max_num_seqs` when a context length is given, `kv_cache_memory` bytes when that is given,
else a default of 8 sequences of 8192 tokens. The default takes at most a quarter of the memory available
after the weights, an explicit ask at most 80 %; past that the pool shrinks and the log says so.

K and V are stored in bf16 for a quantized model whose attention reads them through the reference path (it
converts what it gathers), half of fp32's bytes; our C++ paged-attention kernels read fp32, and an exact fp32
model keeps an exact pool.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch

DEFAULT_TOKENS = 8 * 8192
DEFAULT_FRACTION = 0.25  # of the memory available after the weights, for the default pool
ASKED_FRACTION = 0.8  # for a pool asked for by context length and sequences


@dataclass(frozen=True)
class PoolSize:
    tokens: int
    source: str  # where the size came from, for the log and the catalog's memory check
    asked_tokens: int  # before any shrinking to fit memory

    @property
    def shrunk(self) -> bool:
        return self.tokens < self.asked_tokens


def bytes_per_token(num_layers: int, num_kv_heads: int, head_dim: int, dtype: torch.dtype) -> int:
    return 2 * num_layers * num_kv_heads * head_dim * dtype.itemsize


def resolve_kv_dtype(asked: str, compute_dtype: torch.dtype, device: str, cpu_kernels_run: bool,
                     quantized: bool, gguf_blocks: bool = False) -> torch.dtype:
    """`asked`: auto, float32, float16 or bfloat16. auto on CPU: fp32 for an exact float model (the reference)
    and where our C++ kernels read the pool; fp16 for a GGUF served from its own blocks (llama.cpp's own cache
    dtype, and 3 more mantissa bits than bf16 in the same bytes); bf16 for the other quantized forms (the pool's
    rounding is small beside theirs, BENCHMARKS.md); on a GPU the dtype attention computes in."""
    if asked in ("float32", "fp32"):
        return torch.float32
    if asked in ("bfloat16", "bf16"):
        return torch.bfloat16
    if asked in ("float16", "fp16"):
        return torch.float16
    if asked != "auto":
        raise ValueError(f"unknown KV cache dtype {asked!r}; choose auto, float16, bfloat16 or float32")
    if device != "cpu":
        return compute_dtype
    if gguf_blocks:  # its C++ decoder reads fp16 (and fp32) pools, on any x86 CPU
        return torch.float16
    return torch.float32 if cpu_kernels_run or not quantized else torch.bfloat16


def cpu_kernels_expected(cpu_kernels: bool) -> bool:
    """Whether the CPU engine will decode on our C++ kernels, judged without compiling them (the memory check
    before loading); the engine itself asks layers.cpu_fused.available()."""
    from thinkgate.layers.cpu_kernels import cpu_supports_vnni

    return cpu_kernels and os.environ.get("THINKGATE_CPU_KERNELS", "1") != "0" and cpu_supports_vnni()


def cpu_pool_size(kv_cache_memory: int | None, max_model_len: int | None, max_num_seqs: int, per_token: int,
                  available: int, block_size: int) -> PoolSize:
    """The CPU pool's capacity in tokens (a whole number of blocks); `available`: bytes free after the weights."""
    if kv_cache_memory is not None:
        tokens = kv_cache_memory // per_token
        tokens -= tokens % block_size
        return PoolSize(tokens, f"--kv-cache-memory {kv_cache_memory}", tokens)
    if max_model_len:
        asked = max_model_len * max_num_seqs
        source, fraction = f"--max-model-len {max_model_len} x --max-num-seqs {max_num_seqs}", ASKED_FRACTION
    else:
        asked = DEFAULT_TOKENS
        source, fraction = "the default: 8 sequences of 8192 tokens, at most a quarter of available memory", \
            DEFAULT_FRACTION
    asked = -(-asked // block_size) * block_size
    fits = int(available * fraction) // per_token
    tokens = min(asked, fits - fits % block_size)
    return PoolSize(tokens, source, asked)
