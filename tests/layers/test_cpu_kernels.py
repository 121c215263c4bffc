"""thinkgate's C++ CPU kernels (csrc/) against the PyTorch ops they replace."""

import pytest
import torch
import torch.nn.functional as F

from tests.layers.fused_checks import check_qk_norm_rope_store, check_rms_norm, check_silu_mul
from thinkgate.layers import cpu_kernels
from thinkgate.layers.attention import AttentionMetadata, TorchPagedAttention

if not cpu_kernels.cpu_supports_vnni():
    pytest.skip("this CPU has no AVX-512 VNNI: thinkgate uses torch's kernels here", allow_module_level=True)
ops = cpu_kernels.load()
if ops is None:
    pytest.skip("no C++ compiler here: the CPU kernels cannot be built", allow_module_level=True)

import thinkgate.layers.cpu_fused as fused  # noqa: E402
from thinkgate.layers.linear import Q4Linear, int4_groups, pack_q4  # noqa: E402


def q4_reference(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """What q4_linear computes, in plain fp64: int4 codes with fp16 scale/min, activations as int8 per group
    of 32 (round half to even), the min term on the exact activation sums."""
    q, scale, lo = int4_groups(weight, 32)
    n, k = weight.shape
    s16, m16 = scale.half().double(), lo.half().double()
    xg = x.double().view(x.shape[0], k // 32, 32)
    d = xg.abs().amax(-1) / 127
    qa = torch.where(d[..., None] > 0, torch.round(xg / torch.where(d > 0, d, 1)[..., None]), 0)
    qg = q.double().view(n, k // 32, 32)
    idot = torch.einsum("mgk,ngk->mng", qa, qg)  # [M, N, G] integer dot products
    return (idot * d[:, None, :] * s16[None]).sum(-1) + torch.einsum("mg,ng->mn", xg.sum(-1), m16)


@pytest.mark.parametrize("n,k", [(36, 128), (1152, 896), (70, 384)])
@pytest.mark.parametrize("rows", [1, 3, 8])
def test_q4_linear_computes_its_quantized_product(n, k, rows):
    g = torch.Generator().manual_seed(n + k + rows)
    w = torch.randn(n, k, generator=g) * 0.05
    x = torch.randn(rows, k, generator=g)
    packed, scales, mins = pack_q4(w)
    got = ops.q4_linear(x, packed, scales, mins, None)
    torch.testing.assert_close(got.double(), q4_reference(x, w), atol=2e-5, rtol=1e-5)
    # and it stays close to the unquantized product (int4 weights, int8 activations)
    dense = x @ w.t()
    assert ((got - dense).norm() / dense.norm()).item() < 0.1


def test_q4_linear_bf16_bias_and_layer():
    g = torch.Generator().manual_seed(5)
    w, b = torch.randn(64, 256, generator=g) * 0.05, torch.randn(64, generator=g)
    x = torch.randn(2, 256, generator=g).to(torch.bfloat16)
    layer = Q4Linear(w, b, keep_dense=True)
    y = layer(x)
    assert y.dtype == torch.bfloat16 and y.shape == (2, 64)
    ref = (q4_reference(x.float(), w) + b.double()).to(torch.bfloat16)
    torch.testing.assert_close(y, ref, atol=0, rtol=0.008)
    # past `dense_above` rows (prefill) the dense bf16 weight is used
    x_big = torch.randn(40, 256, generator=g).to(torch.bfloat16)
    torch.testing.assert_close(layer(x_big), F.linear(x_big, w.to(torch.bfloat16), b.to(torch.bfloat16)))


def test_q4_linear_refuses_bad_shapes():
    packed, scales, mins = pack_q4(torch.randn(16, 128))
    with pytest.raises(RuntimeError, match="weight shapes"):
        ops.q4_linear(torch.randn(1, 256), packed, scales, mins, None)
    with pytest.raises(ValueError, match="divisible by 128"):
        pack_q4(torch.randn(16, 96))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("h", [96, 896, 40])
def test_rms_norm_with_and_without_residual(dtype, h):
    check_rms_norm(fused, dtype, h)
    if dtype == torch.bfloat16:  # the residual add rounds exactly as torch's add
        x, res = torch.randn(3, h).to(dtype), torch.randn(3, h).to(dtype)
        assert torch.equal(fused.rms_norm(x, torch.ones(h, dtype=dtype), 1e-6, res)[1], x + res)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("qk_norm", [True, False])
@pytest.mark.parametrize("d", [64, 128, 40])
def test_qk_norm_rope_store_matches_the_layer_ops(dtype, qk_norm, d):
    check_qk_norm_rope_store(fused, dtype, qk_norm, d)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_silu_mul(dtype):
    check_silu_mul(fused, dtype)


@pytest.mark.parametrize("hq,hkv,d,page", [(4, 2, 16, 16), (14, 2, 64, 16), (16, 8, 128, 4), (6, 3, 40, 8)])
def test_paged_decode_attention_matches_the_reference(hq, hkv, d, page):
    g = torch.Generator().manual_seed(hq * 100 + d)
    nblocks = 600
    kc = torch.randn(nblocks, page, hkv, d, generator=g)
    vc = torch.randn(nblocks, page, hkv, d, generator=g)
    lens = [1, 17, 100, 64, 65, 1500]
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(-(-n // page))] for n in lens]  # scattered, out-of-order pages
    meta = AttentionMetadata.build([1] * len(lens), lens, tables, page, torch.device("cpu"))
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    for dtype in (torch.float32, torch.bfloat16):
        q = torch.randn(len(lens), hq, d, generator=g).to(dtype)
        ref = TorchPagedAttention(d ** -0.5, torch.float32).forward(q, kc, vc, meta)
        out = ops.paged_decode_attention(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32), d ** -0.5)
        assert out.dtype == dtype
        tol = dict(atol=2e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1.6e-2)
        torch.testing.assert_close(out, ref, **tol)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3", "qwen3_moe"])
def test_engine_on_the_cpu_kernels_keeps_greedy_outputs(engine_factory, arch):
    """The fused CPU path (C++ norms, rotary + cache write, SwiGLU, paged decode attention) gives the same
    greedy tokens as plain PyTorch, with sequences of different lengths decoding together."""
    from thinkgate.sampling.params import SamplingParams

    greedy = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    ref = engine_factory(arch, block_size=4, enable_prefix_caching=False, cpu_kernels=False)
    assert type(ref.runner.model.attn_backend) is TorchPagedAttention and ref.runner.model.fused_ops is None
    g = torch.Generator().manual_seed(11)
    prompts = [torch.randint(0, ref.tokenizer.vocab_size, (n,), generator=g).tolist() for n in (5, 23, 9, 40)]
    expected = ref.generate(prompts, greedy)
    eng = engine_factory(arch, block_size=4, enable_prefix_caching=False)
    assert type(eng.runner.model.attn_backend) is fused.CpuPagedAttention
    assert eng.runner.model.fused_ops is fused
    assert eng.generate(prompts, greedy) == expected
    eng.block_manager.check_integrity([])


@pytest.fixture(scope="module")
def small_checkpoints(tmp_path_factory):
    from thinkgate.devtools.random_checkpoint import write_random_checkpoint

    root = tmp_path_factory.mktemp("small")
    return {a: write_random_checkpoint(root / a, arch=a, preset="small", dtype="fp32", seed=3) for a in ("qwen2", "qwen3")}


def _int4_engine(path, **opts):
    from thinkgate.config import EngineConfig
    from thinkgate.engine.llm_engine import LLMEngine
    from thinkgate.models.loader import load_model

    loaded = load_model(str(path), dtype="bfloat16", device="cpu", weight_quant=opts.pop("weight_quant", "int4"),
                        cpu_kernels=opts.get("cpu_kernels", True))
    opts.setdefault("enable_prefix_caching", False)  # exact comparisons: every run computes its whole prompt
    opts.setdefault("kv_cache_dtype", "float32")  # the pool the C++ kernels read, for torch's path too
    return LLMEngine(loaded, EngineConfig(model=str(path), kv_cache_memory=32 * 2**20, block_size=4, **opts))


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_single_sequence_decoder_equals_the_python_layer_loop(small_checkpoints, arch):
    """csrc/decoder.cpp runs the layer stack of a one-sequence decode step in C++: the same kernels in the
    same order as the Python fused path, so the same logits, bit for bit (Qwen2: qkv bias; Qwen3: q/k norm)."""
    from thinkgate.sampling.params import SamplingParams

    eng = _int4_engine(small_checkpoints[arch])
    runner = eng.runner
    assert runner.cpu_decoder is not None and runner.cpu_decoder.num_layers() == 2
    assert isinstance(runner.model.layers[0].self_attn.qkv_proj, Q4Linear)
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    prompt = list(range(40, 70))
    with_decoder = eng.generate([prompt], greedy)
    decoder, runner.cpu_decoder = runner.cpu_decoder, None
    assert eng.generate([prompt], greedy) == with_decoder
    runner.cpu_decoder = decoder
    # and the one-step logits directly
    eng.add_request("a", prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    eng.step()
    eng.step()
    batch = eng.scheduler.schedule()
    seq = batch.seqs[0]
    via_decoder = runner._decode_logits(batch)
    runner.cpu_decoder = None
    via_python = runner._decode_logits(batch)
    runner.cpu_decoder = decoder
    assert torch.equal(via_decoder, via_python) and seq.num_computed == len(prompt) + 1


def test_single_sequence_decoder_is_used_only_where_it_fits(small_checkpoints, checkpoints):
    # mixed (the CPU default): the one-row int4 half of each layer feeds the decoder
    assert _int4_engine(small_checkpoints["qwen3"], weight_quant="mixed").runner.cpu_decoder is not None
    # no int4 linears (bf16 weights): the Python fused path
    assert _int4_engine(small_checkpoints["qwen3"], weight_quant="none").runner.cpu_decoder is None
    # K = 64 (the tiny preset) cannot use the int4 kernel; MoE layers never do
    assert _int4_engine(checkpoints["qwen3"]).runner.cpu_decoder is None
    assert _int4_engine(checkpoints["qwen3_moe"]).runner.cpu_decoder is None
    assert _int4_engine(small_checkpoints["qwen3"], cpu_kernels=False).runner.cpu_decoder is None


def test_int4_kernel_model_is_as_close_to_bf16_as_torchs_int4(small_checkpoints):
    """One decode step's logits against the same model unquantized (each mode prefills on its own kernels, as
    it serves): our int4 x int8 path errs about as much as torch's int4 weight-only kernel on the same codes
    (random weights give ~0.25 relative error to both)."""
    from thinkgate.sampling.params import SamplingParams

    logits = {}
    for mode, kernels in (("none", True), ("int4", True), ("int4", False)):
        eng = _int4_engine(small_checkpoints["qwen3"], weight_quant=mode, cpu_kernels=kernels)
        eng.add_request("a", list(range(10, 50)), SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))
        eng.step()
        logits[mode, kernels] = eng.runner._logits(eng.scheduler.schedule(), [True])
    ref = logits["none", True]
    ours, torchs = ((logits["int4", k] - ref).norm() / ref.norm() for k in (True, False))
    assert ours.item() < 1.3 * torchs.item() + 0.02, (ours, torchs)


def _in_subprocess(code: str, env: dict, timeout: float = 300) -> str:
    import os
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                       timeout=timeout)
    assert r.returncode == 0, r.stderr[-2000:]
    return r.stdout + r.stderr


def test_without_the_kernels_the_engine_falls_back_to_torch(tmp_path, checkpoints):
    """THINKGATE_CPU_KERNELS=0, or a compiler that fails: torch's ops serve, with a warning for the failure."""
    code = f"""
from thinkgate.layers import cpu_kernels
from thinkgate.config import EngineConfig
from thinkgate.engine.llm_engine import LLMEngine
from thinkgate.sampling.params import SamplingParams
assert cpu_kernels.load() is None
eng = LLMEngine.from_config(EngineConfig(model={str(checkpoints["qwen3"])!r}, dtype="float32",
                                         kv_cache_memory=2**24))
assert type(eng.runner.model.attn_backend).__name__ == "TorchPagedAttention"
print(len(eng.generate([[5, 6, 7]], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))[0]))
"""
    assert _in_subprocess(code, {"THINKGATE_CPU_KERNELS": "0"}).startswith("4")
    # a fresh cache (so it must build) and a C++ compiler that always fails
    out = _in_subprocess(code, {"THINKGATE_CACHE": str(tmp_path / "cache"), "CXX": "false"})
    assert "could not be built" in out and "using torch's ops" in out



def test_mixed_linear_sends_one_row_steps_to_the_int4_kernel():
    from thinkgate.layers.linear import MixedLinear

    g = torch.Generator().manual_seed(9)
    w = torch.randn(64, 256, generator=g) * 0.05
    mixed = MixedLinear(w, None, keep_dense=True)
    assert isinstance(mixed.single, Q4Linear)
    for rows, path in ((1, mixed.single), (2, mixed.batched), (16, mixed.batched)):
        x = torch.randn(rows, 256, generator=g).to(torch.bfloat16)
        assert torch.equal(mixed(x), path(x)), rows


def test_a_build_killed_midway_does_not_hang_later_starts(tmp_path):
    """torch's builder leaves a `lock` file behind when a build is killed; the next start must not wait on it
    forever. The built folder is copied to a fresh cache with such a leftover lock."""
    import shutil

    built = cpu_kernels._build_dir()
    copy = tmp_path / "cache" / "kernels" / built.name
    shutil.copytree(built, copy)
    (copy / "lock").touch()
    out = _in_subprocess("from thinkgate.layers import cpu_kernels\nprint(cpu_kernels.load() is not None)",
                         {"THINKGATE_CACHE": str(tmp_path / "cache")}, timeout=90)
    assert out.startswith("True") and not (copy / "lock").exists()
