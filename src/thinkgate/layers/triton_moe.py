"""Fused expert layer for decode as two Triton kernels (GPU path of layers/moe.py), as vLLM's and SGLang's
fused MoE kernels do it.

A decode step's (token, expert) pairs are few (batch x top-k) and spread over many experts, so what costs
is reading each chosen expert's weights once, at memory speed, with as few launches as possible:
- the pairs are grouped by expert into blocks of BLOCK_M rows (a block holds one expert's pairs; padding
  rows point nowhere), in a fixed-size layout so a CUDA graph replays it;
- kernel 1 reads each block's tokens straight from x (no gathered copy) and its expert's gate and up rows,
  and writes silu(gate) * up;
- kernel 2 multiplies that by the expert's down rows and by the pair's routing weight, writing one row per
  pair; a sum over the top-k pairs of each token gives the layer's output.
Weights may be bf16, or fp8 (e4m3) with a scale per output channel, upcast in registers (weight-only: the
activations stay bf16, so fp8 experts lose nothing to activation rounding here).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _block_rows(sorted_ptr, block_expert_ptr, n_pairs, mb, BLOCK_M: tl.constexpr):
    """Block mb's expert, row offsets in the padded layout, pair ids, and which rows hold a pair."""
    e = tl.load(block_expert_ptr + mb).to(tl.int64)
    offs_m = mb * BLOCK_M + tl.arange(0, BLOCK_M)
    pair = tl.load(sorted_ptr + offs_m)
    return e, offs_m, pair, pair < n_pairs


