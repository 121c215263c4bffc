"""Read a llama.cpp GGUF file: hyper-parameters -> HF-style config, vocabulary -> tokenizer, tensors ->
HF-named dequantized tensors. Translation happens here so the rest of the engine only sees HF names."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from tokenizers import AddedToken, models

from thinkgate.models.config import UnsupportedModelError
from thinkgate.models.tokenizer import ModelTokenizer, qwen_byte_level

GGUF_ARCHS = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3moe": "Qwen3MoeForCausalLM"}
SUPPORTED_QUANTS = {"F32", "F16", "BF16", "Q8_0", "Q5_0", "Q5_1", "Q4_0", "Q4_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K",
                    "Q6_K", "Q8_K"}

_NAMES = [
    (r"token_embd\.weight", "model.embed_tokens.weight"),
    (r"output_norm\.weight", "model.norm.weight"),
    (r"output\.weight", "lm_head.weight"),
    (r"blk\.(\d+)\.attn_norm\.weight", "model.layers.{0}.input_layernorm.weight"),
    (r"blk\.(\d+)\.ffn_norm\.weight", "model.layers.{0}.post_attention_layernorm.weight"),
    (r"blk\.(\d+)\.attn_q\.(weight|bias)", "model.layers.{0}.self_attn.q_proj.{1}"),
    (r"blk\.(\d+)\.attn_k\.(weight|bias)", "model.layers.{0}.self_attn.k_proj.{1}"),
    (r"blk\.(\d+)\.attn_v\.(weight|bias)", "model.layers.{0}.self_attn.v_proj.{1}"),
    (r"blk\.(\d+)\.attn_output\.weight", "model.layers.{0}.self_attn.o_proj.weight"),
    (r"blk\.(\d+)\.attn_q_norm\.weight", "model.layers.{0}.self_attn.q_norm.weight"),
    (r"blk\.(\d+)\.attn_k_norm\.weight", "model.layers.{0}.self_attn.k_norm.weight"),
    (r"blk\.(\d+)\.ffn_gate\.weight", "model.layers.{0}.mlp.gate_proj.weight"),
    (r"blk\.(\d+)\.ffn_up\.weight", "model.layers.{0}.mlp.up_proj.weight"),
    (r"blk\.(\d+)\.ffn_down\.weight", "model.layers.{0}.mlp.down_proj.weight"),
    (r"blk\.(\d+)\.ffn_gate_inp\.weight", "model.layers.{0}.mlp.gate.weight"),
]
_EXPERTS = re.compile(r"blk\.(\d+)\.ffn_(gate|up|down)_exps\.weight")
_ROWS_PER_CALL = 4096  # rows dequantized per call of the gguf package (bounds its temporaries)


def _block_dequantizer(type_name: str):
    """`f(rows)`: a [rows, row bytes] uint8 block matrix of `type_name` dequantized to fp32 by the GGUF block
    kernels; None for a type they do not read, or where they cannot be built (the gguf package's numpy serves)."""
    from thinkgate.layers import cpu_kernels
    from thinkgate.layers.ggml_linear import SUPPORTED_TYPES

    code = SUPPORTED_TYPES.get(type_name)
    ops = cpu_kernels.load_ggml() if code is not None else None
    return None if ops is None else (lambda rows: ops.ggml_dequantize([code], [rows]))


class GGUFModel:
    """A parsed GGUF file. Opening parses the vocabulary arrays (seconds for 151k tokens); tensors stay
    memory-mapped until `tensor()` dequantizes one."""

    def __init__(self, path: str | Path):
        from gguf import GGUFReader

        self.path = Path(path)
        try:
            self.reader = GGUFReader(str(self.path))
        except Exception as e:  # the gguf package raises bare ValueError/struct errors on bad files
            raise UnsupportedModelError(f"{self.path} is not a readable GGUF file: {e}") from e
        self.meta = {f.name: f for f in self.reader.fields.values()}
        arch = self.value("general.architecture")
        if arch not in GGUF_ARCHS:
            raise UnsupportedModelError(
                f"GGUF architecture {arch!r} is not supported; supported: {', '.join(sorted(GGUF_ARCHS))}")
        self.arch = arch
        self._tensors = {}
        for t in self.reader.tensors:
            qtype = t.tensor_type.name
            if qtype not in SUPPORTED_QUANTS:
                raise UnsupportedModelError(
                    f"GGUF tensor {t.name} uses quantization type {qtype}, which thinkgate cannot load; "
                    f"supported: {', '.join(sorted(SUPPORTED_QUANTS))}")
            self._tensors[t.name] = t
        self.hf_names = self._map_names()

    def value(self, key: str, default=None):
        f = self.meta.get(key)
        if f is None:
            return default
        return f.contents()

    def hf_config(self) -> dict:
        a = self.arch
        v = lambda k, d=None: self.value(f"{a}.{k}", d)  # noqa: E731
        heads = v("attention.head_count")
        hidden = v("embedding_length")
        n_vocab = len(self.meta["tokenizer.ggml.tokens"].data)
        emb = self._tensors["token_embd.weight"]
        cfg = {
            "architectures": [GGUF_ARCHS[a]],
            "model_type": {"qwen3moe": "qwen3_moe"}.get(a, a),
            "hidden_size": hidden,
            "num_hidden_layers": v("block_count"),
            "num_attention_heads": heads,
            "num_key_value_heads": v("attention.head_count_kv", heads),
            "head_dim": v("attention.key_length", hidden // heads),
            "intermediate_size": v("feed_forward_length", 0),
            "vocab_size": int(emb.shape[1]) if len(emb.shape) > 1 else n_vocab,
            "max_position_embeddings": v("context_length", 32768),
            "rope_theta": float(v("rope.freq_base", 10000.0)),
            "rms_norm_eps": float(v("attention.layer_norm_rms_epsilon", 1e-6)),
            "tie_word_embeddings": "output.weight" not in self._tensors,
            "torch_dtype": "bfloat16",
        }
        if a == "qwen3moe":
            cfg.update(num_experts=v("expert_count"), num_experts_per_tok=v("expert_used_count"),
                       moe_intermediate_size=v("expert_feed_forward_length"), norm_topk_prob=True,
                       decoder_sparse_step=1, mlp_only_layers=[])
        scaling = v("rope.scaling.type")
        if scaling and scaling != "none":
            cfg["rope_scaling"] = {"rope_type": scaling, "factor": float(v("rope.scaling.factor", 1.0)),
                                   "original_max_position_embeddings": v("rope.scaling.original_context_length")}
        return cfg

    def tokenizer(self) -> ModelTokenizer:
        model = self.value("tokenizer.ggml.model")
        if model != "gpt2":
            raise UnsupportedModelError(f"GGUF tokenizer model {model!r} is not supported (need byte-level BPE 'gpt2')")
        tok_field = self.meta["tokenizer.ggml.tokens"]
        tokens = [bytes(tok_field.parts[i]).decode("utf-8") for i in tok_field.data]
        types_field = self.meta.get("tokenizer.ggml.token_type")
        types = [int(types_field.parts[i][0]) for i in types_field.data] if types_field else [1] * len(tokens)
        merges_field = self.meta["tokenizer.ggml.merges"]
        merges = [tuple(bytes(merges_field.parts[i]).decode("utf-8").split(" ", 1)) for i in merges_field.data]
        vocab = {t: i for i, t in enumerate(tokens)}
        tok = qwen_byte_level(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False,
                                         byte_fallback=False))
        # token_type: 1 normal, 3 control (special), 4 user-defined (added but not special).
        added = [AddedToken(tokens[i], special=types[i] == 3, normalized=False)
                 for i in range(len(tokens)) if types[i] in (3, 4)]
        tok.add_tokens(added)
        eos_id = self.value("tokenizer.ggml.eos_token_id")
        special = frozenset(i for i in range(len(tokens)) if types[i] == 3)
        return ModelTokenizer(tok=tok, chat_template=self.value("tokenizer.chat_template"),
                              eos_token=tokens[eos_id] if eos_id is not None else None, special_ids=special)

    def _map_names(self) -> dict[str, str]:
        out = {}
        for name in self._tensors:
            if _EXPERTS.fullmatch(name):
                out[name] = name  # expanded per expert in tensor_names()
                continue
            for pat, repl in _NAMES:
                m = re.fullmatch(pat, name)
                if m:
                    out[name] = repl.format(*m.groups())
                    break
        return out

    def tensor_names(self) -> list[str]:
        """HF names of every tensor, with stacked expert tensors listed per expert."""
        names = []
        for g, hf in self.hf_names.items():
            m = _EXPERTS.fullmatch(g)
            if m:
                n_exp = self._tensors[g].shape[-1]
                names += [f"model.layers.{m[1]}.mlp.experts.{e}.{m[2]}_proj.weight" for e in range(n_exp)]
            else:
                names.append(hf)
        return names

    def stored(self, gguf_name: str):
        """(type name, [rows, row bytes] array of the file's blocks, memory-mapped) of a tensor, or None."""
        t = self._tensors.get(gguf_name)
        if t is None:
            return None
        rows = int(np.prod([int(s) for s in t.shape[1:]]))
        return t.tensor_type.name, t.data.reshape(rows, -1)

    def dequantize(self, gguf_name: str) -> torch.Tensor:
        from gguf.quants import dequantize

        t = self._tensors[gguf_name]
        shape = tuple(int(s) for s in reversed(t.shape))
        data = t.data
        if data.ndim >= 2 and (fast := _block_dequantizer(t.tensor_type.name)) is not None:
            # ggml's own dequantization in our C++ kernels: the same floats as the gguf package's (checked on
            # every tensor of the default model), ~10x faster (a 0.5B model's weights in 1 s instead of 10).
            rows = torch.from_numpy(np.array(data, dtype=np.uint8, copy=True).reshape(-1, data.shape[-1]))
            return fast(rows).reshape(shape)
        if data.ndim < 2 or data.shape[0] <= _ROWS_PER_CALL:
            arr = np.ascontiguousarray(dequantize(data, t.tensor_type), dtype=np.float32).reshape(shape)
            if not arr.flags.writeable:  # F32 tensors come straight from the read-only memory map
                arr = arr.copy()
            return torch.from_numpy(arr)
        # A slice of rows at a time: the gguf package's dequantizers hold several float temporaries the size
        # of their input, which for a 151,936-row embedding came to gigabytes at load.
        arr = np.empty(shape, dtype=np.float32)
        rows = arr.reshape(data.shape[0], -1)
        for i in range(0, data.shape[0], _ROWS_PER_CALL):
            part = data[i:i + _ROWS_PER_CALL]
            rows[i:i + part.shape[0]] = dequantize(part, t.tensor_type).reshape(part.shape[0], -1)
        return torch.from_numpy(arr)

    def tensor_getter(self):
        """`get(hf_name)`: dequantized tensor; stacked experts are dequantized once per layer and sliced."""
        by_hf = {hf: g for g, hf in self.hf_names.items() if not _EXPERTS.fullmatch(g)}
        stacked: dict[str, torch.Tensor] = {}

        def get(name: str) -> torch.Tensor:
            m = re.fullmatch(r"model\.layers\.(\d+)\.mlp\.experts\.(\d+)\.(gate|up|down)_proj\.weight", name)
            if m:
                g = f"blk.{m[1]}.ffn_{m[3]}_exps.weight"
                if g not in stacked:
                    if any(not k.startswith(f"blk.{m[1]}.") for k in stacked):
                        stacked.clear()  # keep only the current layer's three stacks in memory
                    stacked[g] = self.dequantize(g)  # [E, out, in]
                return stacked[g][int(m[2])]
            return self.dequantize(by_hf[name])

        return get
