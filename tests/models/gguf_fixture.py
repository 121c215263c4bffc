"""Write a small GGUF file (llama.cpp names and metadata) from one of our HF checkpoints."""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
from safetensors.torch import load_file

HF_TO_GGUF = [
    (r"model\.embed_tokens\.weight", "token_embd.weight"),
    (r"model\.norm\.weight", "output_norm.weight"),
    (r"lm_head\.weight", "output.weight"),
    (r"model\.layers\.(\d+)\.input_layernorm\.weight", "blk.{0}.attn_norm.weight"),
    (r"model\.layers\.(\d+)\.post_attention_layernorm\.weight", "blk.{0}.ffn_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_proj\.(weight|bias)", "blk.{0}.attn_q.{1}"),
    (r"model\.layers\.(\d+)\.self_attn\.k_proj\.(weight|bias)", "blk.{0}.attn_k.{1}"),
    (r"model\.layers\.(\d+)\.self_attn\.v_proj\.(weight|bias)", "blk.{0}.attn_v.{1}"),
    (r"model\.layers\.(\d+)\.self_attn\.o_proj\.weight", "blk.{0}.attn_output.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.q_norm\.weight", "blk.{0}.attn_q_norm.weight"),
    (r"model\.layers\.(\d+)\.self_attn\.k_norm\.weight", "blk.{0}.attn_k_norm.weight"),
    (r"model\.layers\.(\d+)\.mlp\.gate_proj\.weight", "blk.{0}.ffn_gate.weight"),
    (r"model\.layers\.(\d+)\.mlp\.up_proj\.weight", "blk.{0}.ffn_up.weight"),
    (r"model\.layers\.(\d+)\.mlp\.down_proj\.weight", "blk.{0}.ffn_down.weight"),
]


def write_gguf(hf_dir: Path, out: Path, quant: str = "Q8_0", arch: str | None = None,
               raw_type_override: str | None = None) -> Path:
    import gguf

    cfg = json.loads((hf_dir / "config.json").read_text())
    tok = json.loads((hf_dir / "tokenizer.json").read_text())
    tcfg = json.loads((hf_dir / "tokenizer_config.json").read_text())
    arch = arch or {"qwen2": "qwen2", "qwen3": "qwen3"}[cfg["model_type"]]
    w = gguf.GGUFWriter(str(out), arch)
    w.add_name("tiny-test")
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(cfg["num_attention_heads"])
    w.add_head_count_kv(cfg["num_key_value_heads"])
    w.add_rope_freq_base(cfg["rope_theta"])
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    if "head_dim" in cfg:
        w.add_key_length(cfg["head_dim"])
        w.add_value_length(cfg["head_dim"])
    vocab = tok["model"]["vocab"]
    added = {t["id"]: t for t in tok["added_tokens"]}
    n = max(max(vocab.values()), max(added)) + 1
    tokens, types = [""] * n, [1] * n
    for t, i in vocab.items():
        tokens[i] = t
    for i, t in added.items():
        tokens[i], types[i] = t["content"], (3 if t["special"] else 4)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("qwen2")
    w.add_token_list(tokens)
    w.add_token_types(types)
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    w.add_token_merges(merges)
    w.add_eos_token_id(vocab.get("<|im_end|>", added and [i for i, t in added.items() if t["content"] == "<|im_end|>"][0]))
    w.add_chat_template(tcfg["chat_template"])
    sd = load_file(str(hf_dir / "model.safetensors"))
    qtype = getattr(gguf.GGMLQuantizationType, quant)
    for name, t in sd.items():
        gname = next(repl.format(*m.groups()) for pat, repl in HF_TO_GGUF if (m := re.fullmatch(pat, name)))
        arr = t.float().numpy()
        if arr.ndim == 2 and arr.shape[1] % 32 == 0 and quant != "F32":
            data = gguf.quants.quantize(arr, qtype)
            w.add_tensor(gname, data, raw_dtype=qtype)
        else:
            w.add_tensor(gname, arr.astype(np.float32))
    if raw_type_override:  # one extra tensor of an unsupported type, to test the error path
        t = getattr(gguf.GGMLQuantizationType, raw_type_override)
        block, size = gguf.GGML_QUANT_SIZES[t]
        w.add_tensor("blk.0.extra.weight", np.zeros((1, size), dtype=np.uint8), raw_dtype=t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out
