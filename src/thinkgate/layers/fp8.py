"""fp8 (e4m3) weights for GPU serving: `--quantization fp8`.

Decode is bound by reading weights, so storing them in one byte instead of bf16's two halves the floor of
a step. Weights get one fp32 scale per output channel (absmax / 448), computed once at load; activations
are quantized per token at run time (one scale per row), and the matmul is cuBLASLt's fp8 GEMM
(`torch._scaled_mm`) with both scales applied in its epilogue. Experts use the grouped form
(`torch._scaled_grouped_mm`, Hopper) over expert groups padded to 16 rows, the alignment its kernel asks
of fp8 operands; decode steps instead run layers/triton_moe's fused kernels, which upcast the fp8 weights
in registers and keep the activations in bf16. Where the device has no fp8 kernel (probed once at load),
the same numbers are computed by upcasting: correct but slower, and the log says so. The output head and
the router stay in bf16 (as in vLLM's fp8 mode): a small share of the bytes, and the head decides the
sampled tokens.
"""

from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

log = logging.getLogger(__name__)

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0
GROUP_ALIGN = 16  # rows per expert group a scaled grouped GEMM is given (padded with zero rows)


def quantize_weight(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """[..., N, K] -> fp8 codes [..., N, K] and fp32 scales [..., N] (per output channel, absmax / 448)."""
    scale = w.detach().abs().amax(-1).float().clamp(min=1e-12) / FP8_MAX
    q = (w.detach().float() / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(FP8)
    return q, scale


def quantize_rows(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Activations [T, K] -> fp8 [T, K] and fp32 scales [T, 1], one per token (dynamic)."""
    if x.is_cuda:
        from thinkgate.layers.triton_fp8 import quantize_rows_triton

        return quantize_rows_triton(x)
    scale = x.abs().amax(-1, keepdim=True).float().clamp(min=1e-12) / FP8_MAX
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(FP8), scale


def _probe(fn) -> bool:
    try:
        fn()
        return True
    except (RuntimeError, NotImplementedError) as e:
        log.warning("fp8 kernel unavailable here (%s); computing by upcasting instead", str(e).splitlines()[0][:200])
        return False


class Fp8Linear(nn.Module):
    """y = x W^T (+ b) with W in fp8 and a scale per output channel; x quantized per token."""

    def __init__(self, linear: nn.Linear, native: bool):
        super().__init__()
        q, scale = quantize_weight(linear.weight)
        self.register_buffer("qweight", q)  # [N, K]
        self.register_buffer("scale", scale[None, :])  # [1, N]
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().clone(), requires_grad=False)
        self.out_dtype = linear.weight.dtype
        self.native = native

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, shape[-1])
        xq, xs = quantize_rows(x2)
        if self.native:
            y = torch._scaled_mm(xq, self.qweight.t(), scale_a=xs, scale_b=self.scale, out_dtype=self.out_dtype)
        else:
            y = ((xq.float() @ self.qweight.float().t()) * xs * self.scale).to(self.out_dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*shape[:-1], y.shape[-1])


class Fp8Experts:
    """A SparseMoE layer's stacked experts in fp8: w13 [E, 2I, H] and w2 [E, H, I] with per-channel scales."""

    def __init__(self, w13: torch.Tensor, w2: torch.Tensor, native: bool):
        self.w13, self.s13 = quantize_weight(w13)  # scales [E, 2I]
        self.w2, self.s2 = quantize_weight(w2)  # scales [E, H]
        self.native = native

    def _gemm(self, a, a_scale, w, w_scale, offs, out_dtype):
        if self.native:
            return torch._scaled_grouped_mm(a, w.transpose(1, 2), a_scale, w_scale, offs=offs, out_dtype=out_dtype)
        # Upcast path: each row times its group's expert, scales applied as the fp8 kernel would.
        group = torch.searchsorted(offs, torch.arange(a.shape[0], device=a.device), right=True).clamp(
            max=w.shape[0] - 1)
        y = torch.bmm(a.float()[:, None, :], w.float()[group].transpose(1, 2))[:, 0]
        return (y * a_scale[:, None] * w_scale[group]).to(out_dtype)

    def __call__(self, x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
        """x: [T, H]; weights/experts: [T, K] -> [T, H]."""
        from thinkgate.layers.moe import use_fused

        if use_fused(x):  # decode: the fused kernels upcast the fp8 rows in registers (bf16 activations)
            from thinkgate.layers.triton_moe import fused_moe

            return fused_moe(x, weights, experts, self.w13, self.w2, self.s13, self.s2)
        t, k = experts.shape
        n_exp = self.w13.shape[0]
        flat = experts.reshape(-1)
        order = torch.argsort(flat, stable=not x.is_cuda)
        token_of = order // k
        counts = torch.zeros(n_exp, dtype=torch.int32, device=x.device).scatter_add_(
            0, flat, torch.ones_like(flat, dtype=torch.int32))
        padded = (counts + GROUP_ALIGN - 1) // GROUP_ALIGN * GROUP_ALIGN
        starts = torch.cumsum(counts, 0, dtype=torch.int32) - counts
        pends = torch.cumsum(padded, 0, dtype=torch.int32)
        e_sorted = flat[order]
        # Row of each sorted (token, expert) pair in the padded layout; the buffer's size is a bound that
        # depends only on the shapes (a CUDA graph replays it), its tail belonging to the last group.
        n = t * k
        rows = n + n_exp * (GROUP_ALIGN - 1)
        prow = torch.arange(n, device=x.device) - starts[e_sorted] + (pends - padded)[e_sorted]
        offs = torch.cat([pends[:-1], torch.full((1,), rows, dtype=torch.int32, device=x.device)])
        xq, xs = quantize_rows(x)
        a = torch.zeros(rows, x.shape[1], dtype=torch.uint8, device=x.device)
        a[prow] = xq.view(torch.uint8)[token_of]
        a_scale = torch.ones(rows, dtype=torch.float32, device=x.device)
        a_scale[prow] = xs[token_of, 0]
        gate, up = self._gemm(a.view(FP8), a_scale, self.w13, self.s13, offs, x.dtype).chunk(2, dim=-1)
        hq, hs = quantize_rows(F.silu(gate) * up)
        out = self._gemm(hq, hs[:, 0].contiguous(), self.w2, self.s2, offs, x.dtype)  # [rows, H]
        out_sorted = out[prow] * weights.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of, out_sorted)


def native_fp8(device: torch.device) -> tuple[bool, bool]:
    """Whether this device runs fp8 GEMMs (dense, grouped) natively: probed with small real calls."""
    a = torch.randn(16, 32, device=device).to(FP8)
    w = torch.randn(2, 32, 32, device=device).to(FP8)
    ones = torch.ones(16, 1, device=device)
    dense = _probe(lambda: torch._scaled_mm(a, w[0].t(), scale_a=ones, scale_b=torch.ones(1, 32, device=device),
                                            out_dtype=torch.bfloat16))
    offs = torch.tensor([16, 16], dtype=torch.int32, device=device)
    grouped = hasattr(torch, "_scaled_grouped_mm") and _probe(lambda: torch._scaled_grouped_mm(
        a, w.transpose(1, 2), ones[:, 0], torch.ones(2, 32, device=device), offs=offs, out_dtype=torch.bfloat16))
    return dense, grouped


def quantize_model_fp8(model: nn.Module, native: tuple[bool, bool] | None = None) -> int:
    """Swap every decoder linear (attention and MLP projections) for Fp8Linear and every expert stack for
    Fp8Experts, freeing the bf16 copies. The output head, embeddings and routers stay. Returns the count."""
    from thinkgate.models.qwen import Attention, DenseMLP, SparseMoE

    dev = next(model.parameters()).device
    dense_ok, grouped_ok = native if native is not None else native_fp8(dev)
    n = 0
    for module in list(model.modules()):
        if isinstance(module, Attention):
            names = ("qkv_proj", "o_proj")
        elif isinstance(module, DenseMLP):
            names = ("gate_up_proj", "down_proj")
        elif isinstance(module, SparseMoE):
            module.fp8 = Fp8Experts(module.w13.data, module.w2.data, grouped_ok)
            module.w13 = nn.Parameter(torch.empty(0, device=dev), requires_grad=False)  # free the bf16 stacks
            module.w2 = nn.Parameter(torch.empty(0, device=dev), requires_grad=False)
            n += 2
            continue
        else:
            continue
        for name in names:
            setattr(module, name, Fp8Linear(getattr(module, name), dense_ok))
            n += 1
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    log.info("fp8 weights on %d linear layers (native dense %s, grouped %s)", n, dense_ok, grouped_ok)
    return n
