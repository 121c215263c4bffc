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


def build_decoder(model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
    """The model's layer stack as one C++ object (csrc/decoder.cpp) for single-sequence decode steps, or
    None when some layer cannot run there (MoE layers, linears without an int4 VNNI form)."""
    from thinkgate.layers.linear import MixedLinear, Q4Linear
    from thinkgate.models.qwen import DenseMLP

    def q4(layer) -> Q4Linear | None:
        if isinstance(layer, MixedLinear):
            layer = layer.single
        return layer if isinstance(layer, Q4Linear) else None

    cfg = model.cfg
    decoder = cpu_kernels.load().Q4Decoder(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps,
                                           model.attn_backend.scale, model.rope.cos, model.rope.sin,
                                           model.norm.weight.detach())
    for layer, (kc, vc) in zip(model.layers, kv_caches, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        if not isinstance(mlp, DenseMLP):
            return None
        parts = [q4(attn.qkv_proj), q4(attn.o_proj), q4(mlp.gate_up_proj), q4(mlp.down_proj)]
        if any(p is None for p in parts):
            return None
        qkv, o, gate_up, down = ([p.packed, p.scales, p.mins] for p in parts)
        decoder.add_layer(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                          None if attn.q_norm is None else attn.q_norm.weight.detach(),
                          None if attn.k_norm is None else attn.k_norm.weight.detach(),
                          qkv, parts[0]._bias32, o, gate_up, down, kc, vc)
    return decoder
