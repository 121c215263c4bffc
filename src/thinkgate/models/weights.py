"""Translate checkpoint tensor names (Hugging Face layout) into our fused module layout."""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator

import torch

from thinkgate.models.config import ModelConfig

_LAYER = re.compile(r"^model\.layers\.(\d+)\.(.+)$")


class CheckpointError(ValueError):
    """The weights on disk do not fit the config (missing, extra or mis-shaped tensors, corrupt files)."""


def convert_state_dict(cfg: ModelConfig, names: list[str], get: Callable[[str], torch.Tensor],
                       dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """Build our state dict from HF-named tensors fetched lazily with `get(name)`."""
    sd: dict[str, torch.Tensor] = {}
    for part in convert_in_parts(cfg, names, get, dtype):
        sd.update(part)
    return sd


def convert_in_parts(cfg: ModelConfig, names: list[str], get: Callable[[str], torch.Tensor],
                     dtype: torch.dtype) -> Iterator[dict[str, torch.Tensor]]:
    """Our state dict one decoder layer at a time, then the embedding, final norm and output head, so a loader
    can turn each part into its serving form before the next is read (the float model never exists whole)."""
    have = set(names)

    def take(name: str) -> torch.Tensor:
        if name not in have:
            raise CheckpointError(f"checkpoint is missing tensor {name!r}")
        return get(name).to(dtype)

    for i in range(cfg.num_layers):
        sd: dict[str, torch.Tensor] = {}
        p, o = f"model.layers.{i}.", f"layers.{i}."
        sd[o + "input_layernorm.weight"] = take(p + "input_layernorm.weight")
        sd[o + "post_attention_layernorm.weight"] = take(p + "post_attention_layernorm.weight")
        a = p + "self_attn."
        sd[o + "self_attn.qkv_proj.weight"] = torch.cat([take(a + f"{x}_proj.weight") for x in "qkv"])
        if cfg.qkv_bias:
            sd[o + "self_attn.qkv_proj.bias"] = torch.cat([take(a + f"{x}_proj.bias") for x in "qkv"])
        sd[o + "self_attn.o_proj.weight"] = take(a + "o_proj.weight")
        if cfg.qk_norm:
            sd[o + "self_attn.q_norm.weight"] = take(a + "q_norm.weight")
            sd[o + "self_attn.k_norm.weight"] = take(a + "k_norm.weight")
        m = p + "mlp."
        if cfg.is_sparse_layer(i):
            sd[o + "mlp.gate.weight"] = take(m + "gate.weight")
            sd[o + "mlp.w13"] = torch.stack([
                torch.cat([take(m + f"experts.{e}.gate_proj.weight"), take(m + f"experts.{e}.up_proj.weight")])
                for e in range(cfg.num_experts)])
            sd[o + "mlp.w2"] = torch.stack([take(m + f"experts.{e}.down_proj.weight")
                                            for e in range(cfg.num_experts)])
        else:
            sd[o + "mlp.gate_up_proj.weight"] = torch.cat([take(m + "gate_proj.weight"), take(m + "up_proj.weight")])
            sd[o + "mlp.down_proj.weight"] = take(m + "down_proj.weight")
        yield sd
    top = {"embed_tokens.weight": take("model.embed_tokens.weight"), "norm.weight": take("model.norm.weight")}
    if cfg.tie_word_embeddings or "lm_head.weight" not in have:
        top["lm_head.weight"] = top["embed_tokens.weight"]
    else:
        top["lm_head.weight"] = take("lm_head.weight")
    yield top


def check_shapes(model: torch.nn.Module, sd: dict[str, torch.Tensor], partial: bool = False) -> None:
    """`partial`: `sd` is one part (convert_in_parts): check what it holds, not what it lacks."""
    expected = {k: v.shape for k, v in model.state_dict().items()}
    for k, shape in expected.items():
        if k not in sd:
            if partial:
                continue
            raise CheckpointError(f"checkpoint lacks weights for {k}")
        if tuple(sd[k].shape) != tuple(shape):
            raise CheckpointError(f"tensor for {k} has shape {tuple(sd[k].shape)}, config implies {tuple(shape)}")
