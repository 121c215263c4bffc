"""Checks of a fused-ops module (the Triton kernels or the C++ CPU ones) against the PyTorch layer ops they
replace; each backend's tests call them with its module."""

import torch
import torch.nn.functional as F

from thinkgate.layers.attention import write_kv
from thinkgate.layers.norm import RMSNorm
from thinkgate.layers.rotary import RotaryEmbedding, apply_rotary


def tolerance(dtype: torch.dtype, bf16_atol: float) -> dict:
    # bf16: within a unit or two in the last place (a value may round the other way before the next multiply)
    return dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=bf16_atol, rtol=1.6e-2)


def check_rms_norm(fused, dtype: torch.dtype, h: int = 96) -> None:
    g = torch.Generator().manual_seed(h)
    norm = RMSNorm(h, 1e-6).to(dtype)
    norm.weight.data = torch.randn(h, generator=g).to(dtype)
    x, res = torch.randn(5, h, generator=g).to(dtype), torch.randn(5, h, generator=g).to(dtype)
    tol = tolerance(dtype, 7e-2)
    out, same = fused.rms_norm(x, norm.weight, norm.eps)
    assert same is x
    torch.testing.assert_close(out, norm(x), **tol)
    out, new_res = fused.rms_norm(x, norm.weight, norm.eps, res)
    torch.testing.assert_close(new_res, x + res, **tol)
    torch.testing.assert_close(out, norm(x + res), **tol)


def check_qk_norm_rope_store(fused, dtype: torch.dtype, qk_norm: bool, d: int = 32) -> None:
    g = torch.Generator().manual_seed(d)
    t, nq, nkv = 6, 4, 2
    rope = RotaryEmbedding(d, 64, 10000.0)
    qn, kn = RMSNorm(d).to(dtype), RMSNorm(d).to(dtype)
    qn.weight.data, kn.weight.data = torch.randn(d, generator=g).to(dtype), torch.randn(d, generator=g).to(dtype)
    qkv = torch.randn(t, nq + 2 * nkv, d, generator=g).to(dtype)
    pos = torch.tensor([0, 5, 9, 33, 34, 63])
    slots = torch.tensor([3, 17, 0, 8, 30, 12])
    # reference: the unfused layer ops
    qk, v = qkv[:, : nq + nkv], qkv[:, nq + nkv:]
    if qk_norm:
        qk = torch.cat([qn(qk[:, :nq]), kn(qk[:, nq:])], dim=1)
    qk = apply_rotary(qk, *rope.table(pos, dtype))
    kc_ref, vc_ref = torch.zeros(8, 4, nkv, d), torch.zeros(8, 4, nkv, d)
    write_kv(kc_ref, vc_ref, qk[:, nq:], v, slots)
    kc, vc = torch.zeros(8, 4, nkv, d), torch.zeros(8, 4, nkv, d)
    got = qkv.clone()
    fused.qk_norm_rope_store(got, nq, nkv, qn.weight if qk_norm else None, kn.weight if qk_norm else None, 1e-6,
                             rope.cos, rope.sin, pos, slots, kc, vc)
    tol = tolerance(dtype, 3e-2)
    torch.testing.assert_close(got[:, : nq + nkv], qk, **tol)
    assert torch.equal(got[:, nq + nkv:], v)
    torch.testing.assert_close(kc, kc_ref, **tol)
    assert torch.equal(vc, vc_ref)


def check_silu_mul(fused, dtype: torch.dtype) -> None:
    g = torch.Generator().manual_seed(3)
    x = (torch.randn(3, 2 * 1500, generator=g) * 4).to(dtype)  # a partial last block; large |gate| too
    x[0, 0], x[0, 1] = -100.0, 100.0
    gate, up = x.chunk(2, dim=-1)
    torch.testing.assert_close(fused.silu_mul(x), F.silu(gate) * up, **tolerance(dtype, 2e-2))
