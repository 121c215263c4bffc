"""The 16-bit prefill GEMM (csrc/ggml_gemm16.cpp) against an fp64 model of its arithmetic.

The weights are random blocks of each type read by the gguf package's own dequantizers (an independent reading of
the formats); the rows' 16-bit codes must be a numpy model's bit for bit; the product is computed in fp64 from
both and the kernel's must agree to fp32 accumulation error. The AVX2 and scalar forms must agree bit for bit.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from tests.layers.test_ggml_linear import FORMATS, random_blocks
from thinkgate.layers import cpu_kernels

ops = cpu_kernels.load_ggml()
pytestmark = pytest.mark.skipif(ops is None, reason="no C++ compiler to build the GGUF block kernels")


def quantize16_model(x: np.ndarray):
    """Per 32 values: d = amax / 32767, codes rint(x * (32767 / amax)) (half to even), sum d * sum(codes)."""
    b = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    amax = np.abs(b).max(-1)
    inv = np.where(amax != 0, np.float32(32767) / np.where(amax == 0, 1, amax), 0).astype(np.float32)
    q = np.clip(np.rint(b * inv[..., None]), -32767, 32767).astype(np.int16)
    d = (amax / np.float32(32767)).astype(np.float32)
    s = (d * q.astype(np.int64).sum(-1).astype(np.float32)).astype(np.float32)
    return q.reshape(x.shape), d, s


def model(qtype, blocks: np.ndarray, q: np.ndarray, d: np.ndarray, s: np.ndarray) -> np.ndarray:
    """fp64: the rows as their codes carry them times the weights; the types with a min add o * s, where the
    kernel's s is fp32(d * sum q) rather than the exact sum (the decode kernels' Q16_0 blocks do the same)."""
    m, k = q.shape
    w = dequantize(blocks, qtype).reshape(blocks.shape[0], k).astype(np.float64)
    xq = (q.astype(np.float64).reshape(m, -1, 32) * d[..., None]).reshape(m, k)
    out = xq @ w.T
    if qtype in (T.Q4_1, T.Q5_1, T.Q4_K, T.Q5_K):  # o per 32 weights: w - s * c, the value at code 0
        exact = d.astype(np.float64) * q.astype(np.float64).reshape(m, -1, 32).sum(-1)
        offsets = offsets_of(qtype, blocks, k)
        out += (s.astype(np.float64) - exact) @ offsets.T
    return out


def offsets_of(qtype, blocks: np.ndarray, k: int) -> np.ndarray:
    """Each block of 32 weights' value at code 0 (Q4_1/Q5_1: m; Q4_K/Q5_K: -dmin * min), [N, K / 32], read by
    dequantizing blocks whose codes are all zero (the gguf package's reading again)."""
    size, per, _ = FORMATS[qtype]
    raw = blocks.reshape(blocks.shape[0], -1, size).copy()
    if qtype in (T.Q4_1, T.Q5_1):
        raw[..., 4:] = 0  # qh (Q5_1) and qs
    else:
        raw[..., 16:] = 0  # Q4_K: qs; Q5_K: qh and qs (the 12 scale bytes stay)
    zero = dequantize(raw.reshape(blocks.shape), qtype).reshape(blocks.shape[0], k).astype(np.float64)
    return zero.reshape(blocks.shape[0], -1, 32)[..., 0]


def test_row_codes_are_the_model_bit_for_bit():
    rng = np.random.default_rng(41)
    x = rng.standard_normal((9, 256)).astype(np.float32) * rng.uniform(0.01, 50, size=(9, 1)).astype(np.float32)
    x[3, 32:64] = 0.0  # an all-zero block: scale 0, codes 0
    x[4, :32] = 2.5  # ties and the block's maximum at 32767
    for scalar in (False, True):
        q, d, s = ops.ggml_quantize16(torch.from_numpy(x), scalar)
        mq, md, ms = quantize16_model(x)
        assert np.array_equal(q.numpy(), mq) and np.array_equal(d.numpy(), md) and np.array_equal(s.numpy(), ms)


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
def test_each_block_type_against_the_fp64_model(qtype):
    """Rows not a multiple of the micro-kernel's 4, weight rows not a multiple of a panel's 16; Q5_0 as ggml_repack
    lays it out (R4) when K allows, as the model's linears hold it."""
    rng = np.random.default_rng(int(qtype))
    k, n, m = 512, 37, 11
    blocks = random_blocks(qtype, n, k, rng)
    t, b = ops.ggml_repack(torch.from_numpy(blocks), int(qtype))
    x = rng.standard_normal((m, k)).astype(np.float32)
    q, d, s = ops.ggml_quantize16(torch.from_numpy(x))
    got = ops.ggml_gemm16(q, d, s, [t], [b])
    want = model(qtype, blocks, q.numpy(), d.numpy(), s.numpy())
    assert got.shape == (m, n)
    assert np.abs(got.numpy() - want).max() < 2e-6 * np.abs(want).max()  # fp32 sums of exact integer blocks
    assert torch.equal(got, ops.ggml_gemm16(q, d, s, [t], [b], scalar=True))


def test_parts_of_different_types_fill_one_output_with_bias():
    rng = np.random.default_rng(43)
    k = 256
    specs = [(T.Q5_0, 20), (T.Q6_K, 9), (T.Q4_K, 16)]
    raw = [random_blocks(t, n, k, rng) for t, n in specs]
    parts = [ops.ggml_repack(torch.from_numpy(r), int(t)) for (t, _), r in zip(specs, raw, strict=True)]
    bias = torch.from_numpy(rng.standard_normal(45).astype(np.float32))
    x = rng.standard_normal((6, k)).astype(np.float32)
    q, d, s = ops.ggml_quantize16(torch.from_numpy(x))
    got = ops.ggml_gemm16(q, d, s, [t for t, _ in parts], [b for _, b in parts], bias)
    want = np.concatenate([model(t, r, q.numpy(), d.numpy(), s.numpy()) for (t, _), r in zip(specs, raw, strict=True)],
                          axis=1) + bias.numpy()
    assert np.abs(got.numpy() - want).max() < 2e-6 * np.abs(want).max()


def test_a_rows_result_does_not_depend_on_the_rows_beside_it():
    """The kept rows of a prefill chunk's last layer (models/qwen.py) are computed alone and must equal their
    values in the whole chunk: every row gets the same operations in the same order wherever it sits."""
    rng = np.random.default_rng(47)
    blocks = torch.from_numpy(random_blocks(T.Q6_K, 40, 512, rng))
    x = torch.from_numpy(rng.standard_normal((13, 512)).astype(np.float32))
    whole = ops.ggml_gemm16(*ops.ggml_quantize16(x), [int(T.Q6_K)], [blocks])
    for i in (0, 5, 12):
        alone = ops.ggml_gemm16(*ops.ggml_quantize16(x[i:i + 1]), [int(T.Q6_K)], [blocks])
        assert torch.equal(alone[0], whole[i])


def test_the_product_is_within_the_16_bit_rows_of_the_exact_one():
    """Against the exact model (fp32 rows times the dequantized weights): the rows' 16-bit codes cost about 15 bits,
    far below the 8-bit blocks' error."""
    rng = np.random.default_rng(53)
    blocks = random_blocks(T.Q5_0, 64, 896, rng)
    x = rng.standard_normal((8, 896)).astype(np.float32)
    exact = x.astype(np.float64) @ dequantize(blocks, T.Q5_0).reshape(64, 896).astype(np.float64).T
    t, b = ops.ggml_repack(torch.from_numpy(blocks), int(T.Q5_0))
    got = ops.ggml_gemm16(*ops.ggml_quantize16(torch.from_numpy(x)), [t], [b]).numpy()
    eight = ops.ggml_linear(torch.from_numpy(x), [t], [b], None, False, 8).numpy()
    err, err8 = np.abs(got - exact).max(), np.abs(eight - exact).max()
    assert err < 1e-4 * np.abs(exact).max() and err < err8 / 50, (err, err8)


def test_bad_input_is_refused_by_name():
    rng = np.random.default_rng(59)
    blocks = torch.from_numpy(random_blocks(T.Q8_0, 4, 64, rng))
    q, d, s = ops.ggml_quantize16(torch.randn(2, 64))
    with pytest.raises(RuntimeError, match="ggml_gemm16: codes"):
        ops.ggml_gemm16(q.float(), d, s, [int(T.Q8_0)], [blocks])
    with pytest.raises(RuntimeError, match="ggml_gemm16: a weight part's rows"):
        ops.ggml_gemm16(*ops.ggml_quantize16(torch.randn(2, 96)), [int(T.Q8_0)], [blocks])
    with pytest.raises(RuntimeError, match="ggml_gemm16: unsupported ggml type"):
        ops.ggml_gemm16(q, d, s, [1], [blocks])
    with pytest.raises(RuntimeError, match="ggml_quantize16: K"):
        ops.ggml_quantize16(torch.randn(2, 40))


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q8_0, T.Q4_1], ids=lambda t: t.name)
def test_rows_of_blocks_left_as_the_file_stores_them(qtype):
    """K = 96: three blocks a row, so Q5_0 stays in the file's layout (ggml_repack needs a multiple of 4 blocks)
    and is read by the scalar codes; the result is still the model's."""
    rng = np.random.default_rng(61)
    blocks = random_blocks(qtype, 19, 96, rng)
    t, b = ops.ggml_repack(torch.from_numpy(blocks), int(qtype))
    assert t == int(qtype)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    q, d, s = ops.ggml_quantize16(torch.from_numpy(x))
    got = ops.ggml_gemm16(q, d, s, [t], [b])
    want = model(qtype, blocks, q.numpy(), d.numpy(), s.numpy())
    assert np.abs(got.numpy() - want).max() < 2e-6 * np.abs(want).max()
