"""The fused decode-layer ops on CPU: our C++ kernels (csrc/decode_ops.cpp) behind the same signatures as
the GPU's Triton kernels (layers/triton_fused.py), so the model has one fused forward for both.

A CPU decode step of a small model spends a third of its time in small PyTorch ops (norms, rotary, the
paged-cache gather, SDPA's set-up, casts); these do each group in one call. The pieces of the one-sequence
C++ decoder (csrc/decoder.cpp) are here too; models/qwen.py's build_cpu_decoder hands it the model's layers.
"""

from __future__ import annotations

import torch

from thinkgate.layers import cpu_kernels
from thinkgate.layers.attention import AttentionMetadata, TorchPagedAttention
from thinkgate.layers.linear import MixedLinear, Q4Linear


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


def q4_form(linear) -> Q4Linear | None:
    """The int4 VNNI form a linear runs at one row (a MixedLinear's single-row path), or None without one."""
    if isinstance(linear, MixedLinear):
        linear = linear.single
    return linear if isinstance(linear, Q4Linear) else None


def new_decoder(num_heads: int, num_kv_heads: int, head_dim: int, eps: float, scale: float, cos: torch.Tensor,
                sin: torch.Tensor, final_norm: torch.Tensor):
    """An empty csrc/decoder.cpp Q4Decoder: a stack of dense pre-norm layers run as one C++ call per
    single-sequence decode step. The model fills it with `add_decoder_layer`, first layer first."""
    return cpu_kernels.load().Q4Decoder(num_heads, num_kv_heads, head_dim, eps, scale, cos, sin, final_norm.detach())


def add_decoder_layer(decoder, input_norm: torch.Tensor, post_attention_norm: torch.Tensor,
                      q_norm: torch.Tensor | None, k_norm: torch.Tensor | None, qkv: Q4Linear, o: Q4Linear,
                      gate_up: Q4Linear, down: Q4Linear, kv: tuple[torch.Tensor, torch.Tensor]) -> None:
    """One layer: its RMSNorm weights (q/k norms None where the model has none), its fused linears in
    int4 VNNI form (qkv may carry a bias) and its paged (k, v) cache."""
    def weight(t):
        return None if t is None else t.detach()

    def q4(lin: Q4Linear) -> list[torch.Tensor]:
        return [lin.packed, lin.scales, lin.mins]

    decoder.add_layer(weight(input_norm), weight(post_attention_norm), weight(q_norm), weight(k_norm),
                      q4(qkv), qkv._bias32, q4(o), q4(gate_up), q4(down), *kv)
