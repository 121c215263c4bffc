"""Quantized linear layers for CPU decode.

At batch 1 a decode step is bound by reading the weights, so keeping them compact is what makes a CPU
fast. int4 (a quarter of bf16's bytes) runs on our VNNI kernel (`Q4Linear`, csrc/q4_linear.cpp: int8
activations, integer dot products, near memory speed) where the CPU has AVX-512 VNNI, else on torch's
`_weight_int4pack_mm_for_cpu` (`Int4Linear`), which dequantizes every weight and is bound by that
arithmetic. For several rows fbgemm's W8A8 kernel (`DynInt8Linear`) is the one whose cost stays flat, so
batched decode uses it (`MixedLinear`, the default where our VNNI kernels run; W8A8 alone elsewhere on x86).
A dense bf16 copy for prefill can be kept alongside (`keep_dense`), but the loader does not: it keeps only the
forms the kernels serve from, drops the float weight, and prefill runs on W8A8 (issue 23: memory).
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from thinkgate.layers.cpu_kernels import cpu_supports_vnni


class QuantizedLinear(nn.Module):
    """What every mode shares: the bf16 bias, and the dense bf16 weight (when kept) for calls of more than
    `dense_above` rows (prefill), where plain GEMM beats the quantized kernels. Subclasses implement
    `quantized(x)` for the rest."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, keep_dense: bool, dense_above: int = 16):
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        self.dense = weight.detach().to(torch.bfloat16) if keep_dense else None
        self.dense_above = dense_above

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, K]
        if self.dense is not None and x.shape[0] > self.dense_above:
            return F.linear(x.to(torch.bfloat16), self.dense, self.bias).to(x.dtype)
        return self.quantized(x)

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Int8Linear(QuantizedLinear):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, keep_dense: bool, dense_above: int = 16):
        super().__init__(weight, bias, keep_dense, dense_above)
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)  # [N] symmetric per output channel
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(torch.bfloat16))

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


def int4_groups(weight: torch.Tensor, group_size: int = 32) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric 4-bit codes per group of `group_size` along K: w ~ q * scale + lo, q in 0..15.
    Returns q [N, K] (uint8), scale [N, G] and lo [N, G] (fp32)."""
    n, k = weight.shape
    if k % group_size:
        raise ValueError(f"int4 needs K ({k}) divisible by the group size {group_size}")
    w = weight.detach().float().view(n, k // group_size, group_size)
    lo, hi = w.amin(-1), w.amax(-1)
    scale = ((hi - lo) / 15.0).clamp(min=1e-10)
    q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15)
    return q.view(n, k).to(torch.uint8), scale, lo


class Q4Linear(QuantizedLinear):
    """int4 weights (groups of 32, fp16 scale and min) times int8 activations, on our AVX-512 VNNI kernel
    (csrc/q4_linear.cpp). At one row it runs at memory speed where torch's int4 kernel is bound by its
    dequantizing arithmetic (2.6x faster on a cache-resident matrix here; see BENCHMARKS.md)."""

    @staticmethod
    def supports(weight: torch.Tensor) -> bool:
        from thinkgate.layers import cpu_kernels

        return weight.shape[1] % 128 == 0 and weight.device.type == "cpu" and cpu_kernels.load() is not None

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, keep_dense: bool, dense_above: int = 16):
        from thinkgate.layers import cpu_kernels

        super().__init__(weight, bias, keep_dense, dense_above)
        self._ops = cpu_kernels.load()
        packed, scales, mins = pack_q4(weight)
        self.register_buffer("packed", packed)
        self.register_buffer("scales", scales)
        self.register_buffer("mins", mins)
        self._bias32 = None if bias is None else bias.detach().float()

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.bfloat16):
            return self._ops.q4_linear(x.float().contiguous(), self.packed, self.scales, self.mins,
                                       self._bias32).to(x.dtype)
        return self._ops.q4_linear(x.contiguous(), self.packed, self.scales, self.mins, self._bias32)


def pack_q4(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The layout q4_linear reads: in each span of 128 weights along K, byte j holds weight j (low nibble)
    and weight 64 + j (high nibble). Returns packed [N, K/2] uint8, scales and mins [N, K/32] fp16."""
    n, k = weight.shape
    if k % 128:
        raise ValueError(f"q4 packing needs K ({k}) divisible by 128")
    q, scale, lo = int4_groups(weight, 32)
    halves = q.view(n, k // 128, 2, 64)
    packed = (halves[:, :, 0] | (halves[:, :, 1] << 4)).reshape(n, k // 2).contiguous()
    return packed, scale.to(torch.float16).contiguous(), lo.to(torch.float16).contiguous()


class Int4Linear(QuantizedLinear):
    """int4 with asymmetric groups along K: w = (q - 8) * scale + zero, q in 0..15."""

    @staticmethod
    def supports(weight: torch.Tensor, group_size: int = 32) -> bool:
        n, k = weight.shape
        return n % 16 == 0 and k % group_size == 0  # the CPU packing kernel's layout constraints

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, keep_dense: bool, group_size: int = 32,
                 dense_above: int = 16):
        super().__init__(weight, bias, keep_dense, dense_above)
        n, k = weight.shape
        q, scale, lo = int4_groups(weight, group_size)
        zero = lo + 8 * scale  # so that (q - 8) * scale + zero == q * scale + lo
        self.group_size = group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 1))
        self.register_buffer("scale_zero", torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous())

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), self.packed,
                                                        self.group_size, self.scale_zero)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


