"""NeoX-style (rotate-half) rotary embedding with a precomputed cos/sin table."""

from __future__ import annotations

import math

import torch
from torch import nn


def _yarn_inv_freq(base: float, dim: int, scaling: dict) -> tuple[torch.Tensor, float]:
    factor = scaling["factor"]
    orig = scaling.get("original_max_position_embeddings", 32768)
    beta_fast, beta_slow = scaling.get("beta_fast", 32), scaling.get("beta_slow", 1)

    def correction_dim(rot: float) -> float:
        return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    pos_freqs = base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim)
    inv_extra, inv_inter = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / max(high - low, 1e-3)).clamp(0, 1)
    extra_factor = 1 - ramp
    inv = inv_inter * (1 - extra_factor) + inv_extra * extra_factor
    mscale = scaling.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)
    return inv, mscale


class RotaryEmbedding(nn.Module):
    def __init__(self, head_dim: int, max_positions: int, base: float, scaling: dict | None = None):
        super().__init__()
        # Computed on the CPU, then moved to the device being built on: under torch.device("meta") the same
        # ops would run torch's Python decompositions, whose first use imports torch._dynamo and sympy.
        target = torch.get_default_device()
        with torch.device("cpu"):
            inv_freq, mscale = self._inv_freq(head_dim, base, scaling)
            freqs = torch.outer(torch.arange(max_positions, dtype=torch.float32), inv_freq)  # [P, D/2]
        self.register_buffer("cos", (freqs.cos() * mscale).to(target), persistent=False)
        self.register_buffer("sin", (freqs.sin() * mscale).to(target), persistent=False)

    @staticmethod
    def _inv_freq(head_dim: int, base: float, scaling: dict | None) -> tuple[torch.Tensor, float]:
        rope_type = (scaling or {}).get("rope_type") or (scaling or {}).get("type") or "default"
        mscale = 1.0
        if rope_type == "yarn":
            inv_freq, mscale = _yarn_inv_freq(base, head_dim, scaling)
        elif rope_type in ("default", None):
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
        elif rope_type == "linear":
            inv_freq = 1.0 / (base ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim))
            inv_freq = inv_freq / scaling["factor"]
        else:
            raise ValueError(f"unsupported rope_scaling type {rope_type!r}")
        return inv_freq, mscale

    def table(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """cos/sin for this step's positions, looked up once and shared by every layer: [T, 1, D/2]."""
        # The table is fp32 (as transformers computes it) and cast to the activation dtype for the multiply.
        cos, sin = torch.index_select(self.cos, 0, positions), torch.index_select(self.sin, 0, positions)
        return cos.unsqueeze(1).to(dtype), sin.unsqueeze(1).to(dtype)

    def forward(self, positions: torch.Tensor, q: torch.Tensor, k: torch.Tensor):
        cos, sin = self.table(positions, q.dtype)
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [T, H, D] with D = 2 halves paired NeoX-style (element i with i + D/2)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)