@triton.jit
def _gate_up_kernel(x_ptr, w_ptr, ws_ptr, act_ptr, sorted_ptr, block_expert_ptr, used_ptr,
                    n_pairs, top_k, hidden, inter, stride_we, stride_wn,
                    HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    mb = tl.program_id(0)
    nb = tl.program_id(1)
    if mb * BLOCK_M >= tl.load(used_ptr):
        return
    e, offs_m, pair, valid = _block_rows(sorted_ptr, block_expert_ptr, n_pairs, mb, BLOCK_M)
    token = tl.where(valid, pair // top_k, 0).to(tl.int64)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < inter
    offs_k = tl.arange(0, BLOCK_K)
    acc_g = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    acc_u = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_base = w_ptr + e * stride_we
    for k0 in range(0, hidden, BLOCK_K):
        k_mask = k0 + offs_k < hidden
        a = tl.load(x_ptr + token[:, None] * hidden + k0 + offs_k[None, :], mask=valid[:, None] & k_mask[None, :],
                    other=0.0)
        wg = tl.load(w_base + offs_n[None, :] * stride_wn + k0 + offs_k[:, None],
                     mask=n_mask[None, :] & k_mask[:, None], other=0.0).to(a.dtype)
        wu = tl.load(w_base + (inter + offs_n[None, :]) * stride_wn + k0 + offs_k[:, None],
                     mask=n_mask[None, :] & k_mask[:, None], other=0.0).to(a.dtype)
        acc_g = tl.dot(a, wg, acc_g)
        acc_u = tl.dot(a, wu, acc_u)
    if HAS_SCALE:
        acc_g = acc_g * tl.load(ws_ptr + e * 2 * inter + offs_n, mask=n_mask, other=0.0)[None, :]
        acc_u = acc_u * tl.load(ws_ptr + e * 2 * inter + inter + offs_n, mask=n_mask, other=0.0)[None, :]
    # Rounded to the activation dtype where the PyTorch path rounds (after each matmul), then SwiGLU.
    g = acc_g.to(act_ptr.dtype.element_ty).to(tl.float32)
    u = acc_u.to(act_ptr.dtype.element_ty).to(tl.float32)
    h = (g / (1.0 + tl.exp(-g))).to(act_ptr.dtype.element_ty).to(tl.float32) * u
    tl.store(act_ptr + offs_m[:, None].to(tl.int64) * inter + offs_n[None, :], h.to(act_ptr.dtype.element_ty),
             mask=valid[:, None] & n_mask[None, :])


@triton.jit
def _down_kernel(act_ptr, w_ptr, ws_ptr, out_ptr, sorted_ptr, block_expert_ptr, used_ptr, rw_ptr,
                 n_pairs, hidden, inter, stride_we, stride_wn,
                 HAS_SCALE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    mb = tl.program_id(0)
    nb = tl.program_id(1)
    if mb * BLOCK_M >= tl.load(used_ptr):
        return
    e, offs_m, pair, valid = _block_rows(sorted_ptr, block_expert_ptr, n_pairs, mb, BLOCK_M)
    offs_n = nb * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < hidden
    offs_k = tl.arange(0, BLOCK_K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    w_base = w_ptr + e * stride_we
    for k0 in range(0, inter, BLOCK_K):
        k_mask = k0 + offs_k < inter
        a = tl.load(act_ptr + offs_m[:, None].to(tl.int64) * inter + k0 + offs_k[None, :],
                    mask=valid[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(w_base + offs_n[None, :] * stride_wn + k0 + offs_k[:, None],
                    mask=n_mask[None, :] & k_mask[:, None], other=0.0).to(a.dtype)
        acc = tl.dot(a, w, acc)
    if HAS_SCALE:
        acc = acc * tl.load(ws_ptr + e * hidden + offs_n, mask=n_mask, other=0.0)[None, :]
    y = acc.to(out_ptr.dtype.element_ty).to(tl.float32)
    rw = tl.load(rw_ptr + tl.where(valid, pair, 0), mask=valid, other=0.0).to(tl.float32)
    y = (y * rw[:, None]).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + tl.where(valid, pair, 0).to(tl.int64)[:, None] * hidden + offs_n[None, :], y,
             mask=valid[:, None] & n_mask[None, :])


BLOCK_M = 16  # rows per block: a decode step has ~2 pairs per expert, and tl.dot needs 16
CONFIG = {"BLOCK_N": 64, "BLOCK_K": 128, "num_warps": 4, "num_stages": 3}


def align_by_expert(experts: torch.Tensor, num_experts: int, block_m: int = BLOCK_M):
    """Pairs grouped by expert in blocks of block_m: (sorted pair ids [P] padded with n_pairs, the expert of
    each block [P / block_m], rows in use [1]). P depends only on the shapes."""
    flat = experts.reshape(-1)
    n = flat.numel()
    order = torch.argsort(flat, stable=not flat.is_cuda)
    counts = torch.zeros(num_experts, dtype=torch.int32, device=flat.device).scatter_add_(
        0, flat, torch.ones_like(flat, dtype=torch.int32))
    padded = (counts + block_m - 1) // block_m * block_m
    pends = torch.cumsum(padded, 0, dtype=torch.int32)
    starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
    e_sorted = flat[order]
    rows = n + num_experts * (block_m - 1)
    rows = (rows + block_m - 1) // block_m * block_m
    pos = torch.arange(n, device=flat.device) - starts[e_sorted] + (pends - padded)[e_sorted]
    sorted_ids = torch.full((rows,), n, dtype=torch.int32, device=flat.device)
    sorted_ids[pos] = order.to(torch.int32)
    block_start = torch.arange(0, rows, block_m, device=flat.device, dtype=torch.int32)
    block_expert = torch.searchsorted(pends, block_start, right=True).clamp_(max=num_experts - 1).to(torch.int32)
    return sorted_ids, block_expert, pends[-1:]


def fused_moe(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor,
              s13: torch.Tensor | None = None, s2: torch.Tensor | None = None) -> torch.Tensor:
    """x: [T, H]; weights/experts: [T, K]; w13: [E, 2I, H]; w2: [E, H, I] (bf16, or fp8 with per-channel
    scales s13 [E, 2I] and s2 [E, H])."""
    t, k = experts.shape
    n_exp, two_i, hidden = w13.shape
    inter = two_i // 2
    sorted_ids, block_expert, used = align_by_expert(experts, n_exp)
    rows = sorted_ids.numel()
    act = torch.empty(rows, inter, dtype=x.dtype, device=x.device)
    out_pairs = torch.empty(t * k, hidden, dtype=x.dtype, device=x.device)
    cfg = CONFIG
    x = x.contiguous()
    has_scale = s13 is not None
    _gate_up_kernel[(rows // BLOCK_M, triton.cdiv(inter, cfg["BLOCK_N"]))](
        x, w13, s13 if has_scale else x, act, sorted_ids, block_expert, used, t * k, k, hidden, inter,
        w13.stride(0), w13.stride(1), HAS_SCALE=has_scale, BLOCK_M=BLOCK_M, BLOCK_N=cfg["BLOCK_N"],
        BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    _down_kernel[(rows // BLOCK_M, triton.cdiv(hidden, cfg["BLOCK_N"]))](
        act, w2, s2 if has_scale else x, out_pairs, sorted_ids, block_expert, used, weights.reshape(-1).contiguous(),
        t * k, hidden, inter, w2.stride(0), w2.stride(1), HAS_SCALE=has_scale, BLOCK_M=BLOCK_M,
        BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"], num_warps=cfg["num_warps"], num_stages=cfg["num_stages"])
    return out_pairs.view(t, k, hidden).sum(1)
