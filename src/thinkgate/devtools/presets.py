"""Shapes of real Qwen checkpoints (and a tiny one for tests), used to build random-weight models."""

from __future__ import annotations

ARCHITECTURES = {
    "qwen2": ("Qwen2ForCausalLM", "qwen2"),
    "qwen3": ("Qwen3ForCausalLM", "qwen3"),
    "qwen3_moe": ("Qwen3MoeForCausalLM", "qwen3_moe"),
}

# Each preset lists the dense shape; MoE presets add the expert shape. `tiny` carries both so every
# architecture can be built small.
PRESETS: dict[str, dict] = {
    "tiny": dict(
        hidden_size=64, num_hidden_layers=3, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        intermediate_size=128, vocab_size=None, max_position_embeddings=4096, rope_theta=1000000.0,
        tie_word_embeddings=False, num_experts=8, num_experts_per_tok=2, moe_intermediate_size=32,
    ),
    # Small enough for tests, with every K a multiple of 128 so the CPU int4 kernel (csrc) takes each layer.
    "small": dict(
        hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
        intermediate_size=256, vocab_size=None, max_position_embeddings=4096, rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "qwen3-0.6b": dict(
        hidden_size=1024, num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=8, head_dim=128,
        intermediate_size=3072, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
    "qwen3-30b-a3b": dict(
        hidden_size=2048, num_hidden_layers=48, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        intermediate_size=6144, vocab_size=151936, max_position_embeddings=40960, rope_theta=1000000.0,
        tie_word_embeddings=False, num_experts=128, num_experts_per_tok=8, moe_intermediate_size=768,
    ),
    "qwen2.5-0.5b": dict(
        hidden_size=896, num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2, head_dim=64,
        intermediate_size=4864, vocab_size=151936, max_position_embeddings=32768, rope_theta=1000000.0,
        tie_word_embeddings=True,
    ),
}


def hf_config(arch: str, preset: str, vocab_size: int, dtype: str) -> dict:
    """The config.json a real checkpoint of `arch` with the `preset` shape would carry."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; choose one of {sorted(ARCHITECTURES)}")
    if preset not in PRESETS:
        raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
    p = PRESETS[preset]
    class_name, model_type = ARCHITECTURES[arch]
    cfg = {
        "architectures": [class_name],
        "model_type": model_type,
        "hidden_size": p["hidden_size"],
        "num_hidden_layers": p["num_hidden_layers"],
        "num_attention_heads": p["num_attention_heads"],
        "num_key_value_heads": p["num_key_value_heads"],
        "intermediate_size": p["intermediate_size"],
        "vocab_size": p["vocab_size"] or vocab_size,
        "max_position_embeddings": p["max_position_embeddings"],
        "rope_theta": p["rope_theta"],
        "rope_scaling": None,
        "rms_norm_eps": 1e-6,
        "hidden_act": "silu",
        "tie_word_embeddings": p["tie_word_embeddings"],
        "bos_token_id": None,
        "eos_token_id": None,
        "torch_dtype": dtype,
        "use_sliding_window": False,
        "sliding_window": None,
        "max_window_layers": p["num_hidden_layers"],
        "attention_dropout": 0.0,
    }
    if arch in ("qwen3", "qwen3_moe"):
        cfg["head_dim"] = p["head_dim"]
        cfg["attention_bias"] = False
    if arch == "qwen3_moe":
        if "num_experts" not in p:
            raise ValueError(f"preset {preset!r} has no MoE shape; use tiny or qwen3-30b-a3b with qwen3_moe")
        cfg.update(
            num_experts=p["num_experts"], num_experts_per_tok=p["num_experts_per_tok"],
            moe_intermediate_size=p["moe_intermediate_size"], norm_topk_prob=True, decoder_sparse_step=1,
            mlp_only_layers=[], output_router_logits=False, router_aux_loss_coef=0.001,
        )
    return cfg


def tensor_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Tensor names and shapes exactly as in real Hugging Face checkpoints of this config."""
    h, n_layers = cfg["hidden_size"], cfg["num_hidden_layers"]
    n_q, n_kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // n_q
    qwen2 = cfg["model_type"] == "qwen2"
    moe = cfg["model_type"] == "qwen3_moe"
    shapes: dict[str, tuple[int, ...]] = {"model.embed_tokens.weight": (cfg["vocab_size"], h)}
    for i in range(n_layers):
        pre = f"model.layers.{i}."
        shapes[pre + "input_layernorm.weight"] = (h,)
        shapes[pre + "post_attention_layernorm.weight"] = (h,)
        shapes[pre + "self_attn.q_proj.weight"] = (n_q * d, h)
        shapes[pre + "self_attn.k_proj.weight"] = (n_kv * d, h)
        shapes[pre + "self_attn.v_proj.weight"] = (n_kv * d, h)
        shapes[pre + "self_attn.o_proj.weight"] = (h, n_q * d)
        if qwen2:
            shapes[pre + "self_attn.q_proj.bias"] = (n_q * d,)
            shapes[pre + "self_attn.k_proj.bias"] = (n_kv * d,)
            shapes[pre + "self_attn.v_proj.bias"] = (n_kv * d,)
        else:
            shapes[pre + "self_attn.q_norm.weight"] = (d,)
            shapes[pre + "self_attn.k_norm.weight"] = (d,)
        if moe and is_sparse_layer(cfg, i):
            e, inter = cfg["num_experts"], cfg["moe_intermediate_size"]
            shapes[pre + "mlp.gate.weight"] = (e, h)
            for j in range(e):
                shapes[pre + f"mlp.experts.{j}.gate_proj.weight"] = (inter, h)
                shapes[pre + f"mlp.experts.{j}.up_proj.weight"] = (inter, h)
                shapes[pre + f"mlp.experts.{j}.down_proj.weight"] = (h, inter)
        else:
            inter = cfg["intermediate_size"]
            shapes[pre + "mlp.gate_proj.weight"] = (inter, h)
            shapes[pre + "mlp.up_proj.weight"] = (inter, h)
            shapes[pre + "mlp.down_proj.weight"] = (h, inter)
    shapes["model.norm.weight"] = (h,)
    if not cfg["tie_word_embeddings"]:
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    return shapes


def is_sparse_layer(cfg: dict, layer: int) -> bool:
    """The transformers rule for which Qwen3-MoE layers use experts."""
    step = cfg.get("decoder_sparse_step", 1) or 1
    n_exp = cfg.get("num_experts", cfg.get("num_local_experts", 0)) or 0
    return layer not in (cfg.get("mlp_only_layers") or []) and n_exp > 0 and (layer + 1) % step == 0
