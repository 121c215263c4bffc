"""Qwen2 / Qwen3 / Qwen3-MoE decoder in plain PyTorch, over a flat batch of tokens and a paged KV cache.

One class covers all three: Qwen2 adds q/k/v biases, Qwen3 adds per-head q/k RMSNorm before RoPE, and
Qwen3-MoE swaps the MLP for routed experts. Weights use fused layouts (qkv, gate_up, stacked experts);
the loader translates checkpoint names into them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from thinkgate.layers import cpu_fused
from thinkgate.layers.attention import AttentionMetadata, TorchPagedAttention, write_kv
from thinkgate.layers.ggml_linear import rows_like
from thinkgate.layers.moe import grouped_moe, reference_moe, route, use_fused
from thinkgate.layers.norm import RMSNorm
from thinkgate.layers.rotary import RotaryEmbedding, apply_rotary
from thinkgate.models.config import ModelConfig


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.nq, self.nkv, self.d = cfg.num_heads, cfg.num_kv_heads, cfg.head_dim
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.nq + 2 * self.nkv) * self.d, bias=cfg.qkv_bias)
        self.o_proj = nn.Linear(self.nq * self.d, cfg.hidden_size, bias=False)
        self.q_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None
        self.k_norm = RMSNorm(self.d, cfg.rms_norm_eps) if cfg.qk_norm else None

    def forward(self, x, rope: tuple[torch.Tensor, torch.Tensor], kv: tuple[torch.Tensor, torch.Tensor],
                meta: AttentionMetadata, backend, keep: torch.Tensor | None = None) -> torch.Tensor | None:
        """keep: the only rows whose output is wanted (every row's K/V is still written); an empty keep returns None."""
        t = x.shape[0]
        qkv = self.qkv_proj(x).view(t, self.nq + 2 * self.nkv, self.d)  # [T, Hq+2Hkv, D]
        qk, v = qkv[:, : self.nq + self.nkv], qkv[:, self.nq + self.nkv:]
        if self.q_norm is not None:
            qk = torch.cat([self.q_norm(qk[:, : self.nq]), self.k_norm(qk[:, self.nq:])], dim=1)
        qk = apply_rotary(qk, *rope)  # q and k heads rotate together: one set of ops, not two
        q, k = qk[:, : self.nq], qk[:, self.nq:]
        write_kv(kv[0], kv[1], k, v, meta.slot_mapping)
        if keep is not None and keep.numel() == 0:
            return None
        o = backend.forward(q, kv[0], kv[1], meta, k, v)  # [T, Hq, D]
        if keep is not None:
            o = o[keep]
        return self.o_proj(o.reshape(o.shape[0], self.nq * self.d))

    def forward_fused(self, x, positions: torch.Tensor, rope: RotaryEmbedding,
                      kv: tuple[torch.Tensor, torch.Tensor], meta: AttentionMetadata, backend, ops,
                      keep: torch.Tensor | None = None) -> torch.Tensor | None:
        """The same attention with q/k norm, rotary and the cache write in one fused op (`ops`: the Triton
        kernels on a GPU, our C++ ones on a CPU)."""
        t = x.shape[0]
        qkv = self.qkv_proj(x).view(t, self.nq + 2 * self.nkv, self.d)
        has_norm = self.q_norm is not None
        ops.qk_norm_rope_store(qkv, self.nq, self.nkv, self.q_norm.weight if has_norm else None,
                           self.k_norm.weight if has_norm else None, self.q_norm.eps if has_norm else 0.0,
                           rope.cos, rope.sin, positions, meta.slot_mapping, kv[0], kv[1])
        if keep is not None and keep.numel() == 0:
            return None
        q, k, v = qkv.split([self.nq, self.nkv, self.nkv], dim=1)
        o = backend.forward(q, kv[0], kv[1], meta, k, v)  # [T, Hq, D]
        if keep is not None:
            o = o[keep]
        return self.o_proj(o.reshape(o.shape[0], self.nq * self.d))


class DenseMLP(nn.Module):
    def __init__(self, hidden: int, inter: int):
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * inter, bias=False)
        self.down_proj = nn.Linear(inter, hidden, bias=False)

    def forward(self, x, ops=None):
        if ops is not None:
            return self.down_proj(ops.silu_mul(self.gate_up_proj(x)))
        swiglu = getattr(self.gate_up_proj, "swiglu", None)  # a GGUF's blocks: the product in panels, activated
        act = None if swiglu is None else swiglu(x, reuse=True)  # a kept buffer, read by down_proj at once
        if act is not None:
            return self.down_proj(act)
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class SparseMoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        e, i, h = cfg.num_experts, cfg.moe_intermediate_size, cfg.hidden_size
        self.top_k, self.norm_topk = cfg.num_experts_per_tok, cfg.norm_topk_prob
        self.gate = nn.Linear(h, e, bias=False)
        self.w13 = nn.Parameter(torch.empty(e, 2 * i, h))  # gate and up rows of each expert
        self.w2 = nn.Parameter(torch.empty(e, h, i))
        self.use_reference = False
        self.fp8 = None  # layers/fp8.Fp8Experts when served with --quantization fp8

    def forward(self, x, ops=None):
        weights, experts = route(self.gate(x), self.top_k, self.norm_topk, x.dtype)
        if self.fp8 is not None:
            return self.fp8(x, weights, experts)
        if not self.use_reference and use_fused(x):
            from thinkgate.layers.triton_moe import fused_moe

            return fused_moe(x, weights, experts, self.w13, self.w2)
        fn = reference_moe if self.use_reference else grouped_moe
        return fn(x, weights, experts, self.w13, self.w2)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.index = layer  # its place in the stack (the GGUF blocks loader looks its tensors up by it)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.mlp = SparseMoE(cfg) if cfg.is_sparse_layer(layer) else DenseMLP(cfg.hidden_size, cfg.intermediate_size)

    def forward(self, x, rope, kv, meta, backend, keep: torch.Tensor | None = None):
        """keep: see QwenForCausalLM.forward; the result has those rows only."""
        a = self.self_attn(self.input_layernorm(x), rope, kv, meta, backend, keep)
        if a is None:
            return x[:0]
        x = (x if keep is None else x[keep]) + a
        return x + self.mlp(self.post_attention_layernorm(x))

    def forward_fused(self, x, residual, positions, rope, kv, meta, backend, ops, keep: torch.Tensor | None = None):
        """Fused form: the residual travels beside the hidden state, and each add is fused into the next norm."""
        h, residual = ops.rms_norm(x, self.input_layernorm.weight, self.input_layernorm.eps, residual)
        x = self.self_attn.forward_fused(h, positions, rope, kv, meta, backend, ops, keep)
        if x is None:
            return h[:0], residual[:0]
        if keep is not None:
            residual = residual[keep]
        h, residual = ops.rms_norm(x, self.post_attention_layernorm.weight, self.post_attention_layernorm.eps,
                                   residual)
        return self.mlp(h, ops=ops), residual


