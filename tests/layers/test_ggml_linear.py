"""The GGUF block kernels (csrc/ggml_linear.cpp) against an fp64 model of llama.cpp's arithmetic.

The weights are random blocks of each type, decoded by the gguf package's own dequantizers (an independent
reading of the formats); the activations are quantized by a numpy model of ggml's rules, which must give the
kernel's activation blocks bit for bit; the product is then computed in fp64 and the kernel's fp32 result
must agree to fp32 accumulation error. Both the AVX2 and the scalar forms are checked.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as T
from gguf.quants import dequantize

from thinkgate.layers import cpu_kernels

ops = cpu_kernels.load_ggml()
pytestmark = pytest.mark.skipif(ops is None, reason="no C++ compiler to build the GGUF block kernels")

# block bytes, weights per block, offsets of the fp16 fields (scale first, then min where there is one)
FORMATS = {T.Q4_0: (18, 32, [0]), T.Q4_1: (20, 32, [0, 2]), T.Q5_0: (22, 32, [0]), T.Q5_1: (24, 32, [0, 2]),
           T.Q8_0: (34, 32, [0]), T.Q4_K: (144, 256, [0, 2]), T.Q5_K: (176, 256, [0, 2]), T.Q6_K: (210, 256, [208])}


def random_blocks(qtype, n: int, k: int, rng) -> np.ndarray:
    """[n, row bytes] of random codes and scales (any bit pattern is a valid block but for the fp16
    fields, which get finite values of a realistic size)."""
    size, per, halves = FORMATS[qtype]
    nb = k // per
    raw = rng.integers(0, 256, size=(n, nb, size), dtype=np.uint8)
    for j, off in enumerate(halves):
        scale = 0.01 if qtype in (T.Q4_K, T.Q5_K, T.Q6_K) and j == 0 else 0.05
        vals = rng.uniform(0.2, 1.0, size=(n, nb)) * scale * (1 if j == 0 else rng.choice([-1, 1], size=(n, nb)))
        if qtype == T.Q6_K:  # its scales are signed int8, stored as is: keep the magnitude realistic
            vals = vals / 20
        raw[:, :, off:off + 2] = vals.astype(np.float16).view(np.uint8).reshape(n, nb, 2)
    return raw.reshape(n, nb * size)


def quantize_q8_0(x: np.ndarray, with_sum: bool):
    """ggml's x86 quantize_row_q8_0 / q8_1: (d as fp16, codes, s = fp16(d * sum) or None) per 32."""
    b = x.reshape(x.shape[0], -1, 32).astype(np.float32)
    amax = np.abs(b).max(-1)
    d = amax / np.float32(127)
    inv = np.where(amax != 0, np.float32(127) / np.where(amax == 0, 1, amax), 0).astype(np.float32)
    q = np.rint(b * inv[..., None]).astype(np.int32)
    s = (d * q.sum(-1).astype(np.float32)).astype(np.float16) if with_sum else None
    return d.astype(np.float16), q, s


def quantize_q8_k(x: np.ndarray):
    """ggml's quantize_row_q8_K_ref: (d fp32, codes) per 256; the signed value of largest magnitude -> -127."""
    b = x.reshape(x.shape[0], -1, 256).astype(np.float32)
    idx = np.abs(b).argmax(-1)
    mx = np.take_along_axis(b, idx[..., None], -1)[..., 0]
    iscale = np.float32(-127) / np.where(mx == 0, 1, mx).astype(np.float32)
    q = np.minimum(127, np.rint(b * iscale[..., None])).astype(np.int32)
    d = np.where(mx == 0, 0, np.float32(1) / iscale).astype(np.float32)
    return d, np.where(mx[..., None] == 0, 0, q)


def kernel_blocks(x: torch.Tensor, vec: T):
    raw = ops.ggml_quantize_activations(x, int(vec)).numpy()
    m = raw.shape[0]
    if vec == T.Q8_K:
        blk = raw.reshape(m, -1, 292)
        return blk[..., :4].copy().view(np.float32)[..., 0], blk[..., 4:260].view(np.int8).astype(np.int32)
    size = 36 if vec == T.Q8_1 else 34
    blk = raw.reshape(m, -1, size)
    d = blk[..., :2].copy().view(np.float16)[..., 0]
    s = blk[..., 2:4].copy().view(np.float16)[..., 0] if vec == T.Q8_1 else None
    return d, blk[..., size - 32:].view(np.int8).astype(np.int32), s


