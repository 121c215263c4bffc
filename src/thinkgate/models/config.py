"""Our model config, translated at the border from Hugging Face config.json (old and v5 spellings)."""

from __future__ import annotations

from dataclasses import dataclass, field

SUPPORTED_ARCHS = ("Qwen2ForCausalLM", "Qwen3ForCausalLM", "Qwen3MoeForCausalLM")


class UnsupportedModelError(ValueError):
    """The checkpoint's architecture or format is not one we serve."""


@dataclass(frozen=True)
class ModelConfig:
    arch: str
    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    max_position_embeddings: int
    rope_theta: float
    rms_norm_eps: float
    tie_word_embeddings: bool
    qkv_bias: bool
    qk_norm: bool
    rope_scaling: dict | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    norm_topk_prob: bool = False
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = field(default_factory=tuple)
    torch_dtype: str = "bfloat16"

    @property
    def is_moe(self) -> bool:
        return self.num_experts > 0

    def is_sparse_layer(self, layer: int) -> bool:
        step = self.decoder_sparse_step or 1
        return self.is_moe and layer not in self.mlp_only_layers and (layer + 1) % step == 0

    @classmethod
    def from_hf(cls, cfg: dict) -> ModelConfig:
        archs = cfg.get("architectures") or []
        arch = archs[0] if archs else {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
                                        "qwen3_moe": "Qwen3MoeForCausalLM"}.get(cfg.get("model_type", ""), "")
        if arch not in SUPPORTED_ARCHS:
            raise UnsupportedModelError(
                f"unsupported architecture {arch or cfg.get('model_type')!r}; supported: {', '.join(SUPPORTED_ARCHS)}")
        rope = cfg.get("rope_parameters") or {}
        theta = rope.get("rope_theta", cfg.get("rope_theta", 10000.0))
        scaling = cfg.get("rope_scaling")
        if rope and rope.get("rope_type", "default") != "default":
            scaling = dict(rope)
        heads = cfg["num_attention_heads"]
        moe = arch == "Qwen3MoeForCausalLM"
        return cls(
            arch=arch,
            hidden_size=cfg["hidden_size"],
            num_layers=cfg["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=cfg.get("num_key_value_heads") or heads,
            head_dim=cfg.get("head_dim") or cfg["hidden_size"] // heads,
            intermediate_size=cfg.get("intermediate_size", 0),
            vocab_size=cfg["vocab_size"],
            max_position_embeddings=cfg.get("max_position_embeddings", 32768),
            rope_theta=float(theta),
            rms_norm_eps=cfg.get("rms_norm_eps", 1e-6),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            qkv_bias=arch == "Qwen2ForCausalLM" or bool(cfg.get("attention_bias", False)),
            qk_norm=arch != "Qwen2ForCausalLM",
            rope_scaling=scaling,
            num_experts=(cfg.get("num_experts") or cfg.get("num_local_experts") or 0) if moe else 0,
            num_experts_per_tok=cfg.get("num_experts_per_tok", 0) if moe else 0,
            moe_intermediate_size=cfg.get("moe_intermediate_size", 0) if moe else 0,
            norm_topk_prob=bool(cfg.get("norm_topk_prob", False)),
            decoder_sparse_step=cfg.get("decoder_sparse_step", 1) or 1,
            mlp_only_layers=tuple(cfg.get("mlp_only_layers") or ()),
            torch_dtype=str(cfg.get("dtype") or cfg.get("torch_dtype") or "bfloat16"),
        )
