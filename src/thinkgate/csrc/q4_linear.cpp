// int4 weights x int8 activations on AVX-512 VNNI: the CPU decode matmul.
//
// Why our own kernel: at one or a few rows a decode step is a matrix-vector product bound by reading the
// weights. torch's int4 CPU kernel dequantizes every weight to floats and multiplies in fp32, which on two
// cores costs more than the memory traffic it saves. Here the activations are quantized once per call to
// int8 (one scale per group of 32), and each 64 weights take one unpack and one `vpdpbusd` (64 u8 x s8
// products summed into 16 int32 lanes), so the matmul runs near the memory bandwidth.
//
// Weight format (built by `pack_q4` in layers/q4.py): per output row, groups of 32 along K with an
// asymmetric 4-bit code, w = q * scale + min, q in 0..15. Codes are packed in spans of 128 weights: byte j
// of a span holds weight j in its low nibble and weight 64 + j in its high nibble, so one 64-byte load and
// two masks give the span's two 64-weight halves in order. Scales and mins are fp16, [N, K / 32].
//
// Per row n and group g: sum_k w_k x_k = scale * sum_k q_k x_k + min * sum_k x_k, and the first sum is
// taken in integers against x quantized to int8 (x ~ d_g * qa), the second exactly in fp32.

#include <immintrin.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "ops.h"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

namespace {

constexpr int kGroup = 32;
constexpr int kSpan = 128;            // weights per 64-byte load
constexpr int kBlockGroups = 16;      // groups whose scales fill one 16-lane vector
constexpr int kRowTile = 32;          // output rows per task: weights stay in L2 while every input row uses them

struct QuantizedRows {
    std::vector<int8_t> qa;   // [M, K]
    std::vector<float> d;     // [M, G] scale of each group of 32
    std::vector<float> xsum;  // [M, G] exact sum of each group
};

// Quantize x [M, K] (fp32 or bf16) to int8 per group of 32, symmetric.
QuantizedRows quantize_rows(const at::Tensor& x) {
    const int64_t m = x.size(0), k = x.size(1), g = k / kGroup;
    QuantizedRows out{std::vector<int8_t>(m * k), std::vector<float>(m * g), std::vector<float>(m * g)};
    at::Tensor xf = x.scalar_type() == at::kFloat ? x : x.to(at::kFloat);
    const float* src = xf.data_ptr<float>();
    for (int64_t r = 0; r < m * g; ++r) {
        const float* v = src + r * kGroup;
        __m512 a = _mm512_loadu_ps(v), b = _mm512_loadu_ps(v + 16);
        float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
        out.xsum[r] = _mm512_reduce_add_ps(_mm512_add_ps(a, b));
        float d = amax / 127.0f;
        out.d[r] = d;
        __m512 inv = _mm512_set1_ps(d > 0.0f ? 127.0f / amax : 0.0f);
        __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(a, inv));  // round to nearest even
        __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(b, inv));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out.qa.data() + r * kGroup), _mm512_cvtsepi32_epi8(qa));
        _mm_storeu_si128(reinterpret_cast<__m128i*>(out.qa.data() + r * kGroup + 16), _mm512_cvtsepi32_epi8(qb));
    }
    return out;
}

// Lane l of chunk c (0..7, 64 weights = 2 groups) reads group 2c for lanes 0-7 and 2c+1 for lanes 8-15:
// the int32 lanes vpdpbusd leaves, 4 bytes each, line up with the groups that way.
inline __m512i chunk_index(int c) {
    return _mm512_set_epi32(2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1, 2 * c + 1,
                            2 * c + 1, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c, 2 * c);
}

