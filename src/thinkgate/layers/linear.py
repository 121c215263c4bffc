"""Weight-only quantized linear layers for CPU decode.

At batch 1 a decode step is bound by reading the weights, so keeping them compact is what makes a CPU
fast: torch's `_weight_int8pack_mm` (int8 per output channel, bf16 activations) reads half the bytes of
bf16, and `_weight_int4pack_mm_for_cpu` (int4, asymmetric groups) a quarter. For larger token counts
(prefill) plain bf16 GEMM is faster, so the dense weight can be kept alongside for those.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Int8Linear(nn.Module):
    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, keep_dense: bool, dense_above: int = 16):
        super().__init__()
        w = weight.detach().float()
        scale = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)  # [N] symmetric per output channel
        self.register_buffer("qweight", torch.round(w / scale[:, None]).clamp(-127, 127).to(torch.int8))
        self.register_buffer("scales", scale.to(torch.bfloat16))
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        self.dense = weight.detach().to(torch.bfloat16) if keep_dense else None
        self.dense_above = dense_above

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # x: [T, K]
        if self.dense is not None and x.shape[0] > self.dense_above:
            return F.linear(x.to(torch.bfloat16), self.dense, self.bias).to(x.dtype)
        y = torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16).contiguous(), self.qweight, self.scales)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


class Int4Linear(nn.Module):
    """int4 with asymmetric groups along K: w = (q - 8) * scale + zero, q in 0..15."""

    @staticmethod
    def supports(weight: torch.Tensor, group_size: int = 32) -> bool:
        n, k = weight.shape
        return n % 16 == 0 and k % group_size == 0  # the CPU packing kernel's layout constraints

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, keep_dense: bool, group_size: int = 32,
                 dense_above: int = 16):
        super().__init__()
        n, k = weight.shape
        if k % group_size:
            raise ValueError(f"int4 needs K ({k}) divisible by the group size {group_size}")
        w = weight.detach().float().view(n, k // group_size, group_size)
        lo, hi = w.amin(-1), w.amax(-1)
        scale = ((hi - lo) / 15.0).clamp(min=1e-10)  # [N, G]
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp(0, 15)
        zero = lo + 8 * scale  # so that (q - 8) * scale + zero == q * scale + lo
        self.group_size = group_size
        self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(
            q.view(n, k).to(torch.int32), 1))
        self.register_buffer("scale_zero", torch.stack([scale.t(), zero.t()], dim=-1).to(torch.bfloat16).contiguous())
        self.bias = None if bias is None else nn.Parameter(bias.detach().to(torch.bfloat16), requires_grad=False)
        self.dense = weight.detach().to(torch.bfloat16) if keep_dense else None
        self.dense_above = dense_above

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dense is not None and x.shape[0] > self.dense_above:
            return F.linear(x.to(torch.bfloat16), self.dense, self.bias).to(x.dtype)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.to(torch.bfloat16).contiguous(), self.packed,
                                                        self.group_size, self.scale_zero)
        if self.bias is not None:
            y = y + self.bias
        return y.to(x.dtype)


def quantize_linears(model: nn.Module, mode: str, keep_dense: bool = True, head_mode: str | None = None) -> int:
    """Swap the model's nn.Linear layers (and the output head) for weight-only quantized ones.

    mode: 'int8' or 'int4'; head_mode: int8, int4 or none for the output projection (default: `mode`).
    Returns the number of layers swapped."""
    make = {"int8": Int8Linear, "int4": Int4Linear}
    if mode not in make:
        raise ValueError(f"unknown weight quantization {mode!r}; choose int8 or int4")
    count = 0
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, nn.Linear) and not (name.endswith("mlp") and child_name == "gate"):
                is_head = f"{name}.{child_name}".strip(".") == "lm_head"
                if is_head and head_mode == "none":
                    continue
                cls = make[head_mode or mode] if is_head else make[mode]
                if cls is Int4Linear and not Int4Linear.supports(child.weight):
                    continue  # odd shapes (tiny test models) stay dense
                setattr(module, child_name, cls(child.weight, child.bias, keep_dense=keep_dense and not is_head))
                count += 1
    return count
