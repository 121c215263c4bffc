"""fp8 weights (layers/fp8.py) on CPU: the math the GPU kernels run, checked against bf16/fp32.

torch's CPU build has the dense fp8 GEMM (`_scaled_mm`) but not the grouped one, so the expert path runs
its upcast form here; tests/gpu runs both native kernels on the GPU.
"""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from thinkgate.layers.fp8 import (
    FP8,
    Fp8Experts,
    Fp8Linear,
    quantize_model_fp8,
    quantize_rows,
    quantize_weight,
)
from thinkgate.layers.moe import grouped_moe, route


def _rel(a, b):
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


def test_weight_codes_and_scales_round_trip():
    w = torch.randn(64, 96) * torch.logspace(-2, 1, 64)[:, None]  # channels of very different ranges
    q, s = quantize_weight(w)
    assert q.dtype == FP8 and s.shape == (64,)
    assert q.float().abs().amax(1).allclose(torch.full((64,), 448.0))  # each channel uses the full range
    assert _rel(q.float() * s[:, None], w) < 0.04  # e4m3: 3 mantissa bits


def test_linear_matches_bf16_on_the_native_cpu_kernel():
    lin = torch.nn.Linear(128, 64, bias=True).to(torch.bfloat16)
    x = torch.randn(5, 128, dtype=torch.bfloat16)
    ref = lin(x)
    native, upcast = Fp8Linear(lin, native=True), Fp8Linear(lin, native=False)
    assert _rel(native(x), ref) < 0.05
    assert _rel(native(x), upcast(x)) < 0.01  # the kernel computes what the upcast form says


def test_experts_match_bf16_grouped_moe_with_uneven_and_empty_groups():
    g = torch.Generator().manual_seed(0)
    e, h, i, t, k = 8, 64, 32, 11, 2
    w13 = torch.randn(e, 2 * i, h, generator=g) / h ** 0.5
    w2 = torch.randn(e, h, i, generator=g) / i ** 0.5
    x = torch.randn(t, h, generator=g)
    logits = torch.randn(t, e, generator=g)
    logits[:, 5:] -= 100  # experts 5-7 never chosen: empty groups in the middle of the layout
    weights, experts = route(logits, k, True, x.dtype)
    ref = grouped_moe(x, weights, experts, w13, w2)
    out = Fp8Experts(w13, w2, native=False)(x, weights, experts)
    assert _rel(out, ref) < 0.06


@pytest.mark.parametrize("arch", ["qwen3", "qwen3_moe"])
def test_whole_model_agrees_with_full_precision(checkpoints, arch):
    """Every decoder linear and expert in fp8, head and router kept: log-probabilities within 0.3 of the
    fp32 model's, and a greedy token differs only where fp32's own top two are within 0.25 (a routing
    change in the MoE moves more than a rounding does)."""
    from thinkgate.layers.attention import AttentionMetadata
    from thinkgate.models.loader import load_model

    ref = load_model(str(checkpoints[arch]), dtype="float32", device="cpu").model
    model = copy.deepcopy(ref)
    n = quantize_model_fp8(model, native=(True, False))
    assert n == 4 * ref.cfg.num_layers
    assert all(not isinstance(m, torch.nn.Linear) for layer in model.layers for m in
               (layer.self_attn.qkv_proj, layer.self_attn.o_proj))
    ids = torch.randint(0, ref.cfg.vocab_size, (40,), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(40)

    def logits(m):
        caches = [(torch.zeros(4, 16, m.cfg.num_kv_heads, m.cfg.head_dim),) * 2 for _ in m.layers]
        caches = [(a.clone(), b.clone()) for a, b in caches]
        meta = AttentionMetadata.build([40], [40], [[0, 1, 2]], 16, torch.device("cpu"))
        with torch.inference_mode():
            return m.compute_logits(m(ids, pos, caches, meta))

    ours, theirs = logits(model), logits(ref)
    lp, lp_ref = F.log_softmax(ours, -1), F.log_softmax(theirs, -1)
    # A random tiny model's distributions are nearly flat, so a greedy token may flip where its two best
    # candidates are within the quantization noise; nowhere else.
    assert (lp - lp_ref).abs().max().item() < 0.3
    pick, best = ours.argmax(-1), theirs.argmax(-1)
    gap = lp_ref.gather(1, best[:, None]) - lp_ref.gather(1, pick[:, None])
    assert gap.max().item() < 0.25, gap.max().item()
    assert (pick == best).float().mean().item() >= 0.7


def test_fp8_is_refused_where_no_gpu_has_fp8_matmuls():
    from thinkgate.models.loader import check_quantization

    with pytest.raises(ValueError, match="compute capability 8.9"):
        check_quantization("fp8", torch.device("cpu"))
    with pytest.raises(ValueError, match="--quantization"):
        check_quantization("int3", torch.device("cpu"))


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="tests/gpu runs the kernel on a GPU")
def test_triton_row_quantizer_scales():
    """Under Triton's interpreter only the scales are checked: its numpy emulation of the fp8 cast drops the
    carry when rounding up crosses a power of two (124.3 -> 64, not 128); tests/gpu checks the codes."""
    pytest.importorskip("triton", reason="triton is not installed")
    from thinkgate.layers.triton_fp8 import quantize_rows_triton

    x = torch.randn(3, 5000) * torch.tensor([[0.01], [1.0], [30.0]])  # rows longer than one tile
    q, s = quantize_rows_triton(x)
    assert q.dtype == FP8 and q.shape == x.shape
    torch.testing.assert_close(s, quantize_rows(x)[1])
