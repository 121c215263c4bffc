"""Fused elementwise kernels for the GPU path (Triton).

A decode step of a small model is bound by the number of kernels, not by bytes: in plain PyTorch one
layer is ~55 launches (an RMSNorm alone is a cast, the norm, a cast back and a multiply), ~1.8 us each even
inside a CUDA graph. These kernels cut a layer to about nine:
- `rms_norm`: optional residual add, then Qwen's RMSNorm, in one pass (returns the new residual too);
- `qk_norm_rope_store`: per-head q/k RMSNorm (Qwen3), NeoX rotary embedding in place, and the step's keys
  and values written to their paged-cache slots, for every head of every token in one launch;
- `silu_mul`: SwiGLU's silu(gate) * up.
Each rounds where the PyTorch reference rounds (to the activation dtype after each op), so the GPU path
computes the same numbers as the CPU one up to the order of fp32 sums.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, n_cols,
                     HAS_RES: tl.constexpr, BLOCK: tl.constexpr):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < n_cols
    x = tl.load(x_ptr + row * n_cols + offs, mask=mask, other=0.0)
    if HAS_RES:
        x = (x.to(tl.float32) + tl.load(res_ptr + row * n_cols + offs, mask=mask, other=0.0).to(tl.float32))
        x = x.to(out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * n_cols + offs, x, mask=mask)
    xf = x.to(tl.float32)
    rstd = 1.0 / tl.sqrt(tl.sum(xf * xf, 0) / n_cols + eps)
    normed = (xf * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * n_cols + offs, (normed * w).to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float,
             residual: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """x: [T, H] contiguous. Returns (norm(x + residual) * weight, x + residual); without a residual the
    second value is x itself."""
    t, h = x.shape
    out = torch.empty_like(x)
    res_out = torch.empty_like(x) if residual is not None else x
    _rms_norm_kernel[(t,)](x, residual if residual is not None else x, weight, out, res_out, eps, h,
                           HAS_RES=residual is not None, BLOCK=triton.next_power_of_2(h))
    return out, res_out


@triton.jit
def _qk_norm_rope_store_kernel(qkv_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, pos_ptr, slot_ptr, kc_ptr, vc_ptr,
                               eps, stride_t, NQ: tl.constexpr, NKV: tl.constexpr, HALF: tl.constexpr,
                               HAS_NORM: tl.constexpr):
    t = tl.program_id(0)
    h = tl.program_id(1)
    offs = tl.arange(0, HALF)
    row = qkv_ptr + t * stride_t + h * (2 * HALF)
    dt = qkv_ptr.dtype.element_ty
    x1 = tl.load(row + offs).to(tl.float32)
    x2 = tl.load(row + HALF + offs).to(tl.float32)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    if h < NQ + NKV:
        if HAS_NORM:
            rstd = 1.0 / tl.sqrt((tl.sum(x1 * x1, 0) + tl.sum(x2 * x2, 0)) / (2 * HALF) + eps)
            if h < NQ:
                w1 = tl.load(qw_ptr + offs).to(tl.float32)
                w2 = tl.load(qw_ptr + HALF + offs).to(tl.float32)
            else:
                w1 = tl.load(kw_ptr + offs).to(tl.float32)
                w2 = tl.load(kw_ptr + HALF + offs).to(tl.float32)
            x1 = ((x1 * rstd).to(dt).to(tl.float32) * w1).to(dt).to(tl.float32)
            x2 = ((x2 * rstd).to(dt).to(tl.float32) * w2).to(dt).to(tl.float32)
        pos = tl.load(pos_ptr + t).to(tl.int64)
        cos = tl.load(cos_ptr + pos * HALF + offs).to(dt).to(tl.float32)
        sin = tl.load(sin_ptr + pos * HALF + offs).to(dt).to(tl.float32)
        o1 = ((x1 * cos).to(dt).to(tl.float32) - (x2 * sin).to(dt).to(tl.float32)).to(dt)
        o2 = ((x2 * cos).to(dt).to(tl.float32) + (x1 * sin).to(dt).to(tl.float32)).to(dt)
        tl.store(row + offs, o1)
        tl.store(row + HALF + offs, o2)
        if h >= NQ:
            dst = kc_ptr + slot * (NKV * 2 * HALF) + (h - NQ) * (2 * HALF)
            tl.store(dst + offs, o1.to(kc_ptr.dtype.element_ty))
            tl.store(dst + HALF + offs, o2.to(kc_ptr.dtype.element_ty))
    else:
        dst = vc_ptr + slot * (NKV * 2 * HALF) + (h - NQ - NKV) * (2 * HALF)
        tl.store(dst + offs, x1.to(vc_ptr.dtype.element_ty))
        tl.store(dst + HALF + offs, x2.to(vc_ptr.dtype.element_ty))


def qk_norm_rope_store(qkv: torch.Tensor, nq: int, nkv: int, q_weight: torch.Tensor | None,
                       k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                       positions: torch.Tensor, slot_mapping: torch.Tensor, k_cache: torch.Tensor,
                       v_cache: torch.Tensor) -> None:
    """qkv: [T, Hq + 2 Hkv, D] (contiguous rows). In place: q and k heads normed (if weights) and rotated;
    k and v heads stored at their cache slots. cos/sin: the rotary tables [P, D/2] (fp32)."""
    t, heads, d = qkv.shape
    has_norm = q_weight is not None
    _qk_norm_rope_store_kernel[(t, heads)](
        qkv, q_weight if has_norm else qkv, k_weight if has_norm else qkv, cos, sin, positions, slot_mapping,
        k_cache, v_cache, eps, qkv.stride(0), NQ=nq, NKV=nkv, HALF=d // 2, HAS_NORM=has_norm,
    )


@triton.jit
def _silu_mul_kernel(x_ptr, out_ptr, n_inter, BLOCK: tl.constexpr):
    t = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_inter
    dt = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + t * 2 * n_inter + offs, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + t * 2 * n_inter + n_inter + offs, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dt).to(tl.float32)
    tl.store(out_ptr + t * n_inter + offs, (act * up).to(dt), mask=mask)


def silu_mul(x: torch.Tensor) -> torch.Tensor:
    """x: [T, 2I] (gate | up) -> silu(gate) * up: [T, I]."""
    t, two_i = x.shape
    inter = two_i // 2
    out = torch.empty((t, inter), dtype=x.dtype, device=x.device)
    block = 1024
    _silu_mul_kernel[(t, triton.cdiv(inter, block))](x, out, inter, BLOCK=block)
    return out