// Dot products of R consecutive weight rows with one quantized input row.
template <int R>
inline void rows_dot(const uint8_t* packed, const at::Half* scales, const at::Half* mins, int64_t k, int64_t g,
                     const int8_t* qa, const float* d, const float* xsum, float* out) {
    const __m512i nibble = _mm512_set1_epi8(0x0F);
    const __m512i zero = _mm512_setzero_si512();
    __m512 acc[R];
    for (int r = 0; r < R; ++r) acc[r] = _mm512_setzero_ps();
    for (int64_t g0 = 0; g0 < g; g0 += kBlockGroups) {
        const int ng = static_cast<int>(std::min<int64_t>(kBlockGroups, g - g0));
        const __mmask16 mask = static_cast<__mmask16>((1u << ng) - 1u);
        const __m512 dv = _mm512_maskz_loadu_ps(mask, d + g0);
        const __m512 xs = _mm512_maskz_loadu_ps(mask, xsum + g0);
        __m512 sd[R];
        for (int r = 0; r < R; ++r) {
            const __m512 s = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, scales + r * g + g0));
            const __m512 mn = _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(mask, mins + r * g + g0));
            sd[r] = _mm512_mul_ps(s, dv);
            acc[r] = _mm512_fmadd_ps(mn, xs, acc[r]);
        }
        for (int sp = 0; sp < ng / 4; ++sp) {
            const int64_t k0 = (g0 + 4 * sp) * kGroup;
            const __m512i alo = _mm512_loadu_si512(qa + k0);
            const __m512i ahi = _mm512_loadu_si512(qa + k0 + 64);
            const __m512i ilo = chunk_index(2 * sp), ihi = chunk_index(2 * sp + 1);
            for (int r = 0; r < R; ++r) {
                // Each row is a short stream (448 bytes at K = 896) that the hardware prefetcher does not
                // pick up in time; fetching the rows two calls ahead lifted the model's matmuls from ~21 to
                // ~25 GB/s here.
                _mm_prefetch(reinterpret_cast<const char*>(packed + (r + 2 * R) * (k / 2) + k0 / 2), _MM_HINT_T0);
                const __m512i w = _mm512_loadu_si512(packed + r * (k / 2) + k0 / 2);
                const __m512i wlo = _mm512_and_si512(w, nibble);
                const __m512i whi = _mm512_and_si512(_mm512_srli_epi16(w, 4), nibble);
                const __m512 plo = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, wlo, alo));
                const __m512 phi = _mm512_cvtepi32_ps(_mm512_dpbusd_epi32(zero, whi, ahi));
                acc[r] = _mm512_fmadd_ps(plo, _mm512_permutexvar_ps(ilo, sd[r]), acc[r]);
                acc[r] = _mm512_fmadd_ps(phi, _mm512_permutexvar_ps(ihi, sd[r]), acc[r]);
            }
        }
    }
    for (int r = 0; r < R; ++r) out[r] = _mm512_reduce_add_ps(acc[r]);
}

}  // namespace

// y[M, N] = x[M, K] @ W^T (+ bias), W given as (packed [N, K/2] u8, scales [N, K/32] f16, mins [N, K/32] f16).
// x is fp32 or bf16; y has x's dtype. K must be a multiple of 128.
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                     const at::Tensor& mins, const c10::optional<at::Tensor>& bias) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "q4_linear: x must be a contiguous [M, K] tensor");
    TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16, "q4_linear: x must be fp32 or bf16");
    const int64_t m = x.size(0), k = x.size(1), n = packed.size(0), g = k / kGroup;
    TORCH_CHECK(k % kSpan == 0, "q4_linear: K must be a multiple of 128");
    TORCH_CHECK(packed.size(1) == k / 2 && scales.size(0) == n && scales.size(1) == g && mins.sizes() == scales.sizes(),
                "q4_linear: weight shapes do not match x");
    const QuantizedRows q = quantize_rows(x);
    at::Tensor y32 = at::empty({m, n}, x.options().dtype(at::kFloat));
    float* yp = y32.data_ptr<float>();
    const uint8_t* pw = packed.data_ptr<uint8_t>();
    const at::Half* ps = scales.data_ptr<at::Half>();
    const at::Half* pm = mins.data_ptr<at::Half>();
    const int64_t tiles = (n + kRowTile - 1) / kRowTile;
    at::parallel_for(0, tiles, 1, [&](int64_t t0, int64_t t1) {
        float tmp[4];
        for (int64_t t = t0; t < t1; ++t) {
            const int64_t r0 = t * kRowTile, r1 = std::min(n, r0 + kRowTile);
            for (int64_t i = 0; i < m; ++i) {
                const int8_t* qa = q.qa.data() + i * k;
                const float* d = q.d.data() + i * g;
                const float* xs = q.xsum.data() + i * g;
                float* yrow = yp + i * n;
                int64_t r = r0;
                for (; r + 4 <= r1; r += 4) {
                    rows_dot<4>(pw + r * (k / 2), ps + r * g, pm + r * g, k, g, qa, d, xs, tmp);
                    std::copy(tmp, tmp + 4, yrow + r);
                }
                for (; r < r1; ++r) rows_dot<1>(pw + r * (k / 2), ps + r * g, pm + r * g, k, g, qa, d, xs, yrow + r);
            }
        }
    });
    if (bias.has_value()) y32.add_(*bias);
    return x.scalar_type() == at::kFloat ? y32 : y32.to(x.scalar_type());
}
