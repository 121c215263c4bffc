"""The GPU decode path (Triton paged kernel, fixed-buffer decode graphs), run on CPU through Triton's
interpreter: the same kernel source and the same buffer bookkeeping as on a GPU, minus the graph capture.
"""

import os

import pytest
import torch

pytest.importorskip("triton", reason="triton is not installed (CUDA builds of torch and the xgrammar extra bring it)")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("a GPU is present: tests/gpu runs the kernel there, on device tensors", allow_module_level=True)

from tests.layers.fused_checks import check_qk_norm_rope_store, check_rms_norm, check_silu_mul  # noqa: E402
from thinkgate.engine.cuda_graphs import batch_buckets  # noqa: E402
from thinkgate.layers.attention import AttentionMetadata, TorchPagedAttention  # noqa: E402
from thinkgate.sampling.params import SamplingParams  # noqa: E402


@pytest.fixture(scope="module")
def kernel_module():
    # conftest set TRITON_INTERPRET=1 where there is no GPU, before anything imported triton.
    import thinkgate.layers.triton_attention as mod

    return mod


@pytest.mark.parametrize("hq,hkv,d,page", [(4, 2, 16, 16), (16, 8, 64, 16), (32, 4, 32, 8), (14, 2, 64, 4)])
def test_kernel_matches_reference_attention(kernel_module, hq, hkv, d, page):
    g = torch.Generator().manual_seed(hq * 100 + d)
    nblocks = 64
    kc = torch.randn(nblocks, page, hkv, d, generator=g)
    vc = torch.randn(nblocks, page, hkv, d, generator=g)
    lens = [1, 17, 100, 64, 65]
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(-(-n // page))] for n in lens]  # scattered, out-of-order pages
    q = torch.randn(len(lens), hq, d, generator=g)
    ref = TorchPagedAttention(d ** -0.5).forward(
        q, kc, vc, AttentionMetadata.build([1] * len(lens), lens, tables, page, torch.device("cpu")))
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    out = kernel_module.paged_decode_attention(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32), d ** -0.5)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


@pytest.mark.parametrize("splits", [2, 3, 7])
def test_split_context_kernel_matches_reference(kernel_module, splits):
    """Flash-decoding: each context read in `splits` ranges of at least one tile, partials merged by their
    log-sum-exp; odd lengths, a context shorter than one range (later ranges empty) and one of 1 token."""
    g = torch.Generator().manual_seed(splits)
    page, hq, hkv, d = 16, 8, 2, 32
    lens = [1, 63, 64, 65, 200, 450]
    nblocks = sum(-(-n // page) for n in lens) + 4
    kc = torch.randn(nblocks, page, hkv, d, generator=g)
    vc = torch.randn(nblocks, page, hkv, d, generator=g)
    perm = torch.randperm(nblocks, generator=g).tolist()
    tables = [[perm.pop() for _ in range(-(-n // page))] for n in lens]
    q = torch.randn(len(lens), hq, d, generator=g)
    ref = TorchPagedAttention(d ** -0.5).forward(
        q, kc, vc, AttentionMetadata.build([1] * len(lens), lens, tables, page, torch.device("cpu")))
    width = max(map(len, tables))
    bt = torch.tensor([t + [0] * (width - len(t)) for t in tables], dtype=torch.int32)
    out = torch.full_like(q, float("nan"))  # every element must be written
    kernel_module.paged_decode_attention(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32), d ** -0.5, out=out,
                                         num_splits=splits, min_split=kernel_module.BLOCK_N)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-5)


def test_default_splits_fill_the_device_and_respect_the_shortest_range(kernel_module):
    cpu = torch.device("cpu")  # counted as 4 multiprocessors
    assert kernel_module.default_splits(1, 2, 32768, cpu) == 8  # 16 programs wanted / 2 KV heads
    assert kernel_module.default_splits(1, 2, 1024, cpu) == 2  # no range under MIN_SPLIT positions
    assert kernel_module.default_splits(32, 8, 32768, cpu) == 1


def test_batch_buckets_cover_every_size():
    for max_batch in (1, 3, 8, 20, 64):
        buckets = batch_buckets(max_batch)
        assert buckets == sorted(set(buckets)) and buckets[-1] == max_batch
        assert all(any(b >= n for b in buckets) for n in range(1, max_batch + 1))
    assert batch_buckets(32) == [1, 2, 4, 8, 16, 24, 32]


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_decode_buffers_and_kernel_keep_greedy_outputs(kernel_module, engine_factory, arch):
    """Padding rows in a bucket (3 sequences in a bucket of 4), scratch-block writes, slots, block tables and
    context lengths built for the fixed buffers: the greedy tokens equal the reference engine's."""
    greedy = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    ref = engine_factory(arch, block_size=4, enable_prefix_caching=False, cpu_kernels=False)
    g = torch.Generator().manual_seed(7)
    prompts = [torch.randint(0, ref.tokenizer.vocab_size, (n,), generator=g).tolist() for n in (5, 18, 9)]
    expected = ref.generate(prompts, greedy)

    eng = engine_factory(arch, block_size=4, enable_prefix_caching=False, max_num_seqs=6)
    model = eng.runner.model
    backend = model.attn_backend  # the loaded model is shared by the session's engines: put it back after
    try:
        eng.runner.enable_paged_decode(max_batch=6, max_model_len=eng.max_model_len, graphs="eager",
                                       kernels="triton")
        assert type(model.attn_backend).__name__ == "TritonPagedAttention" and model.fused_ops is not None
        graphs = eng.runner.graphs
        assert graphs.buckets == [1, 2, 4, 6]
        used = []
        run = graphs.run
        graphs.run = lambda *a: used.append(len(a[0])) or run(*a)
        assert eng.generate(prompts, greedy) == expected
        assert used.count(3) == 11  # 11 decode steps of 3 sequences went through the fixed buffers
        # Eager paged decode without the fixed buffers (a batch past the largest bucket takes this path).
        eng.runner.graphs = None
        assert eng.generate(prompts, greedy) == expected
        eng.block_manager.check_integrity([])
    finally:
        model.attn_backend, model.fused_ops = backend, None


@pytest.fixture(scope="module")
def fused():
    import thinkgate.layers.triton_fused as mod

    return mod


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_rms_norm_with_and_without_residual(fused, dtype):
    check_rms_norm(fused, dtype)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_fused_qk_norm_rope_store_matches_the_layer_ops(fused, qk_norm):
    check_qk_norm_rope_store(fused, torch.float32, qk_norm)


def test_fused_silu_mul(fused):
    check_silu_mul(fused, torch.float32)
