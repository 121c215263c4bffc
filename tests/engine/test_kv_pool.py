"""The CPU KV pool's size and dtype come from what is asked for (issue 23), and the engine logs them with the
process's resident memory split into weights, KV pool and the rest."""

import logging

import pytest
import torch

from thinkgate.config import EngineConfig
from thinkgate.engine.kv_pool import DEFAULT_TOKENS, cpu_pool_size, resolve_kv_dtype
from thinkgate.engine.llm_engine import LLMEngine
from thinkgate.models.loader import load_model
from thinkgate.models.resident import module_weight_bytes
from thinkgate.sampling.params import SamplingParams

GiB = 2**30


def test_pool_capacity_from_the_ask():
    per_token = 1000
    # a context length and a sequence count: their product, in whole blocks
    size = cpu_pool_size(None, 8192, 8, per_token, 64 * GiB, 16)
    assert (size.tokens, size.shrunk) == (65536, False) and "--max-model-len 8192 x --max-num-seqs 8" in size.source
    assert cpu_pool_size(None, 1000, 3, per_token, 64 * GiB, 16).tokens == 3008
    # bytes: as many whole blocks as fit
    assert cpu_pool_size(10_100_000, 8192, 8, per_token, 64 * GiB, 16).tokens == 10096
    # nothing asked: 8 x 8192 tokens, when a quarter of the available memory holds them
    assert cpu_pool_size(None, None, 32, per_token, 64 * GiB, 16).tokens == DEFAULT_TOKENS
    small = cpu_pool_size(None, None, 32, per_token, 100_000_000, 16)
    assert small.shrunk and small.tokens == 25_000_000 // per_token // 16 * 16
    # an explicit ask may take up to 80 % of what is available, then it shrinks too (and says so)
    asked = cpu_pool_size(None, 8192, 8, per_token, 50_000_000, 16)
    assert asked.shrunk and asked.tokens == 40_000 and asked.asked_tokens == 65536


def test_pool_dtype():
    cpu = "cpu"
    assert resolve_kv_dtype("auto", torch.float32, cpu, cpu_kernels_run=False, quantized=True) == torch.bfloat16
    assert resolve_kv_dtype("auto", torch.float32, cpu, cpu_kernels_run=False, quantized=False) == torch.float32
    assert resolve_kv_dtype("auto", torch.float32, cpu, cpu_kernels_run=True, quantized=True) == torch.float32
    assert resolve_kv_dtype("float32", torch.float32, cpu, False, True) == torch.float32
    assert resolve_kv_dtype("auto", torch.bfloat16, "cuda", False, False) == torch.bfloat16
    with pytest.raises(ValueError, match="KV cache dtype"):
        resolve_kv_dtype("fp8", torch.float32, cpu, False, False)


def test_engine_pool_and_memory_log(checkpoints, caplog):
    lm = load_model(str(checkpoints["qwen3"]), dtype="float32", device="cpu")
    with caplog.at_level(logging.INFO, logger="thinkgate.engine.llm_engine"):
        eng = LLMEngine(lm, EngineConfig(model="x", max_model_len=256, max_num_seqs=3))
    assert eng.block_manager.num_blocks * eng.config.block_size == 768 and eng.max_model_len == 256
    k_cache = eng.runner.kv_caches[0][0]
    assert k_cache.dtype == torch.float32  # an exact fp32 model keeps an exact pool
    text = caplog.text
    assert "KV cache sized by --max-model-len 256 x --max-num-seqs 3" in text
    cfg = lm.config
    mib = 768 * 2 * cfg.num_layers * cfg.num_kv_heads * cfg.head_dim * 4 / 2**20
    assert f"KV cache: 768 tokens (48 blocks of 16) in float32, {mib:.1f} MiB" in text
    line = next(r.getMessage() for r in caplog.records if "resident memory after loading" in r.getMessage())
    assert f"weights {module_weight_bytes(lm.model) / 2**20:,.0f} MiB" in line and "KV pool" in line


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="W8A8 needs fbgemm (x86)")
def test_quantized_model_serves_from_a_bf16_pool(checkpoints):
    lm = load_model(str(checkpoints["qwen2"]), dtype="float32", device="cpu", weight_quant="w8a8")
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    prompt = list(range(20, 50))
    outs = {}
    for dtype in ("auto", "float32"):
        eng = LLMEngine(lm, EngineConfig(model="x", max_model_len=128, max_num_seqs=2, kv_cache_dtype=dtype,
                                         cpu_kernels=False))
        want = torch.bfloat16 if dtype == "auto" else torch.float32
        assert eng.runner.kv_caches[0][0].dtype == want
        outs[dtype] = eng.generate([prompt, prompt[:7]], greedy)
        assert eng.runner.kv_caches[0][0].abs().sum() > 0  # the decode path wrote (and read) this pool
    assert all(len(o) == 12 for o in outs["auto"])
