"""Paged decode attention as one Triton kernel (GPU backend).

Decode reads each sequence's keys and values where they lie in the paged cache, through the block table,
so nothing is gathered into a padded copy and the kernel's shapes do not depend on the context lengths:
the same launch can be captured once in a CUDA graph and replayed at every step. One program handles one
(sequence, KV head) pair and all the query heads that share that KV head (GQA), so each key and value
is read once per group, with an online softmax in fp32 over tiles of BLOCK_N positions.

Imported only where Triton is present (CUDA installs of torch ship it); on CPU the reference backend runs.
Tests run the kernel under Triton's interpreter (TRITON_INTERPRET=1) against the reference.

Long contexts (flash-decoding): with few sequences, (sequence, KV head) pairs are too few programs to
fill the GPU (batch 1 of an 8-KV-head model is 8 programs on 132 multiprocessors), so one long context
would be read by a few SMs at a fraction of the memory bandwidth. `num_splits` > 1 splits each context
into that many ranges, each program reading one range into a partial softmax (its output and
log-sum-exp, fp32), and a second kernel merges the partials. The split count is fixed per launch shape
(so a CUDA graph captures it), while each range's length follows the context length at run time: a
short context leaves the later ranges empty, and their programs return at once.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _paged_decode_kernel(q_ptr, k_ptr, v_ptr, out_ptr, tables_ptr, lens_ptr, scale,
                         stride_qb, stride_qh, stride_kb, stride_ks, stride_kh, stride_tb, stride_ob, stride_oh,
                         lse_ptr, stride_lb, stride_lh, splits,
                         GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HEAD_DIM: tl.constexpr,
                         PAGE: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
                         SPLIT: tl.constexpr, MIN_SPLIT: tl.constexpr):
    """Not SPLIT: the whole context, normalised output in out. SPLIT: program (b, kvh, s) reads
    the s-th range and writes its partial output to out[b, head, s] and its log-sum-exp to lse[b, head, s]."""
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(lens_ptr + b)
    lo = 0
    hi = ctx
    if SPLIT:
        s_id = tl.program_id(2)
        # Ranges of whole tiles, none shorter than MIN_SPLIT (a short context uses fewer programs).
        span = tl.maximum(tl.cdiv(tl.cdiv(ctx, splits), BLOCK_N) * BLOCK_N, MIN_SPLIT)
        lo = s_id * span
        hi = tl.minimum(lo + span, ctx)
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
    for start in range(lo, hi, BLOCK_N):
        pos = start + offs_n
        n_mask = pos < hi
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
    # An empty range (hi <= lo) leaves l_i = 0: its partial is 0 with a log-sum-exp of -inf (weight 0).
    out = acc / tl.maximum(l_i, 1e-30)[:, None]
    if SPLIT:
        s_id = tl.program_id(2)
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + s_id * HEAD_DIM + offs_d[None, :],
                 out, mask=g_mask[:, None])
        lse = tl.where(l_i > 0, m_i + tl.log(tl.maximum(l_i, 1e-30)), float("-inf"))
        tl.store(lse_ptr + b * stride_lb + heads * stride_lh + s_id, lse, mask=g_mask)
    else:
        tl.store(out_ptr + b * stride_ob + heads[:, None] * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


@triton.jit
def _merge_splits_kernel(part_ptr, lse_ptr, out_ptr, stride_pb, stride_ph, stride_lb, stride_lh,
                         stride_ob, stride_oh, splits, SPLITS_PAD: tl.constexpr,
                         HEAD_DIM: tl.constexpr):
    """out[b, h] = sum_s exp(lse_s - lse) * part[b, h, s], lse = log sum_s exp(lse_s)."""
    b = tl.program_id(0)
    h = tl.program_id(1)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM)
    s_mask = offs_s < splits
    lse = tl.load(lse_ptr + b * stride_lb + h * stride_lh + offs_s, mask=s_mask, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, 0))  # the first range is never empty (ctx >= 1), so the max is finite
    w = w / tl.sum(w, 0)
    part = tl.load(part_ptr + b * stride_pb + h * stride_ph + offs_s[:, None] * HEAD_DIM + offs_d[None, :],
                   mask=s_mask[:, None], other=0.0)
    out = tl.sum(part * w[:, None], 0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty))


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, context_lens: torch.Tensor, scale: float,
                           out: torch.Tensor | None = None, num_splits: int | None = None,
                           min_split: int | None = None) -> torch.Tensor:
    """q: [B, Hq, D]; caches: [N, PAGE, Hkv, D]; block_tables: [B, M] int32; context_lens: [B] int32 (>= 1).
    `num_splits`: ranges per context (None: enough programs to fill the device, see `default_splits`);
    `min_split`: the shortest range in positions (a multiple of BLOCK_N; default MIN_SPLIT)."""
    b, hq, d = q.shape
    page, hkv = k_cache.shape[1], k_cache.shape[2]
    group = hq // hkv
    if out is None:
        out = torch.empty_like(q)
    q = q.to(k_cache.dtype)
    splits = default_splits(b, hkv, block_tables.shape[1] * page, q.device) if num_splits is None else num_splits
    # tl.dot wants at least 16 rows; the padded rows read no memory and are not stored.
    group_pad = max(16, triton.next_power_of_2(group))
    opts = dict(GROUP=group, GROUP_PAD=group_pad, HEAD_DIM=d, PAGE=page, BLOCK_N=BLOCK_N,
                # fp32 caches get true fp32 products (tf32 would cost ~1e-3 of accuracy); bf16 ignores this.
                PRECISION="ieee" if k_cache.dtype == torch.float32 else "tf32", SPLIT=splits > 1,
                MIN_SPLIT=min_split or MIN_SPLIT)
    strides = (q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
               block_tables.stride(0))
    if splits == 1:
        _paged_decode_kernel[(b, hkv)](q, k_cache, v_cache, out, block_tables, context_lens, scale, *strides,
                                       out.stride(0), out.stride(1), out, 0, 0, 1, **opts)
        return out
    part = torch.empty(b, hq, splits, d, dtype=torch.float32, device=q.device)
    lse = torch.empty(b, hq, splits, dtype=torch.float32, device=q.device)
    _paged_decode_kernel[(b, hkv, splits)](q, k_cache, v_cache, part, block_tables, context_lens, scale, *strides,
                                           part.stride(0), part.stride(1), lse, lse.stride(0), lse.stride(1), splits,
                                           **opts)
    _merge_splits_kernel[(b, hq)](part, lse, out, part.stride(0), part.stride(1), lse.stride(0), lse.stride(1),
                                  out.stride(0), out.stride(1), splits,
                                  SPLITS_PAD=triton.next_power_of_2(splits), HEAD_DIM=d)
    return out


BLOCK_N = 64  # context positions per tile
MIN_SPLIT = 512  # positions per range at least: shorter ranges cost more in merging than they win
MAX_SPLITS = 64


def default_splits(batch: int, kv_heads: int, max_context: int, device: torch.device) -> int:
    """Ranges per context so that batch x KV heads x ranges is about four programs per multiprocessor,
    bounded by what the longest possible context can fill (no range under MIN_SPLIT positions)."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4
    want = -(-4 * sms // (batch * kv_heads))
    return max(1, min(want, MAX_SPLITS, -(-max_context // MIN_SPLIT)))


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
