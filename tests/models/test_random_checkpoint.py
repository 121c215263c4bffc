import json

import pytest
import torch
from safetensors import safe_open

from tests.conftest import ARCHS
from thinkgate.devtools.random_checkpoint import write_random_checkpoint
from thinkgate.devtools.tokenizer_builder import ADDED_TOKENS
from thinkgate.models.tokenizer import ModelTokenizer


def _names(path):
    names = {}
    for f in sorted(path.glob("*.safetensors")):
        with safe_open(str(f), "pt") as h:
            for k in h.keys():
                names[k] = tuple(h.get_slice(k).get_shape())
    return names


@pytest.mark.parametrize("arch", ARCHS)
def test_loads_in_transformers_and_renders_thinking_prompt(checkpoints, arch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = checkpoints[arch]
    model = AutoModelForCausalLM.from_pretrained(path)
    expected = {"qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM"}[arch]
    assert type(model).__name__ == expected
    tok = AutoTokenizer.from_pretrained(path)
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
    assert prompt == "<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n<think>\n"


def test_tensor_names_match_real_checkpoints(checkpoints):
    q2, q3, moe = (_names(checkpoints[a]) for a in ARCHS)
    assert q2["model.layers.0.self_attn.q_proj.bias"] == (64,)
    assert "model.layers.0.self_attn.q_norm.weight" not in q2
    assert q3["model.layers.0.self_attn.q_norm.weight"] == (16,)
    assert q3["model.layers.0.self_attn.k_norm.weight"] == (16,)
    assert "model.layers.0.self_attn.q_proj.bias" not in q3
    assert moe["model.layers.1.mlp.gate.weight"] == (8, 64)
    for e in range(8):
        assert moe[f"model.layers.1.mlp.experts.{e}.gate_proj.weight"] == (32, 64)
        assert moe[f"model.layers.1.mlp.experts.{e}.up_proj.weight"] == (32, 64)
        assert moe[f"model.layers.1.mlp.experts.{e}.down_proj.weight"] == (64, 32)
    assert "model.layers.0.mlp.gate_proj.weight" not in moe


def test_named_preset_shapes_without_writing(tmp_path):
    from thinkgate.devtools.presets import hf_config, tensor_shapes

    cfg = hf_config("qwen3_moe", "qwen3-30b-a3b", 151936, "bfloat16")
    shapes = tensor_shapes(cfg)
    assert shapes["model.layers.0.self_attn.q_proj.weight"] == (4096, 2048)
    assert shapes["model.layers.47.mlp.experts.127.down_proj.weight"] == (2048, 768)
    total = sum(torch.Size(s).numel() for s in shapes.values())
    assert total == 30_532_122_624  # the published exact parameter count of Qwen3-30B-A3B
    cfg = hf_config("qwen3", "qwen3-0.6b", 151936, "bfloat16")
    assert sum(torch.Size(s).numel() for s in tensor_shapes(cfg).values()) == 596_049_920


def test_sharded_checkpoint_has_index_and_loads(tmp_path):
    from transformers import AutoModelForCausalLM

    path = write_random_checkpoint(tmp_path / "sharded", arch="qwen3_moe", dtype="fp32", max_shard_bytes=200_000)
    index = json.loads((path / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    AutoModelForCausalLM.from_pretrained(path)


def test_tokenizer_round_trips_utf8_and_keeps_special_tokens_whole(checkpoints):
    from transformers import AutoTokenizer

    tok = ModelTokenizer.from_dir(checkpoints["qwen3"])
    hf = AutoTokenizer.from_pretrained(checkpoints["qwen3"])
    texts = ["Hello, world!", "你好，世界。天气很好", "emoji 😀👍🏽 mix 中文 and code: def f(x): return x**2",
             "tabs\tand\nnewlines\r\n", "ünïcödé ñ", "\x00\x01 control", "1234567890"]
    for t in texts:
        ids = tok.encode(t)
        assert tok.decode(ids) == t
        assert ids == hf.encode(t)
    for text, _ in ADDED_TOKENS:
        ids = tok.encode(f"a{text}b")
        assert tok.token_id(text) in ids and len([i for i in ids if i == tok.token_id(text)]) == 1
        assert hf.convert_tokens_to_ids(text) == tok.token_id(text)


def test_cli_writes_checkpoint(tmp_path):
    from thinkgate.cli import main

    assert main(["model", "random", "--arch", "qwen2", "--out", str(tmp_path / "m"), "--dtype", "fp32"]) == 0
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen2ForCausalLM"]
    gen = json.loads((tmp_path / "m" / "generation_config.json").read_text())
    assert gen["temperature"] == 0.6 and gen["top_k"] == 20 and len(gen["eos_token_id"]) == 2
