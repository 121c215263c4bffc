"""Qwen3-MoE expert layer: softmax router over all experts (fp32) -> top-k -> optional renorm -> SwiGLU.

`grouped_moe` sorts the (token, expert) pairs by expert so each expert's rows are contiguous. Where torch
has a grouped matmul for the device and dtype (CPU; Hopper GPUs in bf16) one launch covers every expert,
with the group offsets on the device: no host sync, so a decode step with experts can be captured in a
CUDA graph. Elsewhere it falls back to one matmul per *active* expert. Either way the work is proportional
to the routed tokens. `reference_moe` computes every expert densely and is kept for tests.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

# Decode steps on a GPU in bf16 (or fp8 weights) run the fused Triton kernels (layers/triton_moe.py), which read
# each chosen expert once in two launches; from this many tokens on (prefill), the grouped GEMM.
FUSED_MAX_TOKENS = 64


def use_fused(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype == torch.bfloat16 and x.shape[0] <= FUSED_MAX_TOKENS


def route(router_logits: torch.Tensor, top_k: int, norm_topk: bool, dtype: torch.dtype):
    probs = torch.softmax(router_logits, dim=-1, dtype=torch.float32)  # [T, E]
    weights, experts = torch.topk(probs, top_k, dim=-1)  # [T, K]
    if norm_topk:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(dtype), experts


def grouped_mm_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether one grouped-matmul launch can run every expert (else a loop with a host sync per layer)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    if device.type == "cpu":
        return True
    # The CUDA kernel exists for Hopper (sm90) and later, bf16 only.
    return device.type == "cuda" and dtype == torch.bfloat16 and torch.cuda.get_device_capability(device) >= (9, 0)


def grouped_moe(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w13: torch.Tensor,
                w2: torch.Tensor) -> torch.Tensor:
    """x: [T, H]; weights/experts: [T, K]; w13: [E, 2I, H]; w2: [E, H, I]."""
    t, k = experts.shape
    flat_expert = experts.reshape(-1)  # [T*K]
    # Grouping needs only contiguity by expert, not a stable order; on CUDA an unstable sort of a few
    # hundred keys is a bitonic sort (~4 us) instead of a radix sort (~27 us), 48 times a step.
    order = torch.argsort(flat_expert, stable=not x.is_cuda)
    token_of = order // k  # token index of each sorted pair
    xs = x[token_of]  # [T*K, H]
    if grouped_mm_supported(x.device, x.dtype):
        counts = torch.zeros(w13.shape[0], dtype=torch.int32, device=x.device)
        counts.scatter_add_(0, flat_expert, torch.ones_like(flat_expert, dtype=torch.int32))
        offs = torch.cumsum(counts, 0, dtype=torch.int32)  # end row of each expert's group
        gate, up = torch._grouped_mm(xs, w13.transpose(1, 2), offs=offs).chunk(2, dim=-1)
        out_sorted = torch._grouped_mm(F.silu(gate) * up, w2.transpose(1, 2), offs=offs)
        out_sorted = out_sorted * weights.reshape(-1)[order].unsqueeze(-1)
        return torch.zeros_like(x).index_add_(0, token_of, out_sorted)
    counts = torch.bincount(flat_expert, minlength=w13.shape[0]).tolist()
    out_sorted = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        h = xs[start:start + n] @ w13[e].t()  # [n, 2I]
        gate, up = h.chunk(2, dim=-1)
        out_sorted[start:start + n] = (F.silu(gate) * up) @ w2[e].t()
        start += n
    out_sorted = out_sorted * weights.reshape(-1)[order].unsqueeze(-1)
    out = torch.zeros_like(x)
    out.index_add_(0, token_of, out_sorted)
    return out


def reference_moe(x: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor, w13: torch.Tensor,
                  w2: torch.Tensor) -> torch.Tensor:
    """Dense: every expert on every token, combined with the (mostly zero) routing weights."""
    n_exp = w13.shape[0]
    dense_w = torch.zeros(x.shape[0], n_exp, dtype=x.dtype, device=x.device)
    dense_w.scatter_(1, experts, weights)
    h = torch.einsum("th,eih->tei", x, w13)
    gate, up = h.chunk(2, dim=-1)
    y = torch.einsum("tei,ehi->teh", F.silu(gate) * up, w2)
    return torch.einsum("teh,te->th", y, dense_w)
