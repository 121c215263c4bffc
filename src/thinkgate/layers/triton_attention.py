"""Paged decode attention as one Triton kernel (GPU backend).

Decode reads each sequence's keys and values where they lie in the paged cache, through the block table,
so nothing is gathered into a padded copy and the kernel's shapes do not depend on the context lengths:
the same launch can be captured once in a CUDA graph and replayed at every step. One program handles one
(sequence, KV head) pair and all the query heads that share that KV head (GQA), so each key and value
is read once per group, with an online softmax in fp32 over tiles of BLOCK_N positions.

Imported only where Triton is present (CUDA installs of torch ship it); on CPU the reference backend runs.
Tests run the kernel under Triton's interpreter (TRITON_INTERPRET=1) against the reference.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, scale,
                         stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb, stride_ob, stride_oh,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         PAGE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(lens_ptr + b)
    offs_g = tl.arange(0, GROUP_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    offs_n = tl.arange(0, BLOCK_N)
    g_mask = offs_g < GROUP
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + offs_d[None, :], mask=g_mask[:, None],
                other=0.0)  # [G, D]
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, HEAD_DIM], tl.float32)
    for start in range(0, ctx, BLOCK_N):
        pos = start + offs_n
        n_mask = pos < ctx
        page = tl.load(tables_ptr + b * stride_tb + pos // PAGE, mask=n_mask, other=0)
        row = page.to(tl.int64) * stride_kb + (pos % PAGE) * stride_ks + kvh * stride_kh  # [N]
        k = tl.load(k_ptr + row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)  # [N, D]
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION).to(tl.float32) * scale  # [G, N]
        s = tl.where(n_mask[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp(m_i - m_new)
        p = tl.exp(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptr + row[:, None] + offs_d[None, :], mask=n_mask[:, None], other=0.0)  # [N, D]
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION).to(tl.float32)
        m_i = m_new
    out = acc / l_i[:, None]
    tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
             out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None) -> torch.Tensor:
    """q: [B, Hq, D]; caches: [N, PAGE, Hkv, D]; block_tables: [B, M] int32; context_lens: [B] int32 (>= 1)."""
    b, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    if out is None:
        out = torch.empty_like(q)
    q = q.to(k_cache.dtype)
    # tl.dot wants at least 16 rows; the padded rows read no memory and are not stored.
    group_pad = max(16, triton.next_power_of_2(group))
    _paged_decode_kernel[(b, hkv)](
        q, k_cache, v_cache, out, block_tables, context_lens, scale,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        block_tables.stride(0), out.stride(0), out.stride(1),
        GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=d, PAGE=page, BLOCK_N=64,
        # fp32 caches get true fp32 products (tf32 would cost ~1e-3 of accuracy); bf16 ignores this.
        PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32",
    )
    return out


class TritonPagedAttention:
    """Decode through the paged kernel; prefill and mixed steps through the reference backend."""

    def __init__(self, scale: float, compute_dtype: torch.dtype | None = None):
        from thinkgate.layers.attention import TorchPagedAttention

        self.scale = scale
        self.compute_dtype = compute_dtype
        self.reference = TorchPagedAttention(scale, compute_dtype)

    def forward(self, q, k_cache, v_cache, meta, k_new=None, v_new=None):
        if meta.kind == "decode" and meta.block_tables is not None:
            return paged_decode_attention(q, k_cache, v_cache, meta.block_tables, meta.context_lens, self.scale)
        return self.reference.forward(q, k_cache, v_cache, meta, k_new, v_new)
