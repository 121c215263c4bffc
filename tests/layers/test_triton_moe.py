"""The fused expert kernels (layers/triton_moe.py) under Triton's interpreter, against the grouped
PyTorch path: bf16-like uneven routing with empty experts, and fp8 weights with per-channel scales."""

import os

import pytest
import torch

from thinkgate.layers.fp8 import quantize_weight
from thinkgate.layers.moe import grouped_moe, route

pytest.importorskip("triton", reason="triton is not installed (CUDA builds of torch and the xgrammar extra bring it)")
if os.environ.get("TRITON_INTERPRET") != "1":
    pytest.skip("a GPU is present: tests/gpu runs the kernels there", allow_module_level=True)

from thinkgate.layers.triton_moe import BLOCK_M, align_by_expert, fused_moe  # noqa: E402


def _layer(t, e, k, h, i, seed):
    g = torch.Generator().manual_seed(seed)
    w13 = torch.randn(e, 2 * i, h, generator=g) / h ** 0.5
    w2 = torch.randn(e, h, i, generator=g) / i ** 0.5
    x = torch.randn(t, h, generator=g)
    logits = torch.randn(t, e, generator=g)
    logits[:, e // 2:] -= 100  # the upper half of the experts is never chosen: empty groups
    weights, experts = route(logits, k, True, x.dtype)
    return x, weights, experts, w13, w2


def test_alignment_puts_each_expert_in_whole_blocks():
    experts = torch.tensor([[3, 0], [3, 1], [0, 3]])
    sorted_ids, block_expert, used = align_by_expert(experts, 4, block_m=4)
    n = experts.numel()
    assert sorted_ids.numel() % 4 == 0 and sorted_ids.numel() >= n + 4 * 3
    assert used.item() == 12  # experts 0, 1, 3 each take one block of 4 rows
    flat = experts.reshape(-1)
    for b in range(used.item() // 4):
        ids = [p for p in sorted_ids[4 * b:4 * b + 4].tolist() if p < n]
        assert ids and all(flat[p].item() == block_expert[b].item() for p in ids)
    assert sorted(p for p in sorted_ids.tolist() if p < n) == list(range(n))


@pytest.mark.parametrize("t,k", [(1, 2), (5, 2), (9, 3)])
def test_fused_kernels_equal_the_grouped_path(t, k):
    x, weights, experts, w13, w2 = _layer(t, 8, k, 64, 48, seed=t)
    ref = grouped_moe(x, weights, experts, w13, w2)
    torch.testing.assert_close(fused_moe(x, weights, experts, w13, w2), ref, atol=1e-4, rtol=1e-4)


def test_fp8_weights_are_upcast_in_the_kernel():
    x, weights, experts, w13, w2 = _layer(7, 8, 2, 64, 32, seed=3)
    q13, s13 = quantize_weight(w13)
    q2, s2 = quantize_weight(w2)
    ref = grouped_moe(x, weights, experts, q13.float() * s13[..., None], q2.float() * s2[..., None])
    out = fused_moe(x, weights, experts, q13, q2, s13, s2)
    torch.testing.assert_close(out, ref, atol=1e-4, rtol=1e-4)
    assert BLOCK_M == 16
