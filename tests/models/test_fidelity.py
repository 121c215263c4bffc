"""Our model against transformers on the same weights: logits and greedy tokens."""

import pytest
import torch

from tests.conftest import ARCHS
from thinkgate.layers.attention import AttentionMetadata
from thinkgate.models.loader import load_model
from thinkgate.sampling.params import SamplingParams


def _our_logits(lm, ids: list[int], block_size: int = 4, chunks: tuple[int, ...] = ()) -> torch.Tensor:
    cfg = lm.config
    n_blocks = len(ids) // block_size + 2
    kv = [(torch.zeros(n_blocks, block_size, cfg.num_kv_heads, cfg.head_dim),
           torch.zeros(n_blocks, block_size, cfg.num_kv_heads, cfg.head_dim)) for _ in range(cfg.num_layers)]
    table = list(reversed(range(n_blocks)))  # non-contiguous blocks on purpose
    bounds = [0, *chunks, len(ids)]
    outs = []
    with torch.no_grad():
        for a, b in zip(bounds, bounds[1:], strict=False):
            meta = AttentionMetadata.build([b - a], [b], [table], block_size, torch.device("cpu"))
            h = lm.model(torch.tensor(ids[a:b]), torch.arange(a, b), kv, meta)
            outs.append(lm.model.compute_logits(h))
    return torch.cat(outs)


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(checkpoints, arch):
    from transformers import AutoModelForCausalLM

    lm = load_model(str(checkpoints[arch]), dtype="float32", device="cpu")
    ref = AutoModelForCausalLM.from_pretrained(checkpoints[arch], dtype=torch.float32).eval()
    gen = torch.Generator().manual_seed(0)
    for length in (1, 7, 33):
        ids = torch.randint(0, lm.tokenizer.vocab_size, (length,), generator=gen).tolist()
        with torch.no_grad():
            theirs = ref(torch.tensor([ids])).logits[0]
        assert (_our_logits(lm, ids) - theirs).abs().max().item() < 1e-4
        if length > 8:  # chunked prefill over the paged cache gives the same logits
            assert (_our_logits(lm, ids, chunks=(5, 20)) - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_32_tokens_match_transformers(checkpoints, engine_factory, arch):
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(checkpoints[arch], dtype=torch.float32).eval()
    eng = engine_factory(arch)
    prompt = eng.tokenizer.encode("<|im_start|>user\nTell me a story<|im_end|>\n<|im_start|>assistant\n<think>\n")
    ours = eng.generate([prompt], SamplingParams(temperature=0, max_tokens=32, ignore_eos=True))[0]
    with torch.no_grad():
        theirs = ref.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
    assert ours == theirs[0, len(prompt):].tolist()


def test_grouped_moe_equals_reference(checkpoints):
    from thinkgate.layers.moe import grouped_moe, reference_moe, route

    gen = torch.Generator().manual_seed(1)
    x = torch.randn(37, 64, generator=gen)
    w13 = torch.randn(8, 64, 64, generator=gen) * 0.1
    w2 = torch.randn(8, 64, 32, generator=gen) * 0.1
    weights, experts = route(torch.randn(37, 8, generator=gen), 2, True, x.dtype)
    assert torch.allclose(weights.sum(-1), torch.ones(37))
    assert torch.allclose(grouped_moe(x, weights, experts, w13, w2), reference_moe(x, weights, experts, w13, w2),
                          atol=1e-5)


def test_bf16_runs_close_to_fp32(checkpoints):
    lm32 = load_model(str(checkpoints["qwen3"]), dtype="float32", device="cpu")
    lm16 = load_model(str(checkpoints["qwen3"]), dtype="bfloat16", device="cpu")
    ids = list(range(10, 40))
    a, b = _our_logits(lm32, ids), _our_logits(lm16, ids)
    assert b.dtype == torch.float32
    assert (a - b).abs().max().item() < 0.05 * a.abs().max().item() + 0.05


def test_config_accepts_rope_parameters_and_num_local_experts():
    from thinkgate.models.config import ModelConfig

    base = {"architectures": ["Qwen3MoeForCausalLM"], "hidden_size": 64, "num_hidden_layers": 2,
            "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 16, "vocab_size": 100,
            "num_local_experts": 8, "num_experts_per_tok": 2, "moe_intermediate_size": 32,
            "rope_parameters": {"rope_theta": 5000000.0, "rope_type": "default"}, "mlp_only_layers": [1],
            "dtype": "bfloat16"}
    cfg = ModelConfig.from_hf(base)
    assert cfg.rope_theta == 5000000.0 and cfg.num_experts == 8 and cfg.rope_scaling is None
    assert cfg.is_sparse_layer(0) and not cfg.is_sparse_layer(1)
    old = {**base, "rope_theta": 1e6, "num_experts": 8}
    del old["rope_parameters"], old["num_local_experts"]
    assert ModelConfig.from_hf(old).rope_theta == 1e6


def test_random_spec_builds_real_shapes_in_memory():
    from thinkgate.config import EngineConfig
    from thinkgate.engine.llm_engine import LLMEngine

    lm = load_model("random:tiny:qwen3_moe", dtype="float32", device="cpu")
    assert lm.config.num_experts == 8 and lm.model.layers[0].mlp.w13.shape == (8, 64, 64)
    eng = LLMEngine(lm, EngineConfig(kv_cache_memory=8 * 2**20))
    assert len(eng.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]) == 5
    from thinkgate.devtools.presets import hf_config, tensor_shapes
    from thinkgate.models.config import ModelConfig

    cfg = hf_config("qwen3", "qwen3-0.6b", 151936, "bfloat16")
    big = ModelConfig.from_hf(cfg)
    assert big.head_dim == 128 and big.num_layers == 28 and big.tie_word_embeddings
    assert len(tensor_shapes(cfg)) == 1 + 28 * 11 + 1  # embeddings, 11 tensors per layer, final norm


