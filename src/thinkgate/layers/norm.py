import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    """Qwen's RMSNorm: normalise in fp32, cast back, then scale by the weight (no 1+w offset)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.rms_norm is one fused kernel for x * rsqrt(mean(x^2) + eps); the weight multiplies after the cast.
        return self.weight * F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps).to(x.dtype)
