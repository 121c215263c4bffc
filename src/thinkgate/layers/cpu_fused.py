"""The fused decode-layer ops on CPU: our C++ kernels (csrc/decode_ops.cpp) behind the same signatures as
the GPU's Triton kernels (layers/triton_fused.py), so the model has one fused forward for both.

A CPU decode step of a small model spends a third of its time in small PyTorch ops (norms, rotary, the
paged-cache gather, SDPA's set-up, casts); these do each group in one call.
"""

from __future__ import annotations

import torch

from thinkgate.layers import cpu_kernels
from thinkgate.layers.attention import AttentionMetadata, TorchPagedAttention


def available() -> bool:
    return cpu_kernels.load() is not None


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (norm(x + residual) * weight, x + residual); without a residual the second value is x."""
    out, res = cpu_kernels.load().rms_norm(x.contiguous(), weight, eps, residual)
    return out, res


def qk_norm_rope_store(qkv: torch.Tensor, nq: int, nkv: int, q_weight: torch.Tensor | None,
                       k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                       positions: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor) -> None:
    """In place on qkv [T, Hq + 2 Hkv, D]: q/k normed (with weights) and rotated; k, v stored in the cache."""
    cpu_kernels.load().qk_norm_rope_store(qkv, nq, nkv, q_weight, k_weight, eps, cos, sin, positions,
                                          slot_mapping, k_cache, v_cache)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    return cpu_kernels.load().silu_mul(x.contiguous())


class CpuPagedAttention:
    """Decode reads the paged fp32 cache in place (no gather, no SDPA set-up); prefill and mixed steps go
    through the reference backend."""

    def __init__(self, scale: float, compute_dtype: torch.dtype | None = None):
        self.scale = scale
        self.compute_dtype = compute_dtype
        self.reference = TorchPagedAttention(scale, compute_dtype)

    def forward(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                k_new: torch.Tensor | None = None, v_new: torch.Tensor | None = None) -> torch.Tensor:
        if meta.kind == "decode" and meta.block_tables is not None:
            return cpu_kernels.load().paged_decode_attention(q, k_cache, v_cache, meta.block_tables,
                                                             meta.context_lens, self.scale)
        return self.reference.forward(q, k_cache, v_cache, meta, k_new, v_new)
