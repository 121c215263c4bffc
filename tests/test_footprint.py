"""The memory check of a catalog's local models: shapes read without loading (safetensors headers, a GGUF's
tensor table, a random preset), and a refusal that names each model's need when they do not fit."""

from __future__ import annotations

import pytest

from tests.models.gguf_fixture import write_gguf
from thinkgate.config import EngineConfig
from thinkgate.models.footprint import MEMORY_ENV, DoesNotFit, check_fit, checkpoint_shape, plan
from thinkgate.models.loader import load_model

MiB = 2**20


def test_shapes_are_read_without_loading_and_match_the_loaded_model(checkpoints, tmp_path):
    loaded = load_model(str(checkpoints["qwen3"]), dtype="float32", device="cpu")
    params = sum(p.numel() for p in loaded.model.parameters())
    shape = checkpoint_shape(str(checkpoints["qwen3"]))
    assert shape.params == params
    assert (shape.layers, shape.kv_heads, shape.head_dim) == \
        (loaded.config.num_layers, loaded.config.num_kv_heads, loaded.config.head_dim)
    gguf = checkpoint_shape(str(write_gguf(checkpoints["qwen3"], tmp_path / "tiny.gguf", quant="Q8_0")))
    assert gguf == shape  # a GGUF counts its parameters (dequantized at load), not its file's bytes
    assert checkpoint_shape("random:tiny").params > 0


def test_fp32_weights_take_four_bytes_a_parameter_and_the_kv_budget_is_added(checkpoints, monkeypatch):
    monkeypatch.setenv(MEMORY_ENV, str(1 << 40))
    shape = checkpoint_shape(str(checkpoints["qwen3"]))
    need, = plan([("m", EngineConfig(model=str(checkpoints["qwen3"]), dtype="float32", device="cpu",
                                    kv_cache_memory=8 * MiB))])
    assert need.weights == shape.params * 4 and need.kv == 8 * MiB and need.total == need.weights + 8 * MiB
    # Left to the default, the CPU pool holds 8 x 8192 tokens of K and V (fp32 for an fp32 model), the engine's
    # own rule; --max-model-len x --max-num-seqs asks for another capacity.
    elem = 4
    need, = plan([("m", EngineConfig(model=str(checkpoints["qwen3"]), dtype="float32", device="cpu"))])
    assert need.kv == 2 * shape.layers * shape.kv_heads * shape.head_dim * elem * 65536
    need, = plan([("m", EngineConfig(model=str(checkpoints["qwen3"]), dtype="float32", device="cpu",
                                    max_model_len=1000, max_num_seqs=3))])
    assert need.kv == 2 * shape.layers * shape.kv_heads * shape.head_dim * elem * 3008  # whole blocks of 16
    assert need.kv_source == "--max-model-len 1000 x --max-num-seqs 3"


def test_two_models_that_do_not_fit_are_refused_naming_each_need(checkpoints, monkeypatch):
    entries = [(f"models[{i}] (id '{arch}')", EngineConfig(model=str(checkpoints[arch]), dtype="float32",
                                                           device="cpu", kv_cache_memory=kv * MiB))
               for i, (arch, kv) in enumerate((("qwen3", 64), ("qwen2", 32)))]
    monkeypatch.setenv(MEMORY_ENV, str(80 * MiB))
    with pytest.raises(DoesNotFit) as e:
        check_fit(entries)
    msg = str(e.value)
    assert "there is 80.0 MiB of RAM available" in msg
    assert "models[0] (id 'qwen3'): " in msg and "64.0 MiB of KV cache (kv_cache_memory)" in msg
    assert "models[1] (id 'qwen2'): " in msg and "32.0 MiB of KV cache (kv_cache_memory)" in msg
    monkeypatch.setenv(MEMORY_ENV, str(200 * MiB))
    assert [n.kv for n in check_fit(entries)] == [64 * MiB, 32 * MiB]
