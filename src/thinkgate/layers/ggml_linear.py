"""Linears and the embedding served from a GGUF file's own quantized blocks (`--weight-quant gguf`).

The file's weights are already quantized (Q5_0, Q8_0, Q4_K, Q6_K ... in a Q4_K_M file); re-quantizing them
into our int4 / int8 forms would change the model a second time. These modules keep each weight's rows as the
file stores them and multiply with llama.cpp's arithmetic (csrc/ggml_linear.cpp: activations quantized into
its 8-bit blocks, or by default our 16-bit ones; integer sums per block), so a GGUF served here is the model
llama.cpp serves from it. Prefill chunks take a 16-bit integer GEMM over the same codes (csrc/ggml_gemm16.cpp).
The embedding dequantizes the rows it looks up, as llama.cpp's get_rows does.
"""

from __future__ import annotations

import itertools
import threading
from contextlib import contextmanager

import torch
from torch import nn

from thinkgate.layers import cpu_kernels

# ggml type ids the kernels multiply as stored (GGMLQuantizationType values).
SUPPORTED_TYPES = {"Q4_0": 2, "Q4_1": 3, "Q5_0": 6, "Q5_1": 7, "Q8_0": 8, "Q4_K": 12, "Q5_K": 13, "Q6_K": 14}

# From this many rows in one call (a prefill chunk) a GEMM takes over from the block kernels: the default's 16-bit
# GEMM (forward_int16, csrc/ggml_gemm16.cpp), or with 8-bit activation blocks (`gguf-q8`) or without AVX2 the
# weight dequantized whole and multiplied by a float GEMM (forward_exact). Unpacking the weight costs about as
# much as the block kernels' work on a few dozen rows, and from there the GEMMs are faster (BENCHMARKS.md, "CPU,
# third round"). Decode and verify steps, whose rows must match one-token decode steps bit for bit, run in the C++
# decoder and never reach here with this many rows.
GEMM_MIN_ROWS = 64
# Per-thread kept buffers, reused call after call (a model's linears run one at a time): `scratch`, the dequantized
# weight (or panel) of the last float GEMM, as large as the largest one, at most EXACT_PANEL_BYTES (17 MB for the
# default model's down); `activation`, the MLP's SwiGLU output (swiglu(reuse=True)). One per thread: a server with
# several local models runs each engine in a thread of its own.
_local = threading.local()
# A gate/up projection with many rows runs in panels of about this many gate columns (and as many up columns):
# each panel's dequantized weight (3.6 MB) and product stay in the L3 cache and its SiLU(gate) * up is written
# at once, where the whole [T, 2I] product (80 MB at 2,048 rows) and the 35 MB weight went through DRAM: 2,048
# rows of the default model's gate/up and SwiGLU 410 -> 307 ms (BENCHMARKS.md, "CPU, fifth round").
SWIGLU_PANEL = 512
# forward_exact dequantizes at most this much fp32 weight at a time, in panels of output rows: the kept buffer
# would otherwise grow to the largest weight ever multiplied this way, 545 MB for the default model's output
# head (a step with 64+ rows of logits: prompt logprobs of a long prompt, or 64+ sequences decoding at once).
EXACT_PANEL_BYTES = 32 << 20
_ONEDNN = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")


@contextmanager
def rows_like(rows: int):
    """Inside, a call with fewer rows chooses its path (block kernels or a GEMM) as a call of `rows` rows would:
    the kept rows of a prefill chunk's last layer (models/qwen.py) are then computed by the same arithmetic as
    when the whole chunk ran through it (the GEMM's, whose rows are independent of each other, not the block
    kernels', whose K-quant activation blocks are 256 wide)."""
    before = getattr(_local, "rows_like", 0)
    _local.rows_like = rows
    try:
        yield
    finally:
        _local.rows_like = before


def _gemm_rows(rows: int) -> bool:
    return max(rows, getattr(_local, "rows_like", 0)) >= GEMM_MIN_ROWS


def available() -> bool:
    return cpu_kernels.load_ggml() is not None