class QwenForCausalLM(nn.Module):
    def __init__(self, cfg: ModelConfig, max_positions: int | None = None):
        super().__init__()
        self.cfg = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.lm_head = nn.Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        self.rope = RotaryEmbedding(cfg.head_dim, max_positions or cfg.max_position_embeddings, cfg.rope_theta,
                                    cfg.rope_scaling)
        self.attn_backend = TorchPagedAttention(cfg.head_dim ** -0.5)
        # Fused ops for norms, rotary + cache write and SwiGLU, set by the runner: the Triton kernels
        # (layers/triton_fused) on a GPU, our C++ ones (layers/cpu_fused) on a CPU; None = plain PyTorch.
        self.fused_ops = None

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, kv_caches: list[tuple],
                meta: AttentionMetadata, keep: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids, positions: [T] -> final hidden states [T, H], or with `keep` (row indices) those rows'
        alone, [len(keep), H]. Later steps read only the layers' keys and values, so past the last layer's
        K/V the other rows are not computed (llama.cpp skips them the same way): a prefill chunk that samples
        one token runs the last layer's attention output, o_proj and MLP for one row, one that samples none
        stops at the last layer's K/V. The kept rows' linears choose their kernels as the whole chunk's would
        (layers/ggml_linear.rows_like), so their values are those of the full computation."""
        x = self.embed_tokens(input_ids)
        ops = self.fused_ops
        *body, last = zip(self.layers, kv_caches, strict=True)
        if ops is not None:
            residual = None
            for layer, kv in body:
                x, residual = layer.forward_fused(x, residual, positions, self.rope, kv, meta, self.attn_backend,
                                                  ops)
            with rows_like(x.shape[0]):
                x, residual = last[0].forward_fused(x, residual, positions, self.rope, last[1], meta,
                                                    self.attn_backend, ops, keep)
            if x.shape[0] == 0:
                return x
            return ops.rms_norm(x, self.norm.weight, self.norm.eps, residual)[0]
        rope = self.rope.table(positions, x.dtype)
        for layer, kv in body:
            x = layer(x, rope, kv, meta, self.attn_backend)
        with rows_like(x.shape[0]):
            x = last[0](x, rope, last[1], meta, self.attn_backend, keep)
        return x if x.shape[0] == 0 else self.norm(x)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()  # [N, V]

    def set_moe_reference(self, on: bool) -> None:
        for layer in self.layers:
            if isinstance(layer.mlp, SparseMoE):
                layer.mlp.use_reference = on


def build_cpu_decoder(model: QwenForCausalLM, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
    """The model's layer stack as one C++ object (layers/cpu_fused.new_decoder, csrc/decoder.cpp) for
    single-sequence CPU decode steps, or None when some layer cannot run there (MoE layers, linears without
    an int4 VNNI form)."""
    cfg = model.cfg
    decoder = cpu_fused.new_decoder(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps,
                                    model.attn_backend.scale, model.rope.cos, model.rope.sin, model.norm.weight)
    for layer, kv in zip(model.layers, kv_caches, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        if not isinstance(mlp, DenseMLP):
            return None
        linears = [cpu_fused.q4_form(m) for m in (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)]
        if any(m is None for m in linears):
            return None
        cpu_fused.add_decoder_layer(decoder, layer.input_layernorm.weight, layer.post_attention_layernorm.weight,
                                    None if attn.q_norm is None else attn.q_norm.weight,
                                    None if attn.k_norm is None else attn.k_norm.weight, *linears, kv)
    return decoder