_REDUCE_RANGE = not cpu_supports_vnni()


class DynInt8Linear(QuantizedLinear):
    """int8 weights and int8 activations (W8A8): fbgemm's dynamic quantized linear.

    The activations are quantized per call (one scale for the call's rows) and the product runs on the
    CPU's int8 dot-product instructions (AVX512-VNNI here), so the cost barely grows with the number of
    rows: on this 2-core machine the model's linears take ~4 ms at 1 row and ~9 ms at 8 rows, against 11
    and 35 ms for the int4 weight-only kernel, which dequantizes on the fly. x86 only (fbgemm).
    """

    @staticmethod
    def available() -> bool:
        return "fbgemm" in torch.backends.quantized.supported_engines

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, keep_dense: bool, dense_above: int = 16):
        super().__init__(weight, bias, keep_dense, dense_above)
        w = weight.detach().float()
        n = w.shape[0]
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10).double()
        with warnings.catch_warnings():  # quantized tensors are deprecated as a user API; fbgemm's ops still take them
            warnings.simplefilter("ignore", UserWarning)
            qw = torch.quantize_per_channel(w, scale, torch.zeros(n, dtype=torch.long), 0, torch.qint8)
        b = None if bias is None else bias.detach().float()
        self._packed = torch.ops.quantized.linear_prepack(qw, b)
        # Held inside the opaque packed object: the int8 matrix, then per output channel a scale, a zero
        # point, a column offset and the fp32 bias (models/resident.py counts it).
        self.packed_bytes = n * self.in_features + n * (12 + (0 if b is None else 4))

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        # VNNI's int8 dot products do not saturate, so all 8 bits of the activations are usable. Without VNNI
        # fbgemm multiplies with AVX2's vpmaddubsw, whose 16-bit sums saturate: 7-bit activations
        # (reduce_range) keep them in range (measured on an AVX2 EPYC: 8.5 % relative error at 8 bits,
        # 1.3 % at 7).
        return torch.ops.quantized.linear_dynamic(x.float().contiguous(), self._packed, _REDUCE_RANGE).to(x.dtype)


class MixedLinear(QuantizedLinear):
    """int4 weight-only for one-row steps (a lone sequence decoding: the int4 kernel is fastest there),
    W8A8 for 2-16 rows (batched decode: its cost hardly grows with rows, and it is the more accurate of
    the two), bf16 above that (prefill)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, keep_dense: bool, dense_above: int = 16,
                 cpu_kernels: bool = True):
        super().__init__(weight, bias, keep_dense, dense_above)
        self.single = make_int4(weight, bias, keep_dense=False, cpu_kernels=cpu_kernels)
        self.batched = DynInt8Linear(weight, bias, keep_dense=False)

    def quantized(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[0] == 1 and self.single is not None:
            return self.single(x)
        return self.batched(x)


def make_int4(weight: torch.Tensor, bias: torch.Tensor | None, keep_dense: bool,
              cpu_kernels: bool = True) -> QuantizedLinear | None:
    """int4 on our VNNI kernel where it runs (and `cpu_kernels`), else on torch's; None for shapes
    neither can pack."""
    if cpu_kernels and Q4Linear.supports(weight):
        return Q4Linear(weight, bias, keep_dense)
    if Int4Linear.supports(weight):
        return Int4Linear(weight, bias, keep_dense)
    return None


def quantize_linears(model: nn.Module, mode: str, keep_dense: bool = True, head_mode: str | None = None,
                     cpu_kernels: bool = True) -> int:
    """Swap the model's nn.Linear layers (and the output head) for weight-only quantized ones.

    mode: 'int8' or 'int4'; head_mode: int8, int4 or none for the output projection (default: `mode`).
    Returns the number of layers swapped."""
    make = {"int8": Int8Linear, "int4": make_int4, "w8a8": DynInt8Linear, "mixed": MixedLinear}
    if mode not in make:
        raise ValueError(f"unknown weight quantization {mode!r}; choose int8, int4, w8a8 or mixed")
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and not (name.endswith("mlp") and child_name == "gate"):
                is_head = f"{name}.{child_name}".strip(".") == "lm_head"
                if is_head and head_mode == "none":
                    continue
                cls = make[head_mode or mode] if is_head else make[mode]
                kwargs = {"cpu_kernels": cpu_kernels} if cls in (make_int4, MixedLinear) else {}
                layer = cls(child.weight, child.bias, keep_dense=keep_dense and not is_head, **kwargs)
                if layer is None:
                    continue  # int4 on odd shapes (tiny test models): stays dense
                setattr(module, child_name, layer)
                count += 1
    return count