class GGMLLinear(nn.Module):
    """y = x @ W^T (+ bias) with W the concatenation of `parts`: (ggml type id, [rows, row bytes] uint8 blocks).
    A fused projection (q/k/v, gate/up) whose pieces the file stores in different types keeps each piece's
    type."""

    def __init__(self, parts: list[tuple[int, torch.Tensor]], in_features: int, bias: torch.Tensor | None = None,
                 act_bits: int = 16):
        super().__init__()
        self._ops = cpu_kernels.load_ggml()
        # Each part in the layout its kernel reads fastest, the same codes and scales (AVX2; csrc/ggml_blocks.h): with
        # 16-bit activations Q5_0 and Q8_0 as R4L (each int32 lane one block's products, scaled once per 4 blocks),
        # with 8-bit ones Q5_0 as R4 (bit-identical to the file layout's kernel). The file's layout is not kept.
        parts = [self._ops.ggml_repack(b.contiguous(), int(t), act_bits == 16) for t, b in parts]
        self.types = [int(t) for t, _ in parts]
        self.blocks = []
        for i, (_, b) in enumerate(parts):
            self.register_buffer(f"blocks_{i}", b.contiguous())
            self.blocks.append(getattr(self, f"blocks_{i}"))
        self.in_features = in_features
        self.out_features = sum(b.shape[0] for _, b in parts)
        self.bias32 = None if bias is None else bias.detach().float().contiguous()
        # 8: llama.cpp's arithmetic (its 8-bit activation blocks, `gguf-q8`); 16: the input rows in 16-bit blocks,
        # one integer pass with ~15 bits (as close to the exact model as fp32 activations, BENCHMARKS.md): the default.
        self.act_bits = act_bits
        # Prefill's linears in 16-bit integers (ggml_gemm16): the rows in the 16-bit blocks the decode kernels
        # use, ~1.5x the float GEMM's multiply-adds per cycle on AVX2 (BENCHMARKS.md, "CPU, seventh round").
        self.int16_gemm = act_bits == 16 and in_features % 32 == 0 and self._ops.ggml_gemm16_fast()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, self.in_features).float().contiguous()
        if _gemm_rows(flat.shape[0]):
            y = self.forward_int16(flat) if self.int16_gemm else self.forward_exact(flat)
        else:
            y = self._ops.ggml_linear(flat, self.types, self.blocks, self.bias32, False, self.act_bits)
        return y.view(*x.shape[:-1], self.out_features).to(x.dtype)

    def swiglu(self, x: torch.Tensor, reuse: bool = False) -> torch.Tensor | None:
        """SiLU(x @ gate^T) * (x @ up^T), [..., I], for a gate/up projection (two parts of I rows each), or None
        for any other linear. Many rows: in panels of gate/up columns (SWIGLU_PANEL), each multiplied by the 16-bit
        GEMM (or dequantized and multiplied by the float GEMM) and activated in place; few rows: the block kernels,
        then the same activation.

        reuse: the result is written into this thread's kept activation buffer, which the next such call
        overwrites (the MLP hands it straight to down_proj). A fresh one is fresh pages: 40 MB at 2,048 rows,
        ~9,700 page faults of ~3 us each on this VM, 0.7 s of a 2,048-token prefill's 16 s."""
        if len(self.blocks) != 2 or self.blocks[0].shape[0] != self.blocks[1].shape[0] or self.bias32 is not None:
            return None
        flat = x.reshape(-1, self.in_features).float().contiguous()
        inter, rows = self.blocks[0].shape[0], flat.shape[0]
        if reuse:
            kept = getattr(_local, "activation", None)
            if kept is None or kept.numel() < rows * inter:
                kept = _local.activation = torch.empty(rows * inter)
            out = kept[:rows * inter].view(rows, inter)
        else:
            out = torch.empty(rows, inter)
        if not _gemm_rows(rows):
            self._ops.ggml_silu_mul(self._ops.ggml_linear(flat, self.types, self.blocks, None, False, self.act_bits),
                                    out)
        else:
            panels = -(-inter // SWIGLU_PANEL)
            width = (-(-inter // panels) + 15) // 16 * 16  # about equal panels, a multiple of 16 columns
            gate, up = self.blocks
            quantized = self._ops.ggml_quantize16(flat) if self.int16_gemm else None  # once, for every panel
            for j in range(0, inter, width):
                panel = [gate[j:j + width], up[j:j + width]]
                if quantized is not None:
                    y = self._ops.ggml_gemm16(*quantized, self.types, panel)
                else:
                    y = _gemm(flat, self._dequantize(panel), None)
                self._ops.ggml_silu_mul(y, out[:, j:j + width])
        return out.view(*x.shape[:-1], inter).to(x.dtype)

    def forward_int16(self, flat: torch.Tensor) -> torch.Tensor:
        """fp32 rows, quantized into 16-bit codes per 32 values (the decode kernels' activation blocks), times the
        file's weights as stored, summed in integers per block (csrc/ggml_gemm16.cpp). The weight is packed a
        panel of 16 rows at a time inside the kernel, so no dequantized copy of it is kept."""
        return self._ops.ggml_gemm16(*self._ops.ggml_quantize16(flat), self.types, self.blocks, self.bias32)

    def _dequantize(self, blocks: list[torch.Tensor]) -> torch.Tensor:
        """These rows of the parts (all of them, or a panel) in fp32, in the thread's kept buffer."""
        need = sum(b.shape[0] for b in blocks) * self.in_features
        scratch = getattr(_local, "scratch", None)
        if scratch is None or scratch.numel() < need:
            scratch = _local.scratch = torch.empty(need)
        return self._ops.ggml_dequantize(self.types, blocks, False, scratch)

    def forward_exact(self, flat: torch.Tensor) -> torch.Tensor:
        """fp32 rows times the file's weights dequantized (the values the block kernels multiply, exactly): a
        float GEMM. For many rows at once (prefill) it is faster than the block kernels, which spend most of
        their time unpacking blocks, and it is the exact model's product: no 8-bit rounding of the rows.
        The weight is dequantized into one buffer kept between calls (a fresh one is fresh pages, whose first
        touch costs as much as the dequantization) and multiplied by oneDNN's GEMM where torch has it: 8-16%
        faster than MKL's on this AVX2 machine at 512-2048 rows (BENCHMARKS.md, "CPU, third round"). A weight
        over EXACT_PANEL_BYTES in fp32 (the output head) goes a panel of output rows at a time."""
        per = max(16, EXACT_PANEL_BYTES // (4 * self.in_features))
        if self.out_features <= per:
            return _gemm(flat, self._dequantize(self.blocks), self.bias32)
        out = torch.empty(flat.shape[0], self.out_features)
        firsts = list(itertools.accumulate([b.shape[0] for b in self.blocks], initial=0))[:-1]
        for j in range(0, self.out_features, per):
            end = min(j + per, self.out_features)
            # Rows j..end of the stacked parts: each part's share (empty where the panel misses it).
            panel = [b[min(max(j - f, 0), len(b)):min(max(end - f, 0), len(b))]
                     for b, f in zip(self.blocks, firsts, strict=True)]
            bias = None if self.bias32 is None else self.bias32[j:end]
            out[:, j:end] = _gemm(flat, self._dequantize(panel), bias)
        return out


def _gemm(flat: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """flat @ w^T (+ bias) in fp32: oneDNN's GEMM where torch has it, else torch's (MKL's)."""
    if _ONEDNN:
        return torch.ops.mkldnn._linear_pointwise(flat, w, bias, "none", [], "")
    return flat @ w.t() if bias is None else torch.addmm(bias, flat, w.t())


class GGMLEmbedding(nn.Module):
    """The token embedding in the file's blocks: each looked-up row dequantized (fp32, then the model's dtype)."""

    def __init__(self, qtype: int, blocks: torch.Tensor, embedding_dim: int, out_dtype: torch.dtype):
        super().__init__()
        self._ops = cpu_kernels.load_ggml()
        self.qtype = int(qtype)
        self.register_buffer("blocks", blocks.contiguous())
        self.num_embeddings, self.embedding_dim = blocks.shape[0], embedding_dim
        self.out_dtype = out_dtype

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        rows = self._ops.ggml_dequantize_rows(self.blocks, self.qtype, ids.reshape(-1))
        return rows.view(*ids.shape, self.embedding_dim).to(self.out_dtype)
