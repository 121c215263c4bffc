"""`--weight-quant gguf`: swap a GGUF model's linears and embedding for modules over the file's own blocks.

Called by the loader on each part as it is loaded (a decoder layer, then the whole model for the embedding and
head), after the dequantized floats are in place: each linear whose tensors are all in a type the kernels take
(layers/ggml_linear.SUPPORTED_TYPES) is replaced and its float weight dropped; any other (F16/F32 tensors,
Q2_K/Q3_K) keeps the dequantized float weight, which is exact. MoE experts stay float.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from thinkgate.layers.ggml_linear import SUPPORTED_TYPES, GGMLEmbedding, GGMLLinear


def _blocks(g, name: str) -> tuple[int, torch.Tensor] | None:
    stored = g.stored(name)
    if stored is None or stored[0] not in SUPPORTED_TYPES:
        return None
    return SUPPORTED_TYPES[stored[0]], torch.from_numpy(np.array(stored[1], dtype=np.uint8, copy=True))  # off the map


def _linear(g, names: list[str], dense: nn.Linear, act_bits: int) -> GGMLLinear | None:
    parts = [_blocks(g, n) for n in names]
    if any(p is None for p in parts):
        return None
    return GGMLLinear(parts, dense.in_features, dense.bias, act_bits)


def serve_gguf_blocks(g, module: nn.Module, act_bits: int = 16) -> int:
    """Replace what `module` (a DecoderLayer, or the whole model) holds; returns how many modules changed."""
    from thinkgate.models.qwen import DecoderLayer, DenseMLP

    swaps: list[tuple[nn.Module, str, nn.Module | None]] = []
    if isinstance(module, DecoderLayer):
        i, attn, mlp = module.index, module.self_attn, module.mlp
        b = f"blk.{i}."
        swaps.append((attn, "qkv_proj", _linear(g, [b + "attn_q.weight", b + "attn_k.weight", b + "attn_v.weight"],
                                                attn.qkv_proj, act_bits)))
        swaps.append((attn, "o_proj", _linear(g, [b + "attn_output.weight"], attn.o_proj, act_bits)))
        if isinstance(mlp, DenseMLP):
            swaps.append((mlp, "gate_up_proj", _linear(g, [b + "ffn_gate.weight", b + "ffn_up.weight"],
                                                       mlp.gate_up_proj, act_bits)))
            swaps.append((mlp, "down_proj", _linear(g, [b + "ffn_down.weight"], mlp.down_proj, act_bits)))
    elif isinstance(getattr(module, "embed_tokens", None), nn.Embedding):
        emb = module.embed_tokens
        tied = g.stored("output.weight") is None
        blocks = _blocks(g, "token_embd.weight")
        head_blocks = blocks if tied else _blocks(g, "output.weight")
        head = None if head_blocks is None else GGMLLinear([head_blocks], module.lm_head.in_features, act_bits=act_bits)
        if blocks is not None:
            if tied and head is not None:  # the lookup reads the head's blocks, in its kernels' layout: one copy
                blocks = (head.types[0], head.blocks[0])
            swaps.append((module, "embed_tokens", GGMLEmbedding(blocks[0], blocks[1], emb.embedding_dim,
                                                                emb.weight.dtype)))
        if head is not None:
            swaps.append((module, "lm_head", head))
    count = 0
    for parent, name, new in swaps:
        if new is not None:
            setattr(parent, name, new)
            count += 1
    return count


def build_ggml_decoder(model, kv_caches: list[tuple[torch.Tensor, torch.Tensor]]):
    """The layer stack as one C++ object (csrc/ggml_decoder.cpp) for decode steps of any batch, or None when some
    layer cannot run there (MoE layers, a linear left in floats)."""
    from thinkgate.layers import cpu_kernels
    from thinkgate.models.qwen import DenseMLP

    ops = cpu_kernels.load_ggml()
    if ops is None or kv_caches[0][0].dtype not in (torch.float16, torch.float32):
        return None
    cfg = model.cfg
    decoder = ops.GGMLDecoder(cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rms_norm_eps, model.attn_backend.scale,
                              model.rope.cos, model.rope.sin, model.norm.weight.detach())
    for layer, (k_cache, v_cache) in zip(model.layers, kv_caches, strict=True):
        attn, mlp = layer.self_attn, layer.mlp
        if not isinstance(mlp, DenseMLP):
            return None
        linears = (attn.qkv_proj, attn.o_proj, mlp.gate_up_proj, mlp.down_proj)
        if not all(isinstance(m, GGMLLinear) for m in linears):
            return None
        qkv, o, gate_up, down = linears
        decoder.add_layer(layer.input_layernorm.weight.detach(), layer.post_attention_layernorm.weight.detach(),
                          None if attn.q_norm is None else attn.q_norm.weight.detach(),
                          None if attn.k_norm is None else attn.k_norm.weight.detach(),
                          qkv.types, qkv.blocks, qkv.bias32, o.types, o.blocks, gate_up.types, gate_up.blocks,
                          down.types, down.blocks, k_cache, v_cache, down.act_bits)
    return decoder
