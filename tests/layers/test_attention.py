"""The reference attention backend's CPU forms against plain masked attention in fp64."""

import pytest
import torch

from thinkgate.layers.attention import AttentionMetadata, TorchPagedAttention, chunk_attention_cpu


def masked_reference(q, k, v, scale):
    """q [1, Hq, T, D] at positions L - T .. L - 1 over k, v [1, Hkv, L, D]: softmax over a materialised mask."""
    t, n, g = q.shape[2], k.shape[2], q.shape[1] // k.shape[1]
    k, v = k.double().repeat_interleave(g, 1), v.double().repeat_interleave(g, 1)
    scores = (q.double() @ k.transpose(-1, -2)) * scale
    visible = torch.arange(n)[None, :] <= (n - t + torch.arange(t))[:, None]
    return torch.softmax(scores.masked_fill(~visible, float("-inf")), -1) @ v


@pytest.mark.parametrize("t,n", [(1, 1), (5, 5), (7, 40), (64, 65), (33, 200)])
@pytest.mark.parametrize("hq,hkv", [(4, 4), (14, 2)])
def test_a_later_chunk_attends_as_one_causal_softmax(t, n, hq, hkv):
    g = torch.Generator().manual_seed(t * 1000 + n)
    q = torch.randn(1, hq, t, 64, generator=g) * 2
    k, v = torch.randn(2, 1, hkv, n, 64, generator=g) * 2
    out = chunk_attention_cpu(q, k, v, 0.125)
    assert out.shape == q.shape and out.dtype == q.dtype
    torch.testing.assert_close(out.double(), masked_reference(q, k, v, 0.125), atol=1e-5, rtol=1e-4)


def test_a_later_chunk_in_bf16_keeps_its_dtype_and_is_close():
    g = torch.Generator().manual_seed(3)
    q = torch.randn(1, 14, 24, 64, generator=g)
    k, v = torch.randn(2, 1, 2, 90, 64, generator=g)
    out = chunk_attention_cpu(q.bfloat16(), k.bfloat16(), v.bfloat16(), 0.125)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.double(), masked_reference(q, k, v, 0.125), atol=3e-2, rtol=3e-2)


def test_the_paged_backend_runs_a_later_chunk_without_a_mask():
    """A prompt's second chunk through the paged cache: no [T, L] mask is built, and each query sees exactly the
    keys up to its own position (strided views of the gathered cache, the layout the backend passes)."""
    bs, hkv, hq, d, n, t = 4, 2, 6, 16, 23, 9
    g = torch.Generator().manual_seed(7)
    blocks = [5, 2, 7, 0, 3, 6]  # scattered pages
    k_cache, v_cache = torch.randn(2, 8, bs, hkv, d, generator=g)
    meta = AttentionMetadata.build([t], [n], [blocks], bs, torch.device("cpu"))
    assert meta.kind == "chunk" and meta.mask is None
    q = torch.randn(t, hq, d, generator=g)
    out = TorchPagedAttention(d ** -0.5).forward(q, k_cache, v_cache, meta)  # [T, Hq, D]
    slots = torch.tensor([blocks[p // bs] * bs + p % bs for p in range(n)])
    k = k_cache.view(-1, hkv, d)[slots].transpose(0, 1)[None]
    v = v_cache.view(-1, hkv, d)[slots].transpose(0, 1)[None]
    ref = masked_reference(q.transpose(0, 1)[None], k, v, d ** -0.5)[0].transpose(0, 1)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-4)