def test_weight_only_quantized_linears_stay_close(checkpoints):
    from thinkgate.layers.linear import Int4Linear, Int8Linear

    lm = load_model(str(checkpoints["qwen3"]), dtype="bfloat16", device="cpu", weight_quant="none")
    q8 = load_model(str(checkpoints["qwen3"]), dtype="bfloat16", device="cpu", weight_quant="int8")
    q4 = load_model(str(checkpoints["qwen3"]), dtype="bfloat16", device="cpu", weight_quant="int4", head_quant="int8")
    assert isinstance(q8.model.layers[0].self_attn.qkv_proj, Int8Linear)
    assert isinstance(q4.model.layers[0].mlp.gate_up_proj, Int4Linear) and isinstance(q4.model.lm_head, Int8Linear)
    ids = list(range(10, 40))
    ref = _our_logits(lm, ids)
    for q, tol in ((q8, 0.02), (q4, 0.2)):
        one = _our_logits(q, ids[:1])  # 1 token: the one-row kernels
        assert (one - ref[:1]).abs().max().item() < tol * ref.abs().max().item() + 0.02


def test_int4_skips_shapes_the_kernel_cannot_pack(checkpoints):
    from torch import nn

    from thinkgate.layers.cpu_kernels import cpu_supports_vnni
    from thinkgate.layers.linear import DynInt8Linear, Int4Linear, MixedLinear

    lm = load_model(str(checkpoints["qwen3"]), dtype="bfloat16", device="cpu", weight_quant="int4")
    assert isinstance(lm.model.layers[0].mlp.gate_up_proj, Int4Linear)
    assert type(lm.model.lm_head) is nn.Linear  # 1,026 output rows: not a multiple of 16, stays dense
    assert _our_logits(lm, [5]).isfinite().all()
    auto = load_model(str(checkpoints["qwen3"]), dtype="bfloat16", device="cpu", weight_quant="auto")
    if not DynInt8Linear.available():  # not x86: no fbgemm, auto is int4 throughout
        assert isinstance(auto.model.layers[0].mlp.gate_up_proj, Int4Linear)
        return
    head = auto.model.lm_head
    if not cpu_supports_vnni():  # x86 without our AVX-512 VNNI kernels: W8A8 throughout
        assert isinstance(auto.model.layers[0].mlp.gate_up_proj, DynInt8Linear)
        assert isinstance(head, DynInt8Linear)
    else:
        assert isinstance(auto.model.layers[0].mlp.gate_up_proj, MixedLinear)  # auto on a bf16 CPU model (x86)
        assert isinstance(head, MixedLinear) and head.single is None  # no int4 for 1,026 rows: W8A8 throughout
    assert _our_logits(auto, [5]).isfinite().all()


@pytest.mark.skipif("fbgemm" not in torch.backends.quantized.supported_engines, reason="W8A8 needs fbgemm (x86)")
def test_w8a8_and_the_mixed_dispatch():
    from thinkgate.layers.linear import DynInt8Linear, MixedLinear

    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(256, 128, generator=g) * 0.05, torch.randn(256, generator=g) * 0.1
    dense = lambda x: torch.nn.functional.linear(x.float(), w, b)  # noqa: E731
    q = DynInt8Linear(w, b, keep_dense=False)
    for rows in (1, 3, 8):
        x = torch.randn(rows, 128, generator=g).to(torch.bfloat16)
        ref = dense(x)
        assert ((q(x).float() - ref).norm() / ref.norm()).item() < 0.02
    mixed = MixedLinear(w, b, keep_dense=True)
    x1, x4, x20 = (torch.randn(n, 128, generator=g).to(torch.bfloat16) for n in (1, 4, 20))
    assert torch.equal(mixed(x1), mixed.single(x1))  # one row: int4 weight-only
    assert torch.equal(mixed(x4), mixed.batched(x4))  # batched decode: int8 weights and activations
    assert torch.equal(mixed(x20), torch.nn.functional.linear(x20, mixed.dense, mixed.bias))  # prefill: bf16