def model_product(qtype, blocks: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """fp64: sum over blocks of (weight block . activation block) as ggml defines it."""
    w = dequantize(blocks, qtype).reshape(blocks.shape[0], k).astype(np.float64)
    if qtype in (T.Q4_K, T.Q5_K, T.Q6_K):
        d, q = quantize_q8_k(x)
        xa = (d[..., None].astype(np.float64) * q).reshape(x.shape[0], k)
        return xa @ w.T
    with_min = qtype in (T.Q4_1, T.Q5_1)
    d, q, s = quantize_q8_0(x, with_min)
    xa = (d[..., None].astype(np.float64) * q).reshape(x.shape[0], k)
    out = xa @ w.T
    if with_min:
        # ggml takes the activations' block sum from s = fp16(d * sum q), not from fp16(d) * sum q.
        size = FORMATS[qtype][0]
        mins = blocks.reshape(blocks.shape[0], -1, size)[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        exact = d.astype(np.float64) * q.sum(-1)
        out += (s.astype(np.float64) - exact) @ mins.T
    return out


@pytest.mark.parametrize("scalar", [False, True], ids=["avx2", "scalar"])
@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
def test_each_block_type_against_the_fp64_model(qtype, scalar):
    rng = np.random.default_rng(int(qtype))
    k, n = 512, 37  # 37 rows: the 16-row tiles end part-way
    blocks = random_blocks(qtype, n, k, rng)
    for m in (1, 3, 20):
        x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.1, 4.0, size=(m, 1)).astype(np.float32)
        y = ops.ggml_linear(torch.from_numpy(x), [int(qtype)], [torch.from_numpy(blocks)], None, scalar).numpy()
        ref = model_product(qtype, blocks, x, k)
        w = np.abs(dequantize(blocks, qtype).reshape(n, k).astype(np.float64))
        bound = 2e-6 * (np.abs(x).astype(np.float64) @ w.T) + 1e-6
        assert y.shape == (m, n)
        assert np.all(np.abs(y - ref) <= bound), f"{qtype.name} m={m}: max err {np.abs(y - ref).max():.3g}"


@pytest.mark.parametrize("vec", [T.Q8_0, T.Q8_1, T.Q8_K], ids=lambda t: t.name)
def test_activation_blocks_are_ggmls_bit_for_bit(vec):
    rng = np.random.default_rng(7)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    x[1] = 0.0  # an all-zero row: scale 0, codes 0
    x[2, :256] *= 1000.0
    x[3, 7] = -50.0  # the largest magnitude negative: Q8_K maps it to +127 with a negative scale
    got = kernel_blocks(torch.from_numpy(x), vec)
    if vec == T.Q8_K:
        d, q = quantize_q8_k(x)
        np.testing.assert_array_equal(got[0], d)
        np.testing.assert_array_equal(got[1], q)
        return
    d, q, s = quantize_q8_0(x, vec == T.Q8_1)
    np.testing.assert_array_equal(got[0], d)
    np.testing.assert_array_equal(got[1], q)
    if vec == T.Q8_1:
        np.testing.assert_array_equal(got[2], s)


def test_parts_of_different_types_fill_one_output_with_bias():
    """A fused q/k/v projection whose v rows the file stores in another type."""
    rng = np.random.default_rng(3)
    k = 256
    parts = [(T.Q5_0, random_blocks(T.Q5_0, 24, k, rng)), (T.Q4_K, random_blocks(T.Q4_K, 8, k, rng)),
             (T.Q8_0, random_blocks(T.Q8_0, 8, k, rng))]
    bias = rng.standard_normal(40).astype(np.float32)
    x = rng.standard_normal((2, k)).astype(np.float32)
    y = ops.ggml_linear(torch.from_numpy(x), [int(t) for t, _ in parts], [torch.from_numpy(b) for _, b in parts],
                        torch.from_numpy(bias), False).numpy()
    ref = np.concatenate([model_product(t, b, x, k) for t, b in parts], axis=1) + bias
    np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
def test_dequantized_rows_are_the_gguf_packages(qtype):
    rng = np.random.default_rng(11)
    blocks = random_blocks(qtype, 50, 512, rng)
    ids = torch.tensor([3, 0, 49, 3])
    got = ops.ggml_dequantize_rows(torch.from_numpy(blocks), int(qtype), ids).numpy()
    ref = dequantize(blocks[ids.numpy()], qtype).reshape(4, 512)
    np.testing.assert_allclose(got, ref, rtol=1e-6, atol=1e-7)


def test_bad_input_is_refused_by_name():
    x = torch.zeros(1, 100)
    with pytest.raises(RuntimeError, match="K = 100"):
        ops.ggml_linear(x, [int(T.Q8_0)], [torch.zeros(2, 34, dtype=torch.uint8)], None, False)
    with pytest.raises(RuntimeError, match="unsupported ggml type"):
        ops.ggml_linear(torch.zeros(1, 32), [int(T.Q2_K)], [torch.zeros(2, 84, dtype=torch.uint8)], None, False)
    with pytest.raises(RuntimeError, match="act_bits is 8 or 16"):
        ops.ggml_linear(torch.zeros(1, 32), [int(T.Q8_0)], [torch.zeros(2, 34, dtype=torch.uint8)], None, False, 12)


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(qtype):
    """Input rows share each unpacked weight block in groups of up to 4; each row must still get exactly the
    bits it gets alone (batched decode and speculative verification compare with one-row steps)."""
    rng = np.random.default_rng(5)
    blocks = torch.from_numpy(random_blocks(qtype, 21, 512, rng))
    x = torch.from_numpy(rng.standard_normal((7, 512)).astype(np.float32))
    together = ops.ggml_linear(x, [int(qtype)], [blocks], None, False)
    alone = torch.cat([ops.ggml_linear(x[i:i + 1], [int(qtype)], [blocks], None, False) for i in range(7)])
    assert torch.equal(together, alone)


def test_the_avx2_layout_of_q5_0_gives_the_same_bits():
    """Q5_0 rows rearranged for the AVX2 kernel (ggml_repack): same codes, so bit-identical products."""
    rng = np.random.default_rng(9)
    blocks = torch.from_numpy(random_blocks(T.Q5_0, 19, 896, rng))
    qtype, packed = ops.ggml_repack(blocks, int(T.Q5_0))
    if qtype == int(T.Q5_0):
        pytest.skip("this CPU has no AVX2: Q5_0 is multiplied in the file's layout")
    assert packed.shape == (19, 896 // 128 * 96)
    for m in (1, 6):
        x = torch.from_numpy(rng.standard_normal((m, 896)).astype(np.float32))
        want = ops.ggml_linear(x, [int(T.Q5_0)], [blocks], None, False)
        assert torch.equal(ops.ggml_linear(x, [qtype], [packed], None, False), want)
    odd = torch.from_numpy(random_blocks(T.Q5_0, 3, 96, rng))  # 3 blocks a row: left as stored
    assert ops.ggml_repack(odd, int(T.Q5_0))[0] == int(T.Q5_0)


Q16_0, Q16_K = 116, 117  # our 16-bit activation blocks (csrc/ggml_blocks.h)


def quantize_q16(x: np.ndarray, per: int):
    """Our 16-bit blocks: d = amax / 32767 (fp32), codes rint(x * (32767 / amax)), and each block's code sum
    (per 32 values) as the kernels' min terms use it."""
    b = x.reshape(x.shape[0], -1, per).astype(np.float32)
    amax = np.abs(b).max(-1)
    d = (amax / np.float32(32767)).astype(np.float32)
    inv = np.where(amax != 0, np.float32(32767) / np.where(amax == 0, 1, amax), 0).astype(np.float32)
    q = np.clip(np.rint(b * inv[..., None]), -32767, 32767).astype(np.int64)
    return d, q


def kernel_blocks16(x: torch.Tensor, per: int):
    raw = ops.ggml_quantize_activations(x, Q16_K if per == 256 else Q16_0).numpy()
    m = raw.shape[0]
    if per == 256:
        blk = raw.reshape(m, -1, 4 + 32 + 512)
        return (blk[..., :4].copy().view(np.float32)[..., 0], blk[..., 36:].copy().view(np.int16).astype(np.int64),
                blk[..., 4:36].copy().view(np.int32))
    blk = raw.reshape(m, -1, 8 + 64)
    return (blk[..., :4].copy().view(np.float32)[..., 0], blk[..., 8:].copy().view(np.int16).astype(np.int64),
            blk[..., 4:8].copy().view(np.float32)[..., 0])


def model_product16(qtype, blocks: np.ndarray, x: np.ndarray, k: int) -> np.ndarray:
    """fp64: the weights (the gguf package's reading) times the rows as our 16-bit blocks carry them."""
    w = dequantize(blocks, qtype).reshape(blocks.shape[0], k).astype(np.float64)
    d, q = quantize_q16(x, 256 if qtype in (T.Q4_K, T.Q5_K, T.Q6_K) else 32)
    out = (d[..., None].astype(np.float64) * q).reshape(x.shape[0], k) @ w.T
    if qtype in (T.Q4_1, T.Q5_1):  # the kernels take a block's sum from s = fp32(d * sum q)
        size = FORMATS[qtype][0]
        mins = blocks.reshape(blocks.shape[0], -1, size)[..., 2:4].copy().view(np.float16)[..., 0].astype(np.float64)
        exact = d.astype(np.float64) * q.sum(-1)
        out += ((d * q.sum(-1).astype(np.float32)).astype(np.float64) - exact) @ mins.T
    return out


def test_16bit_activation_blocks_are_the_model_bit_for_bit():
    rng = np.random.default_rng(17)
    x = rng.standard_normal((5, 512)).astype(np.float32)
    x[1] = 0.0
    x[2, :256] *= 1000.0
    x[3, 7] = -50.0
    for per in (32, 256):
        d, q, sums = kernel_blocks16(torch.from_numpy(x), per)
        want_d, want_q = quantize_q16(x, per)
        np.testing.assert_array_equal(d, want_d)
        np.testing.assert_array_equal(q, want_q)
        assert np.abs(q).max() == 32767  # the full int16 range is used
        if per == 32:
            np.testing.assert_array_equal(sums, d * q.sum(-1).astype(np.float32))
        else:
            np.testing.assert_array_equal(sums, q.reshape(5, -1, 8, 32).sum(-1))


@pytest.mark.parametrize("scalar", [False, True], ids=["avx2", "scalar"])
@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
def test_16bit_activations_against_the_fp64_model(qtype, scalar):
    """act_bits=16: the product of the file's weights with the rows' 16-bit blocks, to fp32 accumulation error,
    for every type in both forms; the extreme codes and scales included (a K-quant's integer sums come close
    to 2^31 there: the AVX2 form must not wrap)."""
    rng = np.random.default_rng(100 + int(qtype))
    k, n = 512, 37
    blocks = random_blocks(qtype, n, k, rng)
    size, per, halves = FORMATS[qtype]
    extreme = blocks.reshape(n, -1, size)
    extreme[0] = 0xFF  # every code and scale at its largest (Q6_K: scales -1; see below)
    if qtype == T.Q6_K:  # codes 0 (-32 once centred) and scales -128: |product| 4096 on every weight
        extreme[1, :, :192] = 0
        extreme[1, :, 192:208] = 0x80
    for j, off in enumerate(halves):
        extreme[:2, :, off:off + 2] = np.full((2, extreme.shape[1]), 0.01 if j == 0 else 0.02,
                                             np.float16).view(np.uint8).reshape(2, -1, 2)
    blocks = extreme.reshape(n, -1)
    for m in (1, 3, 10):
        x = rng.standard_normal((m, k)).astype(np.float32) * rng.uniform(0.1, 4.0, size=(m, 1)).astype(np.float32)
        x[0] = 1.0  # every code 32767 against the extreme rows: the largest integer sums there are
        y = ops.ggml_linear(torch.from_numpy(x), [int(qtype)], [torch.from_numpy(blocks)], None, scalar, 16).numpy()
        ref = model_product16(qtype, blocks, x, k)
        w = np.abs(dequantize(blocks, qtype).reshape(n, k).astype(np.float64))
        bound = 2e-6 * (np.abs(x).astype(np.float64) @ w.T) + 1e-6
        assert np.all(np.abs(y - ref) <= bound), f"{qtype.name} m={m}: max err {np.abs(y - ref).max():.3g}"


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
def test_16bit_activations_are_about_15_bits_and_row_independent(qtype):
    """Against the product of the same weights with the unrounded rows (fp64) the 16-bit blocks' error is a
    small fraction of the 8-bit blocks', a row's result does not depend on its neighbours, and Q5_0's AVX2
    layout gives the same bits."""
    rng = np.random.default_rng(13)
    blocks = random_blocks(qtype, 23, 512, rng)
    w = dequantize(blocks, qtype).reshape(23, 512).astype(np.float64)
    x = rng.standard_normal((11, 512)).astype(np.float32)  # 11 rows: a group of 8 and one of 3 share blocks
    exact = x.astype(np.float64) @ w.T
    xt, bt = torch.from_numpy(x), torch.from_numpy(blocks)
    e8 = np.abs(ops.ggml_linear(xt, [int(qtype)], [bt], None, False, 8).numpy() - exact).mean()
    wide = ops.ggml_linear(xt, [int(qtype)], [bt], None, False, 16)
    e16 = np.abs(wide.numpy() - exact).mean()
    assert e16 < e8 / 30, (e8, e16)
    alone = torch.cat([ops.ggml_linear(xt[i:i + 1], [int(qtype)], [bt], None, False, 16) for i in range(11)])
    assert torch.equal(wide, alone)
    qt, packed = ops.ggml_repack(bt, int(qtype))
    assert torch.equal(ops.ggml_linear(xt, [qt], [packed], None, False, 16), wide)


Q5_0_R4, Q5_0_R4L, Q8_0_R4L = 106, 107, 108  # ggml_repack's layouts (csrc/ggml_blocks.h)


def test_the_lanes_layout_of_q5_0_against_the_fp64_model_and_row_independent():
    """Q5_0 in the R4L layout (what the default's 16-bit kernels multiply): each group's codes placed so an int32
    lane holds one block's products, summed as integers and scaled once per 4 blocks. The products are the fp64
    model's to fp32 accumulation error, extreme codes included; a row's bits do not depend on the rows beside it
    (1 to 11 rows: the kernels for 1, 2 and 8 rows and the tails); the same codes as the file's blocks."""
    rng = np.random.default_rng(41)
    n, k = 29, 896
    blocks = random_blocks(T.Q5_0, n, k, rng)
    ext = blocks.reshape(n, -1, 22)
    ext[0, :, 2:] = 0x00  # every code -16, the largest magnitude
    ext[1, :, 2:] = 0xFF  # every code 15
    ext[:2, :, :2] = np.full((2, ext.shape[1]), 0.01, np.float16).view(np.uint8).reshape(2, -1, 2)
    blocks = ext.reshape(n, -1)
    bt = torch.from_numpy(blocks)
    qtype, packed = ops.ggml_repack(bt, int(T.Q5_0), True)
    if qtype == int(T.Q5_0):
        pytest.skip("this CPU has no AVX2: Q5_0 is multiplied in the file's layout")
    assert qtype == Q5_0_R4L and packed.shape == (n, k // 128 * 88)  # the file's bytes: fp16 scales
    w = np.abs(dequantize(blocks, T.Q5_0).reshape(n, k).astype(np.float64))
    x = rng.standard_normal((11, k)).astype(np.float32) * rng.uniform(0.1, 4.0, size=(11, 1)).astype(np.float32)
    x[0] = 1.0  # codes 32767 against the extreme rows: the largest lane sums (16 x 16 x 32767 < 2^24)
    xt = torch.from_numpy(x)
    together = ops.ggml_linear(xt, [qtype], [packed], None, False, 16)
    ref = model_product16(T.Q5_0, blocks, x, k)
    bound = 2e-6 * (np.abs(x).astype(np.float64) @ w.T) + 1e-6
    assert np.all(np.abs(together.numpy() - ref) <= bound), np.abs(together.numpy() - ref).max()
    alone = torch.cat([ops.ggml_linear(xt[i:i + 1], [qtype], [packed], None, False, 16) for i in range(11)])
    assert torch.equal(together, alone)
    for m in (2, 8, 9):
        assert torch.equal(ops.ggml_linear(xt[:m], [qtype], [packed], None, False, 16), together[:m])
    # the same codes and scales: dequantized (whole, or rows as an embedding reads them), they are the file's values
    assert torch.equal(ops.ggml_dequantize([qtype], [packed]), ops.ggml_dequantize([int(T.Q5_0)], [bt]))
    assert torch.equal(ops.ggml_dequantize([qtype], [packed], True), ops.ggml_dequantize([int(T.Q5_0)], [bt]))
    ids = torch.tensor([3, 0, 28, 3])
    assert torch.equal(ops.ggml_dequantize_rows(packed, qtype, ids), ops.ggml_dequantize_rows(bt, int(T.Q5_0), ids))
    with pytest.raises(RuntimeError, match="16-bit activations"):
        ops.ggml_linear(xt, [qtype], [packed], None, False, 8)
    with pytest.raises(RuntimeError, match="no scalar form"):
        ops.ggml_linear(xt, [qtype], [packed], None, True, 16)


def test_the_lanes_layout_of_q8_0_against_the_fp64_model_and_the_files_values():
    """Q8_0 as R4L (the default's output head): the fp64 model's products, extreme codes included (a lane's sum
    reaches 16 x 128 x 32767 and is converted once), row independence, and the file's values when dequantized
    (the embedding of a tied head reads these blocks)."""
    rng = np.random.default_rng(47)
    n, k = 21, 384
    blocks = random_blocks(T.Q8_0, n, k, rng)
    ext = blocks.reshape(n, -1, 34)
    ext[0, :, 2:] = 0x80  # every code -128
    ext[0, :, :2] = np.full((ext.shape[1],), 0.01, np.float16).view(np.uint8).reshape(-1, 2)
    blocks = ext.reshape(n, -1)
    bt = torch.from_numpy(blocks)
    assert ops.ggml_repack(bt, int(T.Q8_0))[0] == int(T.Q8_0)  # without lanes Q8_0 stays as stored
    qtype, packed = ops.ggml_repack(bt, int(T.Q8_0), True)
    if qtype == int(T.Q8_0):
        pytest.skip("this CPU has no AVX2: Q8_0 is multiplied in the file's layout")
    assert qtype == Q8_0_R4L and packed.shape == blocks.shape  # as many bytes as the file's blocks
    x = rng.standard_normal((10, k)).astype(np.float32)
    x[0] = -1.0
    xt = torch.from_numpy(x)
    together = ops.ggml_linear(xt, [qtype], [packed], None, False, 16)
    ref = model_product16(T.Q8_0, blocks, x, k)
    w = np.abs(dequantize(blocks, T.Q8_0).reshape(n, k).astype(np.float64))
    bound = 2e-6 * (np.abs(x).astype(np.float64) @ w.T) + 1e-6
    assert np.all(np.abs(together.numpy() - ref) <= bound), np.abs(together.numpy() - ref).max()
    alone = torch.cat([ops.ggml_linear(xt[i:i + 1], [qtype], [packed], None, False, 16) for i in range(10)])
    assert torch.equal(together, alone)
    assert torch.equal(ops.ggml_dequantize([qtype], [packed]), ops.ggml_dequantize([int(T.Q8_0)], [bt]))
    ids = torch.tensor([20, 0, 7])
    assert torch.equal(ops.ggml_dequantize_rows(packed, qtype, ids), ops.ggml_dequantize_rows(bt, int(T.Q8_0), ids))
    x16 = ops.ggml_quantize16(xt)
    assert torch.equal(ops.ggml_gemm16(*x16, [qtype], [packed]), ops.ggml_gemm16(*x16, [int(T.Q8_0)], [bt]))


def test_the_16bit_gemm_reads_the_lanes_layout_as_the_files_blocks():
    """Prefill's 16-bit GEMM unpacks R4L's codes back into their blocks' order (AVX2 and scalar): the same bits as
    from the file's layout."""
    rng = np.random.default_rng(43)
    bt = torch.from_numpy(random_blocks(T.Q5_0, 40, 896, rng))
    x = torch.from_numpy(rng.standard_normal((21, 896)).astype(np.float32))
    quantized = ops.ggml_quantize16(x)
    want = ops.ggml_gemm16(*quantized, [int(T.Q5_0)], [bt])
    for lanes in (False, True):
        qtype, packed = ops.ggml_repack(bt, int(T.Q5_0), lanes)
        for scalar in (False, True):
            assert torch.equal(ops.ggml_gemm16(*quantized, [qtype], [packed], None, scalar), want), (lanes, scalar)


@pytest.mark.parametrize("qtype", list(FORMATS), ids=lambda t: t.name)
def test_whole_weight_dequantization_is_the_gguf_packages(qtype):
    """ggml_dequantize (prefill's float GEMM): the parts stacked, each row the gguf package's values; the AVX2
    form gives the scalar form's floats, and the R4 layout of Q5_0 the file layout's."""
    rng = np.random.default_rng(17)
    a, b = random_blocks(qtype, 13, 512, rng), random_blocks(qtype, 6, 512, rng)
    parts = [torch.from_numpy(a), torch.from_numpy(b)]
    ref = np.concatenate([dequantize(a, qtype).reshape(13, 512), dequantize(b, qtype).reshape(6, 512)])
    fast = ops.ggml_dequantize([int(qtype)] * 2, parts)
    np.testing.assert_allclose(fast.numpy(), ref, rtol=1e-6, atol=1e-7)
    assert torch.equal(fast, ops.ggml_dequantize([int(qtype)] * 2, parts, True))
    repacked = [ops.ggml_repack(p, int(qtype)) for p in parts]
    assert torch.equal(ops.ggml_dequantize([t for t, _ in repacked], [p for _, p in repacked]), fast)
    scratch = torch.full((19 * 512 + 5,), float("nan"))  # a caller's buffer is filled in place and returned
    into = ops.ggml_dequantize([int(qtype)] * 2, parts, False, scratch)
    assert into.data_ptr() == scratch.data_ptr() and torch.equal(into, fast)


@pytest.mark.parametrize("act_bits", [8, 16])
def test_many_rows_take_a_gemm(act_bits):
    """From GEMM_MIN_ROWS rows a GGMLLinear multiplies by a GEMM: `gguf-q8` (8-bit blocks) by the float GEMM over
    the dequantized weights, far closer to fp64 than the block kernels; the default (16-bit blocks) by the 16-bit
    GEMM, whose error is the rows' 16-bit codes. Below it the block kernels' bits are kept."""
    from thinkgate.layers.ggml_linear import GEMM_MIN_ROWS, GGMLLinear

    rng = np.random.default_rng(19)
    parts = [(int(T.Q5_0), torch.from_numpy(random_blocks(T.Q5_0, 40, 896, rng))),
             (int(T.Q8_0), torch.from_numpy(random_blocks(T.Q8_0, 8, 896, rng)))]
    bias = torch.from_numpy(rng.standard_normal(48).astype(np.float32))
    lin = GGMLLinear(parts, 896, bias, act_bits=act_bits)
    w = np.concatenate([dequantize(b.numpy(), T(t)).reshape(-1, 896) for t, b in parts]).astype(np.float64)
    x = torch.from_numpy(rng.standard_normal((GEMM_MIN_ROWS, 896)).astype(np.float32))
    exact = x.numpy().astype(np.float64) @ w.T + bias.numpy()
    many = lin(x).numpy()
    blockwise = ops.ggml_linear(x, lin.types, lin.blocks, lin.bias32, False, act_bits).numpy()
    e_gemm, e_blocks = np.abs(many - exact).max(), np.abs(blockwise - exact).max()
    if act_bits == 8:
        assert e_gemm < 1e-5 * np.abs(exact).max() and e_gemm < e_blocks / 10, (e_gemm, e_blocks)  # fp32 sums
    else:
        assert lin.int16_gemm == ops.ggml_gemm16_fast()
        if lin.int16_gemm:
            assert np.array_equal(many, ops.ggml_gemm16(*ops.ggml_quantize16(x), lin.types, lin.blocks, lin.bias32))
        assert e_gemm < 1e-4 * np.abs(exact).max(), (e_gemm, e_blocks)
    few = x[:GEMM_MIN_ROWS - 1]
    assert torch.equal(lin(few), ops.ggml_linear(few, lin.types, lin.blocks, lin.bias32, False, act_bits))


@pytest.mark.parametrize("act_bits", [8, 16])
def test_concurrent_engines_do_not_share_the_gemm_buffer(act_bits):
    """Two engines (a server with several local models) may prefill at once, each in its own thread: each
    thread's float GEMM gets its own dequantization buffer (the 16-bit GEMM packs into buffers of its call), so
    both results are the ones computed alone."""
    import threading

    from thinkgate.layers.ggml_linear import GEMM_MIN_ROWS, GGMLLinear

    rng = np.random.default_rng(23)
    lins = [GGMLLinear([(int(T.Q8_0), torch.from_numpy(random_blocks(T.Q8_0, 96, 512, rng)))], 512, act_bits=act_bits)
            for _ in range(2)]
    x = torch.from_numpy(rng.standard_normal((GEMM_MIN_ROWS, 512)).astype(np.float32))
    want = [lin(x) for lin in lins]
    bad = []

    def run(i: int) -> None:
        for _ in range(30):
            if not torch.equal(lins[i](x), want[i]):
                bad.append(i)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not bad


def test_silu_mul_writes_each_panel_into_a_wider_activation():
    """ggml_silu_mul: SiLU(gate) * up of a [T, 2p] panel (gate columns, then up) against fp64, written into a view
    of a wider activation without touching its other columns; refused by name when the view cannot take it."""
    rng = np.random.default_rng(29)
    x = torch.from_numpy((rng.standard_normal((5, 2 * 19)) * 6).astype(np.float32))
    full = torch.full((5, 50), 7.0)
    ops.ggml_silu_mul(x, full[:, 20:39])
    g, u = x.double()[:, :19], x.double()[:, 19:]
    torch.testing.assert_close(full[:, 20:39].double(), g * torch.sigmoid(g) * u, atol=1e-5, rtol=1e-5)
    assert torch.equal(full[:, :20], torch.full((5, 20), 7.0)) and torch.equal(full[:, 39:], torch.full((5, 11), 7.0))
    with pytest.raises(RuntimeError, match="ggml_silu_mul: out"):
        ops.ggml_silu_mul(x, full[:, 20:38])
    with pytest.raises(RuntimeError, match="ggml_silu_mul: x"):
        ops.ggml_silu_mul(x[:, :37], full[:, 20:38])


@pytest.mark.parametrize("act_bits", [8, 16])
@pytest.mark.parametrize("rows", [3, 64, 130])
def test_swiglu_in_panels_is_silu_of_gate_times_up(rows, act_bits, monkeypatch):
    """A gate/up GGMLLinear's swiglu (prefill's MLP): in panels of columns whose width does not divide the
    intermediate size, each part of its own type, the result is SiLU(x W_gate^T) * (x W_up^T) from GEMM_MIN_ROWS
    rows: of the exact weights (fp64 model) for `gguf-q8`'s float GEMM, of the rows' 16-bit codes for the default's
    16-bit GEMM; below that, of the block kernels' product."""
    from tests.layers.test_ggml_gemm16 import model, quantize16_model
    from thinkgate.layers import ggml_linear
    from thinkgate.layers.ggml_linear import GEMM_MIN_ROWS, GGMLLinear

    monkeypatch.setattr(ggml_linear, "SWIGLU_PANEL", 40)  # 104 columns: 3 panels of 48, the last one 8 wide
    rng = np.random.default_rng(31)
    gate, up = random_blocks(T.Q5_0, 104, 256, rng), random_blocks(T.Q8_0, 104, 256, rng)
    lin = GGMLLinear([(int(T.Q5_0), torch.from_numpy(gate)), (int(T.Q8_0), torch.from_numpy(up))], 256,
                     act_bits=act_bits)
    x = torch.from_numpy(rng.standard_normal((rows, 256)).astype(np.float32))
    if rows >= GEMM_MIN_ROWS and lin.int16_gemm:
        q, d, s = quantize16_model(x.numpy())
        g, u = model(T.Q5_0, gate, q, d, s), model(T.Q8_0, up, q, d, s)
    elif rows >= GEMM_MIN_ROWS:
        xd = x.numpy().astype(np.float64)
        g = xd @ dequantize(gate, T.Q5_0).reshape(104, 256).astype(np.float64).T
        u = xd @ dequantize(up, T.Q8_0).reshape(104, 256).astype(np.float64).T
    else:
        both = ops.ggml_linear(x, lin.types, lin.blocks, None, False, act_bits).double().numpy()
        g, u = both[:, :104], both[:, 104:]
    want = g / (1 + np.exp(-g)) * u
    got = lin.swiglu(x.view(1, rows, 256))
    assert got.shape == (1, rows, 104)
    np.testing.assert_allclose(got[0].double().numpy(), want, rtol=1e-4, atol=1e-5 * np.abs(want).max())
    kept = lin.swiglu(x, reuse=True)  # the MLP's form: this thread's kept buffer, the same values
    assert torch.equal(kept, got[0]) and lin.swiglu(x, reuse=True).data_ptr() == kept.data_ptr()
    single = GGMLLinear([(int(T.Q8_0), torch.from_numpy(up))], 256)
    assert single.swiglu(x) is None  # not a gate/up pair: the model's plain SiLU path


def test_a_large_weight_is_multiplied_in_panels_of_bounded_size(monkeypatch):
    """forward_exact (`gguf-q8`'s prefill) of a weight larger than EXACT_PANEL_BYTES (the output head) dequantizes it
    a panel of rows at a time, panels that cross the parts' boundary included: the product (bias too) is the exact one, and the kept
    buffer never grows past one panel."""
    from thinkgate.layers import ggml_linear
    from thinkgate.layers.ggml_linear import GEMM_MIN_ROWS, GGMLLinear

    monkeypatch.setattr(ggml_linear, "EXACT_PANEL_BYTES", 48 * 256 * 4)  # panels of 48 rows over parts of 70 + 50
    monkeypatch.setattr(ggml_linear._local, "scratch", None, raising=False)
    rng = np.random.default_rng(37)
    a, b = random_blocks(T.Q8_0, 70, 256, rng), random_blocks(T.Q4_K, 50, 256, rng)
    bias = torch.from_numpy(rng.standard_normal(120).astype(np.float32))
    lin = GGMLLinear([(int(T.Q8_0), torch.from_numpy(a)), (int(T.Q4_K), torch.from_numpy(b))], 256, bias, act_bits=8)
    x = torch.from_numpy(rng.standard_normal((GEMM_MIN_ROWS + 3, 256)).astype(np.float32))
    w = np.concatenate([dequantize(a, T.Q8_0).reshape(70, 256), dequantize(b, T.Q4_K).reshape(50, 256)])
    exact = x.numpy().astype(np.float64) @ w.astype(np.float64).T + bias.numpy()
    got = lin(x)
    assert got.shape == (GEMM_MIN_ROWS + 3, 120)
    np.testing.assert_allclose(got.numpy(), exact, rtol=1e-5, atol=1e-5 * np.abs(exact).max())
    assert ggml_linear._local.scratch.numel() == 48 * 256


def test_the_block_kernels_run_without_the_gil():
    """A decode step is one long C++ call on the engine's thread; the server's event loop (another thread) must
    keep running Python meanwhile: the kernels release the GIL. Held, the loop below would stall for the whole
    call."""
    import threading
    import time

    rng = np.random.default_rng(29)
    blocks = torch.from_numpy(random_blocks(T.Q8_0, 20000, 2048, rng))
    x = torch.from_numpy(rng.standard_normal((24, 2048)).astype(np.float32))
    started, span = threading.Event(), []

    def call() -> None:
        started.set()
        t0 = time.perf_counter()
        ops.ggml_linear(x, [int(T.Q8_0)], [blocks], None, True, 16)  # one call, the slow scalar form
        span.append(time.perf_counter() - t0)

    worker = threading.Thread(target=call)
    worker.start()
    started.wait()
    ticks = []
    while worker.is_alive():
        ticks.append(time.perf_counter())
        time.sleep(0.001)
    worker.join()
    assert span[0] > 0.05, "the call must be long enough to tell"
    assert len(ticks) > 10, f"the loop ran {len(ticks)} times during a {span[0]:.3f} s call"
    assert np.diff(ticks).max() < span[0] / 3, (np.diff(ticks).max(), span[0])


@pytest.mark.parametrize("qtype", [T.Q5_0, T.Q8_0, T.Q4_K, T.Q6_K], ids=lambda t: t.name)
def test_the_result_does_not_depend_on_the_thread_count(qtype):
    """Threads take chunks of weight rows as they become free (csrc/dynamic_for.h): whichever thread computes a
    row, it gets the same bits as on one thread."""
    rng = np.random.default_rng(31)
    k = 512 if qtype not in (T.Q4_K, T.Q6_K) else 1024
    rtype, blocks = ops.ggml_repack(torch.from_numpy(random_blocks(qtype, 3001, k, rng)), int(qtype))
    x = torch.from_numpy(rng.standard_normal((3, k)).astype(np.float32))
    before = torch.get_num_threads()
    try:
        outs = []
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            outs.append(ops.ggml_linear(x, [rtype], [blocks], None, False, 16))
    finally:
        torch.set_num_threads(before)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
