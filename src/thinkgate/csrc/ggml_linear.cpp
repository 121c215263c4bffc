// The GGUF file's own quantized blocks, multiplied as stored: the CPU linears of `--weight-quant gguf`.
//
// Why: re-quantizing a GGUF's weights into our int4/int8 forms changes the model a second time (issue 19
// measured 0/16 greedy answers identical to the exact model that way, against llama.cpp's 8/16). Here each
// weight row stays in the file's blocks and the product is llama.cpp's: the input row is quantized into
// its 8-bit activation blocks (Q8_0 for Q4_0/Q5_0/Q8_0, Q8_1 for the types with a min, Q8_K for the
// K-quants; the same rounding as ggml's x86 code), each block's products are summed in integers, scaled
// in fp32 and accumulated, block after block. The per-block sums are exact, so the only difference from
// ggml is the order in which fp32 adds the blocks' contributions.
//
// Every dot product has a scalar form (any CPU; the reference the tests compare the AVX2 form against)
// and an AVX2 form (vpmaddubsw: 32 u8 x s8 products per instruction, as ggml's x86 code), chosen at
// compile time; `scalar` forces the scalar one for tests.

#include "ggml_blocks.h"
#include "ggml_codes.h"
#include "dynamic_for.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstddef>
#include <cstring>
#include <tuple>
#include <type_traits>
#include <vector>

using namespace ggml;

// The unpacking helpers return vectors through pointers: inlined, those stay in registers; called, each is a store
// and a reload per block (measured: an un-inlined helper cost the one-row kernels ~30%).
#define TG_INLINE inline __attribute__((always_inline))

namespace {

// ---- activation blocks (ggml's quantize_row_q8_0 / q8_1 on x86, quantize_row_q8_K_ref) ----

void quantize_q8_0(const float* x, BlockQ8_0* y, int64_t k, bool with_sum, BlockQ8_1* y1) {
    for (int64_t b = 0; b < k / QK; ++b, x += QK) {
        float amax = 0.0f;
        for (int j = 0; j < QK; ++j) amax = std::max(amax, std::fabs(x[j]));
        const float d = amax / 127.f;
        const float id = amax != 0.0f ? 127.f / amax : 0.0f;
        int8_t* qs = with_sum ? y1[b].qs : y[b].qs;
        int sum = 0;
        for (int j = 0; j < QK; ++j) {
            qs[j] = static_cast<int8_t>(rne(x[j] * id));
            sum += qs[j];
        }
        if (with_sum) {
            y1[b].d = f2h(d);
            y1[b].s = f2h(d * static_cast<float>(sum));
        } else {
            y[b].d = f2h(d);
        }
    }
}

void quantize_q8_k(const float* x, BlockQ8_K* y, int64_t k) {
    for (int64_t b = 0; b < k / QKK; ++b, x += QKK) {
        float max = 0.0f, amax = 0.0f;
        for (int j = 0; j < QKK; ++j) {
            const float ax = std::fabs(x[j]);
            if (ax > amax) { amax = ax; max = x[j]; }
        }
        if (amax == 0.0f) {
            std::memset(&y[b], 0, sizeof(BlockQ8_K));
            continue;
        }
        const float iscale = -127.f / max;
        for (int j = 0; j < QKK; ++j) y[b].qs[j] = static_cast<int8_t>(std::min(127, rne(iscale * x[j])));
        for (int g = 0; g < QKK / 16; ++g) {
            int sum = 0;
            for (int j = 0; j < 16; ++j) sum += y[b].qs[16 * g + j];
            y[b].bsums[g] = static_cast<int16_t>(sum);
        }
        y[b].d = 1.f / iscale;
    }
}

// The 16-bit blocks of one row; with AVX2 the same codes (quantize16x32_avx2), ~10x faster: a decode step quantizes
// each linear's input rows before its kernels run, on one thread.
void quantize_q16_0(const float* x, BlockQ16_0* y, int64_t k) {
    for (int64_t b = 0; b < k / QK; ++b, x += QK) {
#ifdef __AVX2__
        const float amax = absmax_avx2(x, QK);
        const float d = amax / kQ16, id = amax != 0.0f ? kQ16 / amax : 0.0f;
        y[b].d = d;
        y[b].s = d * static_cast<float>(quantize16x32_avx2(x, id, y[b].qs));
#else
        const float amax = absmax(x, QK);
        const float d = amax / kQ16, id = amax != 0.0f ? kQ16 / amax : 0.0f;
        y[b].d = d;
        y[b].s = d * static_cast<float>(quantize16(x, QK, id, y[b].qs));
#endif
    }
}

// Q16_0 blocks regrouped for an R4L kernel: code n of block b of each 4 goes where the kernel's widened weight
// vectors meet it (ggml_blocks.h); `q5` for Q5_0's slots (whose codes arrive x 256: the scales carry 1 / 256,
// exactly, as a power of two), else Q8_0's.
void regroup_q16_0l(const BlockQ16_0* x, BlockQ16_0L* y, int64_t groups, bool q5) {
    const float unit = q5 ? 1.0f / 256.0f : 1.0f;
    for (int64_t g = 0; g < groups; ++g, x += 4) {
#ifdef __AVX2__
        // As int32 pairs of codes, (block b, codes 16h + 2c .. +1) goes to pair 8c + 4h + b: an 8 x 8 transpose of
        // rows (h, b) -> rows c. Q5_0's vector 2v (even bytes) meets codes 4v and 4v + 2 of a lane, 2v + 1 (odd
        // bytes) codes 4v + 1 and 4v + 3: each 4 codes are first reordered to (0, 2, 1, 3), within 128-bit lanes.
        const __m256i order = _mm256_setr_epi8(0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15,
                                               0, 1, 4, 5, 2, 3, 6, 7, 8, 9, 12, 13, 10, 11, 14, 15);
        __m256i r[8], t[8];
        for (int h = 0; h < 2; ++h)
            for (int b = 0; b < 4; ++b) {
                r[4 * h + b] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs + 16 * h));
                if (q5) r[4 * h + b] = _mm256_shuffle_epi8(r[4 * h + b], order);
            }
        for (int i = 0; i < 8; i += 2) {
            t[i] = _mm256_unpacklo_epi32(r[i], r[i + 1]);
            t[i + 1] = _mm256_unpackhi_epi32(r[i], r[i + 1]);
        }
        for (int i = 0; i < 8; i += 4) {
            r[i] = _mm256_unpacklo_epi64(t[i], t[i + 2]);
            r[i + 1] = _mm256_unpackhi_epi64(t[i], t[i + 2]);
            r[i + 2] = _mm256_unpacklo_epi64(t[i + 1], t[i + 3]);
            r[i + 3] = _mm256_unpackhi_epi64(t[i + 1], t[i + 3]);
        }
        for (int i = 0; i < 4; ++i) {
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[g].qs + 16 * i), _mm256_permute2x128_si256(r[i], r[i + 4], 0x20));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[g].qs + 16 * (i + 4)), _mm256_permute2x128_si256(r[i], r[i + 4], 0x31));
        }
        for (int b = 0; b < 4; ++b) y[g].d[b] = x[b].d * unit;
#else
        for (int b = 0; b < 4; ++b) {
            y[g].d[b] = x[b].d * unit;
            for (int n = 0; n < QK; ++n) {
                int v, j;
                if (q5) {
                    q5l_slot(b, n, v, j);
                    y[g].qs[32 * v + 16 * (j % 2) + j / 2] = x[b].qs[n];
                } else {
                    r4l_slot(b, n, v, j);
                    y[g].qs[32 * v + j] = x[b].qs[n];
                }
            }
        }
#endif
    }
}

void quantize_q16_k(const float* x, BlockQ16_K* y, int64_t k) {
    for (int64_t b = 0; b < k / QKK; ++b, x += QKK) {
#ifdef __AVX2__
        const float amax = absmax_avx2(x, QKK);
        const float id = amax != 0.0f ? kQ16 / amax : 0.0f;
        y[b].d = amax / kQ16;
        for (int g = 0; g < QKK / 32; ++g) y[b].bsums[g] = quantize16x32_avx2(x + 32 * g, id, y[b].qs + 32 * g);
#else
        const float amax = absmax(x, QKK);
        const float id = amax != 0.0f ? kQ16 / amax : 0.0f;
        y[b].d = amax / kQ16;
        for (int g = 0; g < QKK / 32; ++g) y[b].bsums[g] = static_cast<int32_t>(quantize16(x + 32 * g, 32, id, y[b].qs + 32 * g));
#endif
    }
}

void split_q16_k(const BlockQ16_K* x, BlockQ16_KS* y, int64_t nb) {
    for (int64_t b = 0; b < nb; ++b) {
        y[b].d = x[b].d;
        std::memcpy(y[b].bsums, x[b].bsums, sizeof(y[b].bsums));
        for (int j = 0; j < QKK; ++j) {
            y[b].lo[j] = static_cast<uint8_t>(x[b].qs[j] & 0xFF);
            y[b].hi[j] = static_cast<int8_t>(x[b].qs[j] >> 8);  // arithmetic shift: 256 * hi + lo == qs
        }
    }
}

// ---- dot products of one weight row with one quantized input row ----

float dot_scalar(int type, const uint8_t* w, const void* act, int64_t k) {
    float sum = 0.0f;
    int q[QKK];
    if (type == Q4_K || type == Q5_K || type == Q6_K) {
        const int bb = type == Q6_K ? sizeof(BlockQ6_K) : type == Q5_K ? sizeof(BlockQ5_K) : sizeof(BlockQ4_K);
        auto y = static_cast<const BlockQ8_K*>(act);
        int sc16[16], m16[16];
        for (int64_t b = 0; b < k / QKK; ++b) {
            float d, dmin;
            codes256(type, w + b * bb, q, sc16, m16, d, dmin);
            int sumi = 0, summ = 0;
            for (int g = 0; g < 16; ++g) {
                int s = 0;
                for (int j = 0; j < 16; ++j) s += q[16 * g + j] * y[b].qs[16 * g + j];
                sumi += sc16[g] * s;
                summ += m16[g] * y[b].bsums[g];
            }
            sum += y[b].d * d * static_cast<float>(sumi) - y[b].d * dmin * static_cast<float>(summ);
        }
        return sum;
    }
    const int bb = type == Q4_0 ? sizeof(BlockQ4_0) : type == Q4_1 ? sizeof(BlockQ4_1) : type == Q5_0 ? sizeof(BlockQ5_0)
                 : type == Q5_1 ? sizeof(BlockQ5_1) : sizeof(BlockQ8_0);
    const bool with_min = type == Q4_1 || type == Q5_1;
    for (int64_t b = 0; b < k / QK; ++b) {
        float d, m;
        codes32(type, w + b * bb, q, d, m);
        const int8_t* qa = with_min ? static_cast<const BlockQ8_1*>(act)[b].qs : static_cast<const BlockQ8_0*>(act)[b].qs;
        int sumi = 0;
        for (int j = 0; j < QK; ++j) sumi += q[j] * qa[j];
        if (with_min) {
            const BlockQ8_1& y = static_cast<const BlockQ8_1*>(act)[b];
            sum += d * h2f(y.d) * static_cast<float>(sumi) + m * h2f(y.s);
        } else {
            sum += d * h2f(static_cast<const BlockQ8_0*>(act)[b].d) * static_cast<float>(sumi);
        }
    }
    return sum;
}

// The same products with 16-bit activation blocks (Q16_0 / Q16_K). A K-quant super-block's integer sum can pass
// 2^31 (Q6_K: 256 x 4096 x 32767), so the scalar form sums in 64 bits; the AVX2 form converts each half.
float dot16_scalar(int type, const uint8_t* w, const void* act, int64_t k) {
    float sum = 0.0f;
    int q[QKK];
    if (type == Q4_K || type == Q5_K || type == Q6_K) {
        const int bb = type == Q6_K ? sizeof(BlockQ6_K) : type == Q5_K ? sizeof(BlockQ5_K) : sizeof(BlockQ4_K);
        auto y = static_cast<const BlockQ16_K*>(act);
        int sc16[16], m16[16];
        for (int64_t b = 0; b < k / QKK; ++b) {
            float d, dmin;
            codes256(type, w + b * bb, q, sc16, m16, d, dmin);
            int64_t sumi = 0, summ = 0;
            for (int g = 0; g < 16; ++g) {
                int64_t s = 0;
                for (int j = 0; j < 16; ++j) s += q[16 * g + j] * y[b].qs[16 * g + j];
                sumi += sc16[g] * s;
            }
            for (int g = 0; g < 8; ++g) summ += m16[2 * g] * static_cast<int64_t>(y[b].bsums[g]);
            sum += y[b].d * d * static_cast<float>(sumi) - y[b].d * dmin * static_cast<float>(summ);
        }
        return sum;
    }
    const int bb = type == Q4_0 ? sizeof(BlockQ4_0) : type == Q4_1 ? sizeof(BlockQ4_1) : type == Q5_0 ? sizeof(BlockQ5_0)
                 : type == Q5_1 ? sizeof(BlockQ5_1) : sizeof(BlockQ8_0);
    auto y = static_cast<const BlockQ16_0*>(act);
    for (int64_t b = 0; b < k / QK; ++b) {
        float d, m;
        codes32(type, w + b * bb, q, d, m);
        int sumi = 0;
        for (int j = 0; j < QK; ++j) sumi += q[j] * y[b].qs[j];
        sum += d * y[b].d * static_cast<float>(sumi) + m * y[b].s;
    }
    return sum;
}

#ifdef __AVX2__

inline float hsum8(__m256 v) {
    __m128 r = _mm_add_ps(_mm256_extractf128_ps(v, 1), _mm256_castps256_ps128(v));
    r = _mm_add_ps(r, _mm_movehl_ps(r, r));
    r = _mm_add_ss(r, _mm_movehdup_ps(r));
    return _mm_cvtss_f32(r);
}

// The 32 low-then-high nibbles of 16 bytes, each in 0..15.
TG_INLINE __m256i nibbles32(const uint8_t* p) {
    const __m128i t = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
    return _mm256_and_si256(_mm256_set_m128i(_mm_srli_epi16(t, 4), t), _mm256_set1_epi8(0x0F));
}

// 32 bits -> 32 bytes, 0xFF where the bit is set.
TG_INLINE __m256i bits32(const uint8_t* p) {
    uint32_t v;
    std::memcpy(&v, p, 4);
    const __m256i spread = _mm256_shuffle_epi8(_mm256_set1_epi32(static_cast<int>(v)),
                                               _mm256_set_epi64x(0x0303030303030303, 0x0202020202020202,
                                                                 0x0101010101010101, 0x0000000000000000));
    const __m256i probe = _mm256_set1_epi64x(0x7fbfdfeff7fbfdfe);
    return _mm256_cmpeq_epi8(_mm256_or_si256(spread, probe), _mm256_set1_epi64x(-1));
}

// Sum of 32 u8 x s8 products in 8 int32 lanes (pairs can't saturate: |u| <= 128, |s| <= 127).
TG_INLINE __m256i dot_us8(__m256i u, __m256i s) {
    return _mm256_madd_epi16(_mm256_maddubs_epi16(u, s), _mm256_set1_epi16(1));
}
inline __m256i dot_ss8(__m256i a, __m256i b) { return dot_us8(_mm256_sign_epi8(a, a), _mm256_sign_epi8(b, a)); }

// Block b of a legacy-type row as 32 byte codes (signed; 0..31 for Q4_1/Q5_1, whose min is mx), and its scale.
TG_INLINE __m256i legacy_codes_avx2(int type, const uint8_t* w, int64_t b, float& dx, float& mx) {
    __m256i qx;
    mx = 0.0f;
    switch (type) {
        case Q4_0: {
            auto x = reinterpret_cast<const BlockQ4_0*>(w) + b;
            qx = _mm256_sub_epi8(nibbles32(x->qs), _mm256_set1_epi8(8));
            dx = h2f(x->d);
            break;
        }
        case Q5_0: {
            auto x = reinterpret_cast<const BlockQ5_0*>(w) + b;
            // Without its fifth bit a code is nibble - 16: setting the top nibble does that in int8.
            const __m256i hi = _mm256_andnot_si256(bits32(x->qh), _mm256_set1_epi8(static_cast<char>(0xF0)));
            qx = _mm256_or_si256(nibbles32(x->qs), hi);
            dx = h2f(x->d);
            break;
        }
        case Q4_1: {
            auto x = reinterpret_cast<const BlockQ4_1*>(w) + b;
            qx = nibbles32(x->qs);
            dx = h2f(x->d);
            mx = h2f(x->m);
            break;
        }
        case Q5_1: {
            auto x = reinterpret_cast<const BlockQ5_1*>(w) + b;
            qx = _mm256_or_si256(nibbles32(x->qs), _mm256_and_si256(bits32(x->qh), _mm256_set1_epi8(0x10)));
            dx = h2f(x->d);
            mx = h2f(x->m);
            break;
        }
        default: {  // Q8_0
            auto x = reinterpret_cast<const BlockQ8_0*>(w) + b;
            qx = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x->qs));
            dx = h2f(x->d);
        }
    }
    return qx;
}

// One weight row against NA input rows at once: each block of weights is unpacked once and used NA times
// (prefill, batched decode). Every (weight row, input row) pair gets exactly the operations, in the order, of
// NA = 1, so a row's result never depends on which rows share its call (speculative verification and
// batching rely on that).
template <int NA>
void dot_legacy_avx2(int type, const uint8_t* w, const void* const* act, int64_t k, float* out) {
    __m256 acc[NA];
    float summ[NA];
    for (int j = 0; j < NA; ++j) { acc[j] = _mm256_setzero_ps(); summ[j] = 0.0f; }
    const int64_t nb = k / QK;
    const bool with_min = type == Q4_1 || type == Q5_1;
    for (int64_t b = 0; b < nb; ++b) {
        float dx, mx;
        const __m256i qx = legacy_codes_avx2(type, w, b, dx, mx);
        if (with_min) {
            for (int j = 0; j < NA; ++j) {
                auto y = static_cast<const BlockQ8_1*>(act[j]) + b;
                const __m256i qy = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y->qs));
                summ[j] += mx * h2f(y->s);
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dx * h2f(y->d)), _mm256_cvtepi32_ps(dot_us8(qx, qy)), acc[j]);
            }
        } else {
            const __m256i ax = _mm256_sign_epi8(qx, qx);
            for (int j = 0; j < NA; ++j) {
                auto y = static_cast<const BlockQ8_0*>(act[j]) + b;
                const __m256i qy = _mm256_sign_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(y->qs)), qx);
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dx * h2f(y->d)), _mm256_cvtepi32_ps(dot_us8(ax, qy)), acc[j]);
            }
        }
    }
    for (int j = 0; j < NA; ++j) out[j] = hsum8(acc[j]) + summ[j];
}

// Two int16 scales over a 32-lane product: lanes 0-7 (codes 0-15) get a, lanes 8-15 (codes 16-31) get b.
inline __m256i scale_pair(int a, int b) { return _mm256_set_m128i(_mm_set1_epi16(static_cast<short>(b)), _mm_set1_epi16(static_cast<short>(a))); }

// The 128 codes (0..63, not yet centred) of half n of a Q6_K super-block: c[i] holds codes 128n + 32i .. +31.
TG_INLINE void q6k_codes(const BlockQ6_K* x, int n, __m256i* c) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const uint8_t* ql = x->ql + 64 * n;
    const __m256i l0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql));
    const __m256i l1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(ql + 32));
    const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x->qh + 32 * n));
    c[0] = _mm256_or_si256(_mm256_and_si256(l0, m4), _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(3)), 4));
    c[1] = _mm256_or_si256(_mm256_and_si256(l1, m4), _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(12)), 2));
    c[2] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l0, 4), m4), _mm256_and_si256(h, _mm256_set1_epi8(48)));
    c[3] = _mm256_or_si256(_mm256_and_si256(_mm256_srli_epi16(l1, 4), m4),
                           _mm256_srli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(static_cast<char>(0xC0))), 2));
}

// Codes 64i .. 64i + 31 (lo) and 64i + 32 .. 64i + 63 (hi) of a Q4_K / Q5_K super-block as bytes (0..15 / 0..31);
// hbits: Q5_K's fifth bits, or null for Q4_K.
TG_INLINE void k45_codes(const uint8_t* qs, const __m256i* hbits, int i, __m256i& lo, __m256i& hi) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(qs + 32 * i));
    lo = _mm256_and_si256(bits, m4);
    hi = _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4);
    if (hbits) {
        const __m256i one = _mm256_set1_epi8(1);
        lo = _mm256_or_si256(lo, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(*hbits, 2 * i), one), 4));
        hi = _mm256_or_si256(hi, _mm256_slli_epi16(_mm256_and_si256(_mm256_srli_epi16(*hbits, 2 * i + 1), one), 4));
    }
}

template <int NA>
void dot_k_avx2(int type, const uint8_t* w, const void* const* act, int64_t k, float* out) {
    __m256 acc[NA];
    float summ[NA];
    for (int j = 0; j < NA; ++j) { acc[j] = _mm256_setzero_ps(); summ[j] = 0.0f; }
    for (int64_t b = 0; b < k / QKK; ++b) {
        __m256i sumi[NA];
        for (int j = 0; j < NA; ++j) sumi[j] = _mm256_setzero_si256();
        if (type == Q6_K) {
            auto x = reinterpret_cast<const BlockQ6_K*>(w) + b;
            const int8_t* sc = x->scales;
            for (int n = 0; n < 2; ++n) {
                __m256i c[4];
                q6k_codes(x, n, c);
                for (int i = 0; i < 4; ++i) {
                    const __m256i s2 = scale_pair(sc[8 * n + 2 * i], sc[8 * n + 2 * i + 1]);
                    for (int j = 0; j < NA; ++j) {
                        const int8_t* q8 = static_cast<const BlockQ8_K*>(act[j])[b].qs + 128 * n + 32 * i;
                        const __m256i a = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8));
                        // codes 0..63: pair sums fit int16
                        sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(_mm256_maddubs_epi16(c[i], a), s2));
                    }
                }
            }
            const float dx = h2f(x->d);
            for (int j = 0; j < NA; ++j) {
                const BlockQ8_K& y = static_cast<const BlockQ8_K*>(act[j])[b];
                int centre = 0;  // 32 * sum(scale * bsum): the codes' offset, taken out once per super-block
                for (int g = 0; g < 16; ++g) centre += sc[g] * y.bsums[g];
                const __m256i s = _mm256_sub_epi32(sumi[j], _mm256_setr_epi32(32 * centre, 0, 0, 0, 0, 0, 0, 0));
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(y.d * dx), _mm256_cvtepi32_ps(s), acc[j]);
            }
            continue;
        }
        const bool five = type == Q5_K;
        const uint8_t* blk = w + b * (five ? sizeof(BlockQ5_K) : sizeof(BlockQ4_K));
        const uint8_t* scales = five ? reinterpret_cast<const BlockQ5_K*>(blk)->scales : reinterpret_cast<const BlockQ4_K*>(blk)->scales;
        const uint8_t* qs = five ? reinterpret_cast<const BlockQ5_K*>(blk)->qs : reinterpret_cast<const BlockQ4_K*>(blk)->qs;
        const float dx = h2f(five ? reinterpret_cast<const BlockQ5_K*>(blk)->d : reinterpret_cast<const BlockQ4_K*>(blk)->d);
        const float mx = h2f(five ? reinterpret_cast<const BlockQ5_K*>(blk)->dmin : reinterpret_cast<const BlockQ4_K*>(blk)->dmin);
        int sc[8], mn[8];
        for (int s = 0; s < 8; ++s) scale_min_k4(s, scales, sc[s], mn[s]);
        const __m256i hbits = five ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(reinterpret_cast<const BlockQ5_K*>(blk)->qh))
                                   : _mm256_setzero_si256();
        for (int i = 0; i < 4; ++i) {
            __m256i lo, hi;
            k45_codes(qs, five ? &hbits : nullptr, i, lo, hi);
            const __m256i slo = _mm256_set1_epi16(static_cast<short>(sc[2 * i]));
            const __m256i shi = _mm256_set1_epi16(static_cast<short>(sc[2 * i + 1]));
            for (int j = 0; j < NA; ++j) {
                const int8_t* q8 = static_cast<const BlockQ8_K*>(act[j])[b].qs + 64 * i;
                const __m256i alo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8));
                const __m256i ahi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(q8 + 32));
                sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(_mm256_maddubs_epi16(lo, alo), slo));
                sumi[j] = _mm256_add_epi32(sumi[j], _mm256_madd_epi16(_mm256_maddubs_epi16(hi, ahi), shi));
            }
        }
        for (int j = 0; j < NA; ++j) {
            const BlockQ8_K& y = static_cast<const BlockQ8_K*>(act[j])[b];
            int mins = 0;
            for (int s = 0; s < 8; ++s) mins += mn[s] * (y.bsums[2 * s] + y.bsums[2 * s + 1]);
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(y.d * dx), _mm256_cvtepi32_ps(sumi[j]), acc[j]);
            summ[j] += y.d * mx * static_cast<float>(mins);
        }
    }
    for (int j = 0; j < NA; ++j) out[j] = hsum8(acc[j]) - summ[j];
}

// The low nibbles of an R4 group's 4 blocks (0..15 as bytes) and its fifth-bit planes in both 128-bit halves.
template <class Block>
TG_INLINE __m256i q5r4_nibbles(const Block* x, __m256i* nib) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    const __m256i n01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x->nib01));
    const __m256i n23 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x->nib23));
    nib[0] = _mm256_and_si256(n01, m4);
    nib[1] = _mm256_and_si256(_mm256_srli_epi16(n01, 4), m4);
    nib[2] = _mm256_and_si256(n23, m4);
    nib[3] = _mm256_and_si256(_mm256_srli_epi16(n23, 4), m4);
    return _mm256_broadcastsi128_si256(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x->hb)));
}

// The 4 x 32 codes of an R4 group as unsigned bytes, code + 16 (0..31).
template <class Block>
TG_INLINE void q5r4_codes(const Block* x, __m256i* u) {
    const __m256i b5 = _mm256_set1_epi8(0x10);
    __m256i nib[4];
    const __m256i planes = q5r4_nibbles(x, nib);
    for (int bk = 0; bk < 4; ++bk) {
        const __m256i mask = _mm256_set_m128i(_mm_set1_epi8(static_cast<char>(1 << (bk + 4))), _mm_set1_epi8(static_cast<char>(1 << bk)));
        u[bk] = _mm256_or_si256(nib[bk], _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(planes, mask), mask), b5));
    }
}

// Q5_0 in the R4 layout: per 4 blocks, one broadcast of the bit planes, two nibble loads. The int32 lane
// sums equal the signed kernel's exactly and the fp32 operations are the same, so results are bit-identical
// to dot_legacy_avx2 on the original blocks (tested).
template <int NA>
void dot_q5r4_avx2(const uint8_t* w, const void* const* act, int64_t k, float* out) {
    __m256 acc[NA];
    for (int j = 0; j < NA; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < k / (4 * QK); ++g) {
        auto x = reinterpret_cast<const BlockQ5_0R4*>(w) + g;
        __m256i codes[4];
        q5r4_codes(x, codes);
        for (int bk = 0; bk < 4; ++bk) {
            const __m256i u = codes[bk];
            const __m256 dx = _mm256_set1_ps(x->d[bk]);
            for (int j = 0; j < NA; ++j) {
                auto y = static_cast<const BlockQ8_0L*>(act[j]) + 4 * g + bk;
                const __m256i qy = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y->qs));
                const __m256i s = _mm256_sub_epi32(dot_us8(u, qy), _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y->corr)));
                acc[j] = _mm256_fmadd_ps(_mm256_mul_ps(dx, _mm256_set1_ps(y->d)), _mm256_cvtepi32_ps(s), acc[j]);
            }
        }
    }
    for (int j = 0; j < NA; ++j) out[j] = hsum8(acc[j]);
}

// ---- one pass over 16-bit activation blocks (the default) ----
//
// Each weight block's codes are widened to int16 once (and, for the K-quants, multiplied by their sub-block's
// scale: at most 63 x 31 or 128 x 32 in magnitude) and each input row costs two vpmaddwd per 32 weights: half
// the instructions of two 8-bit passes, with as many bits (~15). Lane sums stay in int32: a 32-weight block
// sums 4 products per lane (< 2^25); a K-quant half super-block 16 (< 2^31 even for Q6_K's 4096 x 32767).

// 32 byte codes -> two vectors of 16 int16 (signed).
TG_INLINE void widen(__m256i c, __m256i& lo, __m256i& hi) {
    lo = _mm256_cvtepi8_epi16(_mm256_castsi256_si128(c));
    hi = _mm256_cvtepi8_epi16(_mm256_extracti128_si256(c, 1));
}
// Sum of 32 int16 products in 8 int32 lanes.
TG_INLINE __m256i dot16x32(__m256i lo, __m256i hi, const int16_t* a) {
    return _mm256_add_epi32(_mm256_madd_epi16(lo, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                            _mm256_madd_epi16(hi, _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16))));
}

// The block type is a template argument: with it a run-time switch per block (legacy_codes_avx2) folds away, and
// Q8_0's codes are widened straight from memory (no 256-bit load and lane extract): the output head's kernel,
// ~30% fewer cycles in cache, the same results bit for bit.
template <int TYPE, int NA>
void dot16_legacy_t(const uint8_t* w, const void* const* act, int64_t k, float* out) {
    constexpr bool with_min = TYPE == Q4_1 || TYPE == Q5_1;
    __m256 acc[NA];
    float summ[NA];
    for (int j = 0; j < NA; ++j) { acc[j] = _mm256_setzero_ps(); summ[j] = 0.0f; }
    for (int64_t b = 0; b < k / QK; ++b) {
        float dx, mx;
        __m256i lo, hi;
        if constexpr (TYPE == Q8_0) {
            auto x = reinterpret_cast<const BlockQ8_0*>(w) + b;
            lo = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x->qs)));
            hi = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x->qs + 16)));
            dx = h2f(x->d);
            mx = 0.0f;
        } else {
            widen(legacy_codes_avx2(TYPE, w, b, dx, mx), lo, hi);
        }
        for (int j = 0; j < NA; ++j) {
            auto y = static_cast<const BlockQ16_0*>(act[j]) + b;
            if constexpr (with_min) summ[j] += mx * y->s;
            acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(dx * y->d), _mm256_cvtepi32_ps(dot16x32(lo, hi, y->qs)), acc[j]);
        }
    }
    for (int j = 0; j < NA; ++j) out[j] = hsum8(acc[j]) + summ[j];
}

template <int NA>
void dot16_legacy_avx2(int type, const uint8_t* w, const void* const* act, int64_t k, float* out) {
    switch (type) {
        case Q4_0: dot16_legacy_t<Q4_0, NA>(w, act, k, out); break;
        case Q4_1: dot16_legacy_t<Q4_1, NA>(w, act, k, out); break;
        case Q5_0: dot16_legacy_t<Q5_0, NA>(w, act, k, out); break;
        case Q5_1: dot16_legacy_t<Q5_1, NA>(w, act, k, out); break;
        default: dot16_legacy_t<Q8_0, NA>(w, act, k, out);
    }
}

template <int NA>
void dot16_q5r4_avx2(const uint8_t* w, const void* const* act, int64_t k, float* out) {
    __m256 acc[NA];
    for (int j = 0; j < NA; ++j) acc[j] = _mm256_setzero_ps();
    const __m256i f0 = _mm256_set1_epi8(static_cast<char>(0xF0));
    for (int64_t g = 0; g < k / (4 * QK); ++g) {
        auto x = reinterpret_cast<const BlockQ5_0R4*>(w) + g;
        // The signed codes (-16..15) without building the unsigned ones first: a code is its nibble, or nibble - 16
        // (0xF0 | nibble in int8) where the fifth bit is clear. Shifting block bk's bit of each plane byte to bit 7
        // (by 7 - bk for weights 0-15, 3 - bk for 16-31: one variable shift per 32-bit lane) lets vpshufb of a
        // table of 0xF0 give 0 where it is set and 0xF0 where not: 3 operations a block where a compare and a
        // subtraction took 5 (~10 % of the kernel, BENCHMARKS.md "CPU, eighth round"). The same codes, bit for bit.
        // With many rows the registers go to the accumulators: there the unsigned codes of q5r4_codes, minus 16.
        __m256i codes[4];
        if constexpr (NA <= 2) {
            __m256i nib[4];
            const __m256i planes = q5r4_nibbles(x, nib);
            for (int bk = 0; bk < 4; ++bk) {
                const __m256i shift = _mm256_setr_epi32(7 - bk, 7 - bk, 7 - bk, 7 - bk, 3 - bk, 3 - bk, 3 - bk, 3 - bk);
                codes[bk] = _mm256_or_si256(nib[bk], _mm256_shuffle_epi8(f0, _mm256_sllv_epi32(planes, shift)));
            }
        } else {
            q5r4_codes(x, codes);
            for (int bk = 0; bk < 4; ++bk) codes[bk] = _mm256_sub_epi8(codes[bk], _mm256_set1_epi8(16));
        }
        for (int bk = 0; bk < 4; ++bk) {
            __m256i lo, hi;
            widen(codes[bk], lo, hi);
            for (int j = 0; j < NA; ++j) {
                auto y = static_cast<const BlockQ16_0*>(act[j]) + 4 * g + bk;
                acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(x->d[bk] * y->d), _mm256_cvtepi32_ps(dot16x32(lo, hi, y->qs)), acc[j]);
            }
        }
    }
    for (int j = 0; j < NA; ++j) out[j] = hsum8(acc[j]);
}

// Q5_0 in the R4L layout: a group's 8 widened code vectors meet the row's 8 activation chunks in 8 vpmaddwd whose
// int32 lanes each belong to one block (ggml_blocks.h), so the group's sums are added as integers and converted and
// scaled once per 4 blocks: per 32 weights and row 2 vpmaddwd and 2 vpaddd, a quarter of a conversion and an FMA,
// where the R4 kernel spends a conversion, an FMA, a scale product and its broadcast on every block. A lane's
// integer sum is exact (16 products of at most 16 x 32767 < 2^24, so its conversion is exact too); the float
// operations per (weight row, input row) are the same whatever rows share the call.
// An R4L group's 4 fp16 scales in its lanes: [d0 d1 d2 d3 d0 d1 d2 d3].
TG_INLINE __m256 scales4(const uint16_t* d) {
    uint64_t d4;
    std::memcpy(&d4, d, 8);
    const __m128 f = _mm_cvtph_ps(_mm_cvtsi64_si128(static_cast<long long>(d4)));
    return _mm256_set_m128(f, f);
}

// The rows' part of an R4L group: c16 the group's 8 widened code vectors, dx its blocks' scales in R4L's lanes.
template <int NA>
TG_INLINE void lanes_rows(const __m256i* c16, __m256 dx, const void* const* act, int64_t g, __m256* acc) {
    for (int j = 0; j < NA; ++j) {
        auto y = static_cast<const BlockQ16_0L*>(act[j]) + g;
        __m256i s = _mm256_madd_epi16(c16[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y->qs)));
        for (int c = 1; c < 8; ++c)
            s = _mm256_add_epi32(s, _mm256_madd_epi16(c16[c], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y->qs + 16 * c))));
        const __m256 d = _mm256_mul_ps(dx, _mm256_broadcast_ps(reinterpret_cast<const __m128*>(y->d)));
        acc[j] = _mm256_fmadd_ps(d, _mm256_cvtepi32_ps(s), acc[j]);
    }
}

// Eight rows of lanes_rows, written out: the same instructions per row (an exact int32 sum of the 8 products,
// its conversion, d = dx * dy, one FMA into the row's accumulator), so every row's bits equal lanes_rows'. Why by
// hand: with 8 code vectors and 8 accumulators live, GCC keeps the accumulators on the stack and reloads a code
// vector and dx for every row, ~3 loads per 32 weights and row where the products need 2; on this Zen 3 the
// kernel is bound by its loads (BENCHMARKS.md, "CPU, thirteenth round"). Here four accumulators stay in
// registers (a0-a3) and four in memory (am), the temporaries are ymm13-15: 8 rows of Q5_0 in cache 2.5 -> 2.1
// cycles per 32 weights and row. An asm statement takes at most 30 operands, hence two, of four rows each.
#if defined(__x86_64__) && defined(__GNUC__)
constexpr bool kRowsAsm = true;
#else
constexpr bool kRowsAsm = false;
#endif
// TG_SUM8: ymm13 = float(sum of c_v x the row's 16 int16 at byte D + 32v), v = 0..7 (an exact int32 sum).
#define TG_SUM8(P, D)                                                                                              \
    "vpmaddwd " D "+0(%[" P "],%[off]), %[c0], %%ymm13\n\t vpmaddwd " D "+32(%[" P "],%[off]), %[c1], %%ymm14\n\t"     \
    "vpaddd %%ymm14, %%ymm13, %%ymm13\n\t"                                                                          \
    "vpmaddwd " D "+64(%[" P "],%[off]), %[c2], %%ymm14\n\t vpmaddwd " D "+96(%[" P "],%[off]), %[c3], %%ymm15\n\t"    \
    "vpaddd %%ymm15, %%ymm14, %%ymm14\n\t vpaddd %%ymm14, %%ymm13, %%ymm13\n\t"                                     \
    "vpmaddwd " D "+128(%[" P "],%[off]), %[c4], %%ymm14\n\t vpmaddwd " D "+160(%[" P "],%[off]), %[c5], %%ymm15\n\t" \
    "vpaddd %%ymm15, %%ymm14, %%ymm14\n\t vpaddd %%ymm14, %%ymm13, %%ymm13\n\t"                                     \
    "vpmaddwd " D "+192(%[" P "],%[off]), %[c6], %%ymm14\n\t vpmaddwd " D "+224(%[" P "],%[off]), %[c7], %%ymm15\n\t" \
    "vpaddd %%ymm15, %%ymm14, %%ymm14\n\t vpaddd %%ymm14, %%ymm13, %%ymm13\n\t vcvtdq2ps %%ymm13, %%ymm13\n\t"
// ymm14 = the row's scale: R4L's 4 block scales (BlockQ16_0L.d, at 0) x dx's lanes; a K-quant's y.d (at 0) x dx.
#define TG_SCALE_LANES(P) "vbroadcastf128 (%[" P "],%[off]), %%ymm14\n\t vmulps %[dx], %%ymm14, %%ymm14\n\t"
#define TG_SCALE_ONE(P) "vmulss (%[" P "],%[off]), %[dx], %%xmm14\n\t vbroadcastss %%xmm14, %%ymm14\n\t"
#define TG_FMA_REG(A) "vfmadd231ps %%ymm13, %%ymm14, %[" A "]\n\t"
#define TG_FMA_MEM(A) "vmovaps %[" A "], %%ymm15\n\t vfmadd231ps %%ymm13, %%ymm14, %%ymm15\n\t vmovaps %%ymm15, %[" A "]\n\t"
#define TG_CODES8(C, DX)                                                                                        \
    [c0] "x"(C[0]), [c1] "x"(C[1]), [c2] "x"(C[2]), [c3] "x"(C[3]), [c4] "x"(C[4]), [c5] "x"(C[5]), [c6] "x"(C[6]),  \
        [c7] "x"(C[7]), [dx] "x"(DX)
// Rows p[0..7] at byte offset off: the four asm-held accumulators a0-a3, then am[0..3]. SCALE: one of the above,
// D: the codes' byte offset in a row's block, C: the 8 code vectors, DX: the weights' scale(s).
#define TG_ROWS8(D, SCALE, C, DX)                                                                                   \
    do {                                                                                                           \
    asm(TG_SUM8("p0", D) SCALE("p0") TG_FMA_REG("a0") TG_SUM8("p1", D) SCALE("p1") TG_FMA_REG("a1")                   \
        TG_SUM8("p2", D) SCALE("p2") TG_FMA_REG("a2") TG_SUM8("p3", D) SCALE("p3") TG_FMA_REG("a3")                   \
        : [a0] "+x"(a0), [a1] "+x"(a1), [a2] "+x"(a2), [a3] "+x"(a3)                                              \
        : TG_CODES8(C, DX), [p0] "r"(p[0]), [p1] "r"(p[1]), [p2] "r"(p[2]), [p3] "r"(p[3]), [off] "r"(off)               \
        : "xmm13", "xmm14", "xmm15", "memory");                                                                  \
    asm(TG_SUM8("p0", D) SCALE("p0") TG_FMA_MEM("a0") TG_SUM8("p1", D) SCALE("p1") TG_FMA_MEM("a1")                   \
        TG_SUM8("p2", D) SCALE("p2") TG_FMA_MEM("a2") TG_SUM8("p3", D) SCALE("p3") TG_FMA_MEM("a3")                   \
        : [a0] "+m"(am[0]), [a1] "+m"(am[1]), [a2] "+m"(am[2]), [a3] "+m"(am[3])                                  \
        : TG_CODES8(C, DX), [p0] "r"(p[4]), [p1] "r"(p[5]), [p2] "r"(p[6]), [p3] "r"(p[7]), [off] "r"(off)               \
        : "xmm13", "xmm14", "xmm15", "memory");                                                                  \
    } while (0)

// The byte offsets: BlockQ16_0L's d at 0, qs at 16; BlockQ16_K's d at 0, qs at 36.
static_assert(offsetof(BlockQ16_0L, qs) == 16 && sizeof(BlockQ16_0L) == 272, "TG_ROWS8's offsets");
static_assert(offsetof(BlockQ16_K, d) == 0 && offsetof(BlockQ16_K, qs) == 36, "TG_ROWS8's offsets");

// TG_ROWS8's eight accumulators summed into out.
TG_INLINE void acc8_out(const __m256& a0, const __m256& a1, const __m256& a2, const __m256& a3, const __m256* am, float* out) {
    out[0] = hsum8(a0); out[1] = hsum8(a1); out[2] = hsum8(a2); out[3] = hsum8(a3);
    for (int j = 0; j < 4; ++j) out[4 + j] = hsum8(am[j]);
}

template <class Unpack>
TG_INLINE void lanes_dot8(int64_t k, const void* const* act, float* out, Unpack unpack) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    alignas(32) __m256 am[4] = {a0, a0, a0, a0};
    const char* p[8];
    for (int j = 0; j < 8; ++j) p[j] = static_cast<const char*>(act[j]);
    for (int64_t g = 0; g < k / (4 * QK); ++g) {
        __m256i c16[8];
        const __m256 dx = unpack(g, c16);
        const int64_t off = g * static_cast<int64_t>(sizeof(BlockQ16_0L));
        TG_ROWS8("16", TG_SCALE_LANES, c16, dx);
    }
    acc8_out(a0, a1, a2, a3, am, out);
}

// An R4L kernel: unpack(g, c16) widens group g's codes into c16 and returns its scales in R4L's lanes.
template <int NA, class Unpack>
TG_INLINE void lanes_dot(int64_t k, const void* const* act, float* out, Unpack unpack) {
    if constexpr (kRowsAsm && NA == 8) return lanes_dot8(k, act, out, unpack);
    __m256 acc[NA];
    for (int j = 0; j < NA; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t g = 0; g < k / (4 * QK); ++g) {
        __m256i c16[8];
        const __m256 dx = unpack(g, c16);
        lanes_rows<NA>(c16, dx, act, g, acc);
    }
    for (int j = 0; j < NA; ++j) out[j] = hsum8(acc[j]);
}

template <int NA>
void dot16_q5r4l_avx2(const uint8_t* w, const void* const* act, int64_t k, float* out) {
    const __m256i f0 = _mm256_set1_epi8(static_cast<char>(0xF0)), odd = _mm256_set1_epi16(static_cast<short>(0xFF00));
    lanes_dot<NA>(k, act, out, [&](int64_t g, __m256i* c16) {
        auto x = reinterpret_cast<const BlockQ5_0R4L*>(w) + g;
        // The signed codes as dot16_q5r4_avx2 makes them with few rows (see there): here every row's sum lives only
        // for its group, so the registers hold the 8 widened code vectors whatever the number of rows. Each byte
        // becomes its code x 256 in an int16 (even bytes shifted up, odd ones masked in place): a shift and an AND
        // where vpmovsxbw and vextracti128 (cross-lane, ~1 a cycle on Zen 3) took ~40 % of the one-row kernel's
        // cycles (BENCHMARKS.md, "CPU, twelfth round").
        __m256i nib[4];
        const __m256i planes = q5r4_nibbles(x, nib);
        for (int v = 0; v < 4; ++v) {
            const __m256i shift = _mm256_setr_epi32(7 - v, 7 - v, 7 - v, 7 - v, 3 - v, 3 - v, 3 - v, 3 - v);
            const __m256i c = _mm256_or_si256(nib[v], _mm256_shuffle_epi8(f0, _mm256_sllv_epi32(planes, shift)));
            c16[2 * v] = _mm256_slli_epi16(c, 8);
            c16[2 * v + 1] = _mm256_and_si256(c, odd);
        }
        return scales4(x->d);
    });
}

// Q8_0 in groups of 4 blocks with R4L's slots (the output head): the codes are widened straight from memory, and
// the row loop is R4L's. A lane sums 16 products of at most 128 x 32767 (< 2^27: exact in int32; its conversion
// rounds to fp32 as any product does).
template <int NA>
void dot16_q8r4l_avx2(const uint8_t* w, const void* const* act, int64_t k, float* out) {
    lanes_dot<NA>(k, act, out, [&](int64_t g, __m256i* c16) {
        auto x = reinterpret_cast<const BlockQ8_0R4L*>(w) + g;
        // The head streams 145 MB from DRAM a step; fetching its codes ~6 groups ahead moved one row's kernel from
        // 23.8 to 26.6 GB/s (two threads, alternated in one process; Q5_0's, compute-bound, gained nothing).
        _mm_prefetch(reinterpret_cast<const char*>(x) + 768, _MM_HINT_T0);
        _mm_prefetch(reinterpret_cast<const char*>(x) + 832, _MM_HINT_T0);
        for (int c = 0; c < 8; ++c) c16[c] = _mm256_cvtepi8_epi16(_mm_loadu_si128(reinterpret_cast<const __m128i*>(x->qs + 16 * c)));
        return scales4(x->d);
    });
}

// Q6_K: each half super-block's codes multiplied by their sub-block's scale into int16 (at most 32 x 128), even
// and odd codes apart, then two vpmaddwd per 32 weights and row. Each half is converted to float on its own: a
// lane's sum over the whole super-block could pass 2^31 (16 x 4096 x 32767 per half). One kernel for any number
// of rows, so a row's bits do not depend on the rows beside it.
// vpshufb patterns of dot16_q6k_avx2's codes 32r .. 32r + 31 (sub-blocks 2r and 2r + 1 of a half): `even` / `odd`
// put a half's scale byte under every even / odd code (-1: a zero byte between), `pick` its int16 (x 32) in each
// 16-bit lane.
struct alignas(32) Q6Picks { int8_t even[32], odd[32], pick[32]; };
constexpr Q6Picks q6_picks(int r) {
    Q6Picks p{};
    for (int i = 0; i < 32; ++i) {
        const int8_t s = static_cast<int8_t>(2 * r + i / 16);
        p.even[i] = i % 2 == 0 ? s : -1;
        p.odd[i] = i % 2 == 1 ? s : -1;
        p.pick[i] = static_cast<int8_t>(2 * s + i % 2);
    }
    return p;
}
alignas(32) constexpr Q6Picks kQ6Picks[4] = {q6_picks(0), q6_picks(1), q6_picks(2), q6_picks(3)};

// Q6_K reads each super-block's low and high bits as two interleaved pieces (per half: ql + 64n, qh + 32n), and from
// DRAM the hardware prefetcher fell behind: 8 rows of the default model's down on weights not in cache ran ~25 %
// slower than on cached ones. The next super-block's lines are fetched while this one is multiplied: 8 rows, 2
// threads, 24 distinct 896 x 4864 weights in turn, 4.5-6.1 -> 3.5-4.0 cycles per 32 weights and row (one row: no
// loss). Q4_K, whose blocks are read in order, gained nothing from the same (BENCHMARKS.md, "CPU, fourteenth round").
template <class Block>
TG_INLINE void kq_prefetch(const Block* x) {
    const char* next = reinterpret_cast<const char*>(x + 1);
    for (size_t b = 0; b < sizeof(Block); b += 64) _mm_prefetch(next + b, _MM_HINT_T0);
}

template <int NA>
void dot16_q6k_avx2(const uint8_t* w, const void* const* act, int64_t k, float* out) {
    __m256 acc[NA];
    for (int j = 0; j < NA; ++j) acc[j] = _mm256_setzero_ps();
    [[maybe_unused]] __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    [[maybe_unused]] alignas(32) __m256 am[4] = {a0, a0, a0, a0};
    [[maybe_unused]] const char* p[8] = {};
    if constexpr (kRowsAsm && NA == 8)
        for (int j = 0; j < 8; ++j) p[j] = static_cast<const char*>(act[j]);
    for (int64_t b = 0; b < k / QKK; ++b) {
        auto x = reinterpret_cast<const BlockQ6_K*>(w) + b;
        kq_prefetch(x);
        const float dxs = h2f(x->d);
        // The 16 scales as bytes in both 128-bit lanes, and 32 x each as int16 (lanes 0-15).
        const __m128i s8 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x->scales));
        const __m256i sc8 = _mm256_broadcastsi128_si256(s8);
        const __m256i sc32 = _mm256_slli_epi16(_mm256_cvtepi8_epi16(s8), 5);
        for (int n = 0; n < 2; ++n) {  // half super-blocks: 128 codes, 8 vectors of 16 scaled codes
            // half n's 8 scales in both 128-bit lanes: as bytes (first), and x 32 as int16
            const __m256i scn = n == 0 ? sc8 : _mm256_srli_si256(sc8, 8);
            const __m256i off = n == 0 ? _mm256_permute2x128_si256(sc32, sc32, 0x00) : _mm256_permute2x128_si256(sc32, sc32, 0x11);
            __m256i c[8];
            __m256i raw[4];
            q6k_codes(x, n, raw);
            for (int r = 0; r < 4; ++r) {
                // Codes 32r .. 32r + 31 (0..63, bytes 0-15 in sub-block s0, 16-31 in s1), each times its scale as
                // int16 by vpmaddubsw against the scale in every other byte (0 between): the even codes, then the odd
                // ones; minus 32 x the scale (the codes' offset). Where widening took two slow cross-lane sign
                // extensions and a lane extract, and two vpmullw, per 32 codes. c[2r] lane m is code 32r + 2m,
                // c[2r + 1] lane m code 32r + 2m + 1: the rows' codes come in that order (eo_order_q16_k).
                // (The byte patterns are tables: written as set intrinsics of n and r, which the compiler may build at
                // run time, the 8-row kernel ran 47 % slower.)
                const Q6Picks& p = kQ6Picks[r];
                const __m256i o = _mm256_shuffle_epi8(off, _mm256_load_si256(reinterpret_cast<const __m256i*>(p.pick)));
                c[2 * r] = _mm256_sub_epi16(
                    _mm256_maddubs_epi16(raw[r], _mm256_shuffle_epi8(scn, _mm256_load_si256(reinterpret_cast<const __m256i*>(p.even)))), o);
                c[2 * r + 1] = _mm256_sub_epi16(
                    _mm256_maddubs_epi16(raw[r], _mm256_shuffle_epi8(scn, _mm256_load_si256(reinterpret_cast<const __m256i*>(p.odd)))), o);
            }
            if constexpr (kRowsAsm && NA == 8) {
                // TG_ROWS8: the loop below's instructions, written out (see lanes_dot8)
                const __m128 dx = _mm_set_ss(dxs);
                const int64_t off = b * static_cast<int64_t>(sizeof(BlockQ16_K));
                if (n == 0) TG_ROWS8("36", TG_SCALE_ONE, c, dx);  // half n's codes at qs + 128n, the scale y.d at 0
                else TG_ROWS8("292", TG_SCALE_ONE, c, dx);
            } else {
                for (int j = 0; j < NA; ++j) {
                    const BlockQ16_K& y = static_cast<const BlockQ16_K*>(act[j])[b];
                    const int16_t* a = y.qs + 128 * n;
                    __m256i sum = _mm256_setzero_si256();
                    for (int v = 0; v < 8; v += 2) sum = _mm256_add_epi32(sum, dot16x32(c[v], c[v + 1], a + 16 * v));
                    acc[j] = _mm256_fmadd_ps(_mm256_set1_ps(y.d * dxs), _mm256_cvtepi32_ps(sum), acc[j]);
                }
            }
        }
    }
    if constexpr (kRowsAsm && NA == 8) acc8_out(a0, a1, a2, a3, am, out);
    else for (int j = 0; j < NA; ++j) out[j] = hsum8(acc[j]);
}

// Q4_K / Q5_K against 16-bit rows split into bytes (BlockQ16_KS): per 32 codes and row two vpmaddubsw (codes x
// high bytes, low bytes x codes) and two vpmaddwd by the sub-block's scale (times 256 for the high bytes), no
// widening of the weights and no multiply of each code by its scale: 2-3x fewer cycles than widening them (one
// row, one thread: 3.5-5.5 -> 1.8-1.9 ns per 32 weights, BENCHMARKS.md "CPU, eighth round"). The sums are the
// same integers: pairs fit int16 (31 x 128 x 2, 255 x 31 x 2), a lane's sum over the super-block at most
// 8 x 4 x 31 x 63 x 32767 < 2^31. The 8 scales and mins come out of their 12 packed bytes with llama.cpp's
// masks, as one vector.
TG_INLINE __m256i k45_scales_mins(const uint8_t* packed) {
    uint32_t u[4];
    std::memcpy(u, packed, 12);
    constexpr uint32_t m6 = 0x3f3f3f3f, m4 = 0x0f0f0f0f, m2 = 0x03030303;
    u[3] = ((u[2] >> 4) & m4) | (((u[1] >> 6) & m2) << 4);
    const uint32_t mins_lo = u[1] & m6;
    u[1] = (u[2] & m4) | (((u[0] >> 6) & m2) << 4);
    u[2] = mins_lo;
    u[0] &= m6;
    // int16 lanes 0-7: the sub-blocks' scales, 8-15: their mins
    return _mm256_cvtepu8_epi16(_mm_set_epi32(static_cast<int>(u[3]), static_cast<int>(u[2]), static_cast<int>(u[1]), static_cast<int>(u[0])));
}

// From this many input rows Q4_K / Q5_K take dot16_k45_wide (its widening pays for itself across the rows).
constexpr int kWideK45Rows = 3;
// Input rows per kernel call with 16-bit activations (a batch of 8 sequences unpacks each weight block once).
constexpr int kRows16 = 8;

// What both Q4_K / Q5_K kernels take from a super-block: its scales d and dmin, its 8 scales and mins (int16, one
// vector: k45_scales_mins), the scales in both 128-bit lanes (shuffling word s into every lane gives sub-block s's
// scale), and Q5_K's fifth bits.
struct K45Super { float dx, mx; __m256i sm, sc, hbits; };
template <int TYPE, class Block>
TG_INLINE K45Super k45_super(const Block* x) {
    K45Super s;
    s.dx = h2f(x->d);
    s.mx = h2f(x->dmin);
    s.sm = k45_scales_mins(x->scales);
    s.sc = _mm256_permute2x128_si256(s.sm, s.sm, 0x00);
    if constexpr (TYPE == Q5_K) s.hbits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x->qh));
    else s.hbits = _mm256_setzero_si256();
    return s;
}
// A row's super-block into its accumulator, the same float operations in both kernels: the integer sum (lane l's
// products) scaled by d, and the mins' term, dmin * sum(min_s * the row's sum over sub-block s), folded in lane by
// lane (lane s: sub-block s) instead of summed across lanes per super-block. y: a BlockQ16_K or BlockQ16_KS.
template <class Row>
TG_INLINE __m256 k45_finish(__m256 acc, __m256i total, const Row& y, const K45Super& s) {
    const __m256 mins = _mm256_cvtepi32_ps(_mm256_cvtepi16_epi32(_mm256_extracti128_si256(s.sm, 1)));
    acc = _mm256_fmadd_ps(_mm256_set1_ps(y.d * s.dx), _mm256_cvtepi32_ps(total), acc);
    const __m256 bsums = _mm256_cvtepi32_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(y.bsums)));
    return _mm256_fmadd_ps(_mm256_mul_ps(mins, _mm256_set1_ps(-y.d * s.mx)), bsums, acc);
}

template <int TYPE, int NA>
void dot16_k45_t(const uint8_t* w, const void* const* act, int64_t k, float* out) {
    using Block = std::conditional_t<TYPE == Q5_K, BlockQ5_K, BlockQ4_K>;
    // One or two rows (more take dot16_k45_wide). The high bytes' products go to an accumulator of their own,
    // scaled by 256 once per super-block (a lane's high sum is at most 8 x 4 x 31 x 128 x 63 < 2^23 before the
    // shift): one scale shuffle per 32 codes instead of two.
    static_assert(NA < kWideK45Rows, "many rows take dot16_k45_wide");
    __m256 acc[NA];
    for (int j = 0; j < NA; ++j) acc[j] = _mm256_setzero_ps();
    for (int64_t b = 0; b < k / QKK; ++b) {
        const Block* x = reinterpret_cast<const Block*>(w) + b;
        const K45Super sb = k45_super<TYPE>(x);
        const __m256i sc = sb.sc;
        __m256i sumi[NA], sumh[NA];
        for (int j = 0; j < NA; ++j) sumi[j] = sumh[j] = _mm256_setzero_si256();
        for (int i = 0; i < 4; ++i) {
            __m256i lo, hi;
            k45_codes(x->qs, TYPE == Q5_K ? &sb.hbits : nullptr, i, lo, hi);
            const __m256i pick_lo = _mm256_set1_epi16(static_cast<short>(0x0100 * (4 * i + 1) + 4 * i));
            const __m256i pick_hi = _mm256_set1_epi16(static_cast<short>(0x0100 * (4 * i + 3) + 4 * i + 2));
            const __m256i s_lo = _mm256_shuffle_epi8(sc, pick_lo), s_hi = _mm256_shuffle_epi8(sc, pick_hi);
            for (int j = 0; j < NA; ++j) {
                const BlockQ16_KS& y = static_cast<const BlockQ16_KS*>(act[j])[b];
                const __m256i ah_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y.hi + 64 * i));
                const __m256i ah_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y.hi + 64 * i + 32));
                const __m256i al_lo = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y.lo + 64 * i));
                const __m256i al_hi = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(y.lo + 64 * i + 32));
                const __m256i p_low = _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(al_lo, lo), s_lo),
                                                       _mm256_madd_epi16(_mm256_maddubs_epi16(al_hi, hi), s_hi));
                sumh[j] = _mm256_add_epi32(sumh[j], _mm256_add_epi32(_mm256_madd_epi16(_mm256_maddubs_epi16(lo, ah_lo), s_lo),
                                                                     _mm256_madd_epi16(_mm256_maddubs_epi16(hi, ah_hi), s_hi)));
                sumi[j] = _mm256_add_epi32(sumi[j], p_low);
            }
        }
        for (int j = 0; j < NA; ++j)
            acc[j] = k45_finish(acc[j], _mm256_add_epi32(sumi[j], _mm256_slli_epi32(sumh[j], 8)),
                                static_cast<const BlockQ16_KS*>(act[j])[b], sb);
    }
    for (int j = 0; j < NA; ++j) out[j] = hsum8(acc[j]);
}

// Q4_K / Q5_K with 3 or more rows: each 32 codes widened to int16 once and multiplied by their sub-block's scale
// (at most 31 x 63), then 2 vpmaddwd and 2 vpaddd per 32 weights and row, where the byte-split kernel spends 4
// vpmaddubsw, 4 vpmaddwd and 3 vpaddd per 64. The codes are widened in the order that gives each int32 lane the
// bytes 4l .. 4l + 3 it gets in dot16_k45_t (the rows' codes permuted to match, BlockQ16_K with kw_order): the
// same integers in the same lanes (a lane's super-block sum at most 32 x 1953 x 32767 < 2^31), then the same
// float operations, so a row's bits do not depend on how many rows share the call.
TG_INLINE __m256i kw_order(__m256i c) {
    return _mm256_shuffle_epi8(c, _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                                   0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15));
}

template <int TYPE, int NA>
void dot16_k45_wide(const uint8_t* w, const void* const* act, int64_t k, float* out) {
    using Block = std::conditional_t<TYPE == Q5_K, BlockQ5_K, BlockQ4_K>;
    __m256 acc[NA];
    for (int j = 0; j < NA; ++j) acc[j] = _mm256_setzero_ps();
    const __m256i zero = _mm256_setzero_si256();
    for (int64_t b = 0; b < k / QKK; ++b) {
        const Block* x = reinterpret_cast<const Block*>(w) + b;
        const K45Super sb = k45_super<TYPE>(x);
        const __m256i sc = sb.sc;
        __m256i sumi[NA];
        for (int j = 0; j < NA; ++j) sumi[j] = _mm256_setzero_si256();
        for (int i = 0; i < 4; ++i) {
            __m256i lo, hi;
            k45_codes(x->qs, TYPE == Q5_K ? &sb.hbits : nullptr, i, lo, hi);
            const __m256i s_lo = _mm256_shuffle_epi8(sc, _mm256_set1_epi16(static_cast<short>(0x0100 * (4 * i + 1) + 4 * i)));
            const __m256i s_hi = _mm256_shuffle_epi8(sc, _mm256_set1_epi16(static_cast<short>(0x0100 * (4 * i + 3) + 4 * i + 2)));
            lo = kw_order(lo);
            hi = kw_order(hi);
            const __m256i c[4] = {_mm256_mullo_epi16(_mm256_unpacklo_epi8(lo, zero), s_lo),
                                  _mm256_mullo_epi16(_mm256_unpackhi_epi8(lo, zero), s_lo),
                                  _mm256_mullo_epi16(_mm256_unpacklo_epi8(hi, zero), s_hi),
                                  _mm256_mullo_epi16(_mm256_unpackhi_epi8(hi, zero), s_hi)};
            for (int j = 0; j < NA; ++j) {
                const int16_t* a = static_cast<const BlockQ16_K*>(act[j])[b].qs + 64 * i;
                const __m256i p01 = _mm256_add_epi32(_mm256_madd_epi16(c[0], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a))),
                                                     _mm256_madd_epi16(c[1], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 16))));
                const __m256i p23 = _mm256_add_epi32(_mm256_madd_epi16(c[2], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 32))),
                                                     _mm256_madd_epi16(c[3], _mm256_loadu_si256(reinterpret_cast<const __m256i*>(a + 48))));
                sumi[j] = _mm256_add_epi32(sumi[j], _mm256_add_epi32(p01, p23));
            }
        }
        for (int j = 0; j < NA; ++j) acc[j] = k45_finish(acc[j], sumi[j], static_cast<const BlockQ16_K*>(act[j])[b], sb);
    }
    for (int j = 0; j < NA; ++j) out[j] = hsum8(acc[j]);
}

// A Q16_K block's codes in kw_order's lanes: per 32, pairs (2p, 2p + 1) as [0 2 4 6 | 8 10 12 14] then
// [1 3 5 7 | 9 11 13 15] (the int16 vectors dot16_k45_wide multiplies by its widened codes).
void kw_order_q16_k(const BlockQ16_K* x, BlockQ16_K* y, int64_t nb) {
    const __m256i even_odd = _mm256_setr_epi32(0, 2, 4, 6, 1, 3, 5, 7);
    for (int64_t b = 0; b < nb; ++b) {
        y[b].d = x[b].d;
        std::memcpy(y[b].bsums, x[b].bsums, sizeof(y[b].bsums));
        for (int c = 0; c < QKK; c += 32) {
            const __m256i p0 = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs + c)), even_odd);
            const __m256i p1 = _mm256_permutevar8x32_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs + c + 16)), even_odd);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[b].qs + c), _mm256_permute2x128_si256(p0, p1, 0x20));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[b].qs + c + 16), _mm256_permute2x128_si256(p0, p1, 0x31));
        }
    }
}

// A Q16_K block's codes as dot16_q6k_avx2 meets them: per 32, the 16 even ones, then the 16 odd ones.
void eo_order_q16_k(const BlockQ16_K* x, BlockQ16_K* y, int64_t nb) {
    const __m256i split = _mm256_setr_epi8(0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15,
                                           0, 1, 4, 5, 8, 9, 12, 13, 2, 3, 6, 7, 10, 11, 14, 15);
    for (int64_t b = 0; b < nb; ++b) {
        y[b].d = x[b].d;
        std::memcpy(y[b].bsums, x[b].bsums, sizeof(y[b].bsums));
        for (int c = 0; c < QKK; c += 32) {
            // each 16 codes -> [8 even | 8 odd]: within 128-bit lanes, then the lanes' 64-bit halves regrouped
            const __m256i p0 = _mm256_permute4x64_epi64(
                _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs + c)), split), 0xD8);
            const __m256i p1 = _mm256_permute4x64_epi64(
                _mm256_shuffle_epi8(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x[b].qs + c + 16)), split), 0xD8);
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[b].qs + c), _mm256_permute2x128_si256(p0, p1, 0x20));
            _mm256_storeu_si256(reinterpret_cast<__m256i*>(y[b].qs + c + 16), _mm256_permute2x128_si256(p0, p1, 0x31));
        }
    }
}

template <int NA>
void dot16_k45_avx2(int type, const uint8_t* w, const void* const* act, int64_t k, float* out) {
    if constexpr (NA >= kWideK45Rows) {
        if (type == Q5_K) dot16_k45_wide<Q5_K, NA>(w, act, k, out);
        else dot16_k45_wide<Q4_K, NA>(w, act, k, out);
    } else {
        if (type == Q5_K) dot16_k45_t<Q5_K, NA>(w, act, k, out);
        else dot16_k45_t<Q4_K, NA>(w, act, k, out);
    }
}

template <int NA>
inline void dot_avx2(int type, const uint8_t* w, const void* const* act, int64_t k, float* out) {
    if (type == Q4_K || type == Q5_K || type == Q6_K) dot_k_avx2<NA>(type, w, act, k, out);
    else if (type == Q5_0_R4) dot_q5r4_avx2<NA>(w, act, k, out);
    else dot_legacy_avx2<NA>(type, w, act, k, out);
}

template <int NA>
inline void dot16_avx2(int type, const uint8_t* w, const void* const* act, int64_t k, float* out) {
    if (type == Q6_K) dot16_q6k_avx2<NA>(w, act, k, out);
    else if (type == Q4_K || type == Q5_K) dot16_k45_avx2<NA>(type, w, act, k, out);
    else if (type == Q5_0_R4L) dot16_q5r4l_avx2<NA>(w, act, k, out);
    else if (type == Q8_0_R4L) dot16_q8r4l_avx2<NA>(w, act, k, out);
    else if (type == Q5_0_R4) dot16_q5r4_avx2<NA>(w, act, k, out);
    else dot16_legacy_avx2<NA>(type, w, act, k, out);
}

// ---- dequantization (prefill's float GEMM) ----

// 32 signed byte codes c -> y[i] = c[i] * d[i / 16] (+ m): the scalar form's operations in its order (a product,
// then the min subtracted), so both forms give the same floats.
TG_INLINE void put32(__m256i c, __m256 d_lo, __m256 d_hi, float* y, const __m256* m_lo = nullptr, const __m256* m_hi = nullptr) {
    const __m128i lo = _mm256_castsi256_si128(c), hi = _mm256_extracti128_si256(c, 1);
    const __m128i parts[4] = {lo, _mm_srli_si128(lo, 8), hi, _mm_srli_si128(hi, 8)};
    for (int i = 0; i < 4; ++i) {
        __m256 v = _mm256_mul_ps(i < 2 ? d_lo : d_hi, _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(parts[i])));
        if (m_lo) v = _mm256_sub_ps(v, i < 2 ? *m_lo : *m_hi);
        _mm256_storeu_ps(y + 8 * i, v);
    }
}

// One row of a type the default GGUF uses (Q5_0 as R4 or R4L, Q8_0 as stored or R4L, Q4_K, Q6_K) dequantized with AVX2; false for the
// other types (the scalar form serves them).
bool dequantize_row_avx2(int t, const uint8_t* row, int64_t k, float* y) {
    const __m256i m4 = _mm256_set1_epi8(0x0F);
    if (t == Q8_0_R4L) {
        for (int64_t g = 0; g < k / (4 * QK); ++g) {
            auto x = reinterpret_cast<const BlockQ8_0R4L*>(row) + g;
            __m256i codes[4];
            q8r4l_blocks(x, codes);
            for (int b = 0; b < 4; ++b, y += QK) {
                const __m256 d = _mm256_set1_ps(h2f(x->d[b]));
                put32(codes[b], d, d, y);
            }
        }
        return true;
    }
    if (t == Q5_0_R4 || t == Q5_0_R4L) {
        const __m256i b16 = _mm256_set1_epi8(16);
        for (int64_t g = 0; g < k / (4 * QK); ++g) {
            __m256i codes[4];
            if (t == Q5_0_R4L) {
                q5r4_codes(reinterpret_cast<const BlockQ5_0R4L*>(row) + g, codes);
                for (int v = 0; v < 4; ++v) codes[v] = _mm256_sub_epi8(codes[v], b16);
                q5l_to_blocks(codes);
            } else {
                q5r4_codes(reinterpret_cast<const BlockQ5_0R4*>(row) + g, codes);
                for (int v = 0; v < 4; ++v) codes[v] = _mm256_sub_epi8(codes[v], b16);
            }
            for (int bk = 0; bk < 4; ++bk, y += QK) {
                const __m256 d = _mm256_set1_ps(r4_block_scale(t, row, g, bk));
                put32(codes[bk], d, d, y);
            }
        }
        return true;
    }
    if (t == Q8_0) {
        for (int64_t b = 0; b < k / QK; ++b, y += QK) {
            auto x = reinterpret_cast<const BlockQ8_0*>(row) + b;
            const __m256 d = _mm256_set1_ps(h2f(x->d));
            put32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x->qs)), d, d, y);
        }
        return true;
    }
    if (t == Q6_K) {
        const __m256i b32 = _mm256_set1_epi8(32);
        for (int64_t b = 0; b < k / QKK; ++b) {
            auto x = reinterpret_cast<const BlockQ6_K*>(row) + b;
            const float dx = h2f(x->d);
            for (int n = 0; n < 2; ++n) {
                __m256i c[4];
                q6k_codes(x, n, c);
                for (int i = 0; i < 4; ++i, y += 32) {
                    const __m256 d_lo = _mm256_set1_ps(dx * static_cast<float>(x->scales[8 * n + 2 * i]));
                    const __m256 d_hi = _mm256_set1_ps(dx * static_cast<float>(x->scales[8 * n + 2 * i + 1]));
                    put32(_mm256_sub_epi8(c[i], b32), d_lo, d_hi, y);
                }
            }
        }
        return true;
    }
    if (t == Q4_K) {
        for (int64_t b = 0; b < k / QKK; ++b) {
            auto x = reinterpret_cast<const BlockQ4_K*>(row) + b;
            const float dx = h2f(x->d), mx = h2f(x->dmin);
            for (int i = 0; i < 4; ++i) {
                const __m256i bits = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x->qs + 32 * i));
                for (int half = 0; half < 2; ++half, y += 32) {
                    int sc, mn;
                    scale_min_k4(2 * i + half, x->scales, sc, mn);
                    const __m256 d = _mm256_set1_ps(dx * static_cast<float>(sc)), m = _mm256_set1_ps(mx * static_cast<float>(mn));
                    const __m256i c = half ? _mm256_and_si256(_mm256_srli_epi16(bits, 4), m4) : _mm256_and_si256(bits, m4);
                    put32(c, d, d, y, &m, &m);
                }
            }
        }
        return true;
    }
    return false;
}

#endif  // __AVX2__

// The input rows in each activation form the parts need, built once per call.
struct Activations {
    int64_t k = 0;
    bool wide = false;  // 16-bit blocks
    std::vector<BlockQ8_0> q8_0;
    std::vector<BlockQ8_1> q8_1;
    std::vector<BlockQ8_K> q8_k;
    std::vector<BlockQ8_0L> q8_0l;
    std::vector<BlockQ16_0> q16_0;
    std::vector<BlockQ16_0L> q16_0l;   // q16_0 regrouped, for Q8_0 R4L weights
    std::vector<BlockQ16_0L> q16_0l5;  // q16_0 regrouped, for Q5_0 R4L weights
    std::vector<BlockQ16_K> q16_k;
    std::vector<BlockQ16_KS> q16_ks;  // q16_k split into bytes, for the AVX2 Q4_K / Q5_K kernel
    std::vector<BlockQ16_K> q16_kw;   // q16_k in kw_order, for the AVX2 Q4_K / Q5_K kernel of many rows
    std::vector<BlockQ16_K> q16_k6;   // q16_k in eo_order, for the AVX2 Q6_K kernel

    // Row m's blocks for weights of `type`, in a call of `rows` input rows to the kernel.
    const void* row(int type, int64_t m, int rows) const {
        if (wide && (type == Q4_K || type == Q5_K) && (!q16_ks.empty() || !q16_kw.empty()))
            return rows >= kWideK45Rows ? static_cast<const void*>(q16_kw.data() + m * (k / QKK)) : q16_ks.data() + m * (k / QKK);
        if (wide && type == Q6_K && !q16_k6.empty()) return q16_k6.data() + m * (k / QKK);
        if (type == Q5_0_R4L) return q16_0l5.data() + m * (k / (4 * QK));
        if (type == Q8_0_R4L) return q16_0l.data() + m * (k / (4 * QK));
        if (wide) return is_k(type) ? static_cast<const void*>(q16_k.data() + m * (k / QKK)) : q16_0.data() + m * (k / QK);
        if (is_k(type)) return q8_k.data() + m * (k / QKK);
        if (type == Q5_0_R4) return q8_0l.data() + m * (k / QK);
        if (type == Q4_1 || type == Q5_1) return q8_1.data() + m * (k / QK);
        return q8_0.data() + m * (k / QK);
    }
};

void check_type(int type) {
    TORCH_CHECK(block_bytes(type) > 0, "ggml_linear: unsupported ggml type ", type);
}

}  // namespace

// y[M, sum N_i] = x[M, K] @ concat(W_i)^T (+ bias): W_i given as the GGUF's rows of blocks of type types[i]
// ([N_i, row bytes] uint8). x is fp32; y is fp32.
// `act_bits` 8: llama.cpp's arithmetic (the input rows in its 8-bit blocks). 16: the rows in 16-bit blocks
// (Q16_0 / Q16_K), one integer pass with ~15 bits of activation precision: what the default serves, as close
// to the exact model as fp32 activations by the fidelity measure (BENCHMARKS.md) and faster than two 8-bit passes.
at::Tensor ggml_linear(const at::Tensor& x, const std::vector<int64_t>& types, const std::vector<at::Tensor>& weights,
                       const c10::optional<at::Tensor>& bias, bool scalar, int64_t act_bits) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "ggml_linear: x must be an fp32 [M, K] tensor");
    TORCH_CHECK(types.size() == weights.size() && !types.empty(), "ggml_linear: one type per weight part");
    TORCH_CHECK(act_bits == 8 || act_bits == 16, "ggml_linear: act_bits is 8 or 16");
    const at::Tensor xc = x.contiguous();
    const int64_t m = xc.size(0), k = xc.size(1);
    int64_t n_total = 0;
    bool need0 = false, need1 = false, needk = false, need0l = false, need16 = false, need16l = false, need16l5 = false,
         need45 = false, need6 = false;
    for (size_t i = 0; i < types.size(); ++i) {
        const int t = static_cast<int>(types[i]);
        check_type(t);
        TORCH_CHECK(weights[i].dim() == 2 && weights[i].scalar_type() == at::kByte && weights[i].is_contiguous(),
                    "ggml_linear: each weight part is a contiguous uint8 [N, row bytes] tensor");
        TORCH_CHECK(row_length(t, weights[i].size(1)) == k && weights[i].size(1) % block_bytes(t) == 0,
                    "ggml_linear: a weight part's rows do not hold K = ", k, " values");
        n_total += weights[i].size(0);
        TORCH_CHECK(!(scalar && is_r4(t)), "ggml_linear: the R4 layouts have no scalar form");
        TORCH_CHECK((t != Q5_0_R4L && t != Q8_0_R4L) || act_bits == 16, "ggml_linear: the R4L layouts are multiplied with 16-bit activations");
        need0 |= t == Q4_0 || t == Q5_0 || t == Q8_0 || t == Q5_0_R4;
        need16 |= !is_k(t);
        need16l |= t == Q8_0_R4L;
        need16l5 |= t == Q5_0_R4L;
        need0l |= t == Q5_0_R4;
        need1 |= t == Q4_1 || t == Q5_1;
        needk |= is_k(t);
        need45 |= t == Q4_K || t == Q5_K;
        need6 |= t == Q6_K;
    }
    Activations act;
    act.k = k;
    act.wide = act_bits == 16;
    const float* px = xc.data_ptr<float>();
    const int64_t nb = k / QK, nbk = k / QKK;
    if (act.wide) {
        if (need16) {
            act.q16_0.resize(m * nb);
            for (int64_t r = 0; r < m; ++r) quantize_q16_0(px + r * k, act.q16_0.data() + r * nb, k);
            if (need16l) {
                act.q16_0l.resize(m * (nb / 4));
                regroup_q16_0l(act.q16_0.data(), act.q16_0l.data(), m * (nb / 4), false);
            }
            if (need16l5) {
                act.q16_0l5.resize(m * (nb / 4));
                regroup_q16_0l(act.q16_0.data(), act.q16_0l5.data(), m * (nb / 4), true);
            }
        }
        if (needk) {
            act.q16_k.resize(m * nbk);
            for (int64_t r = 0; r < m; ++r) quantize_q16_k(px + r * k, act.q16_k.data() + r * nbk, k);
#ifdef __AVX2__
            if (!scalar && need45) {
                // Each form only where a call of the kernel takes it: calls of kRows16 rows, then the rest.
                if ((m - 1) % kRows16 + 1 < kWideK45Rows) {
                    act.q16_ks.resize(m * nbk);
                    split_q16_k(act.q16_k.data(), act.q16_ks.data(), m * nbk);
                }
                if (m >= kWideK45Rows) {
                    act.q16_kw.resize(m * nbk);
                    kw_order_q16_k(act.q16_k.data(), act.q16_kw.data(), m * nbk);
                }
            }
            if (!scalar && need6) {
                act.q16_k6.resize(m * nbk);
                eo_order_q16_k(act.q16_k.data(), act.q16_k6.data(), m * nbk);
            }
#endif
        }
    } else {
        if (need0) {
            act.q8_0.resize(m * nb);
            for (int64_t r = 0; r < m; ++r) quantize_q8_0(px + r * k, act.q8_0.data() + r * nb, k, false, nullptr);
        }
        if (need0l) {  // the same blocks, scale as fp32, plus the lane sums the R4 kernel subtracts
            act.q8_0l.resize(m * nb);
            for (size_t b = 0; b < act.q8_0.size(); ++b) {
                BlockQ8_0L& o = act.q8_0l[b];
                o.d = h2f(act.q8_0[b].d);
                std::memcpy(o.qs, act.q8_0[b].qs, QK);
                for (int l = 0; l < 8; ++l)
                    o.corr[l] = 16 * (o.qs[4 * l] + o.qs[4 * l + 1] + o.qs[4 * l + 2] + o.qs[4 * l + 3]);
            }
        }
        if (need1) {
            act.q8_1.resize(m * nb);
            for (int64_t r = 0; r < m; ++r) quantize_q8_0(px + r * k, nullptr, k, true, act.q8_1.data() + r * nb);
        }
        if (needk) {
            act.q8_k.resize(m * nbk);
            for (int64_t r = 0; r < m; ++r) quantize_q8_k(px + r * k, act.q8_k.data() + r * nbk, k);
        }
    }
    at::Tensor y = at::empty({m, n_total}, xc.options());
    float* py = y.data_ptr<float>();
    // Tasks of kTile weight rows: a tile's rows stay in cache while every input row uses them (prefill).
    constexpr int64_t kTile = 16;
    struct Task { int part; int64_t r0, r1, col; };
    std::vector<Task> tasks;
    int64_t col = 0;
    for (size_t i = 0; i < types.size(); ++i) {
        const int64_t n = weights[i].size(0);
        for (int64_t r = 0; r < n; r += kTile) tasks.push_back({static_cast<int>(i), r, std::min(n, r + kTile), col});
        col += n;
    }
    dynamic_for(static_cast<int64_t>(tasks.size()), 16, [&](int64_t t0, int64_t t1) {
        for (int64_t t = t0; t < t1; ++t) {
            const Task& task = tasks[t];
            const int type = static_cast<int>(types[task.part]);
            const int64_t rb = weights[task.part].size(1);
            const uint8_t* pw = weights[task.part].data_ptr<uint8_t>();
            // Input rows sharing each unpacked weight block: 8 for the 16-bit kernels (a batch of 8 sequences
            // unpacks each block once), 4 for the 8-bit ones.
            const int kRows = act.wide ? kRows16 : 4;
            const void* acts[8];
            float res[8];
            for (int64_t i0 = 0; i0 < m; i0 += kRows) {
                const int na = static_cast<int>(std::min<int64_t>(kRows, m - i0));
                for (int j = 0; j < na; ++j) acts[j] = act.row(type, i0 + j, na);
                for (int64_t r = task.r0; r < task.r1; ++r) {
                    const uint8_t* row = pw + r * rb;
#ifdef __AVX2__
                    if (!scalar && act.wide) {
                        switch (na) {
                            case 8: dot16_avx2<8>(type, row, acts, k, res); break;
                            case 7: dot16_avx2<7>(type, row, acts, k, res); break;
                            case 6: dot16_avx2<6>(type, row, acts, k, res); break;
                            case 5: dot16_avx2<5>(type, row, acts, k, res); break;
                            case 4: dot16_avx2<4>(type, row, acts, k, res); break;
                            case 3: dot16_avx2<3>(type, row, acts, k, res); break;
                            case 2: dot16_avx2<2>(type, row, acts, k, res); break;
                            default: dot16_avx2<1>(type, row, acts, k, res);
                        }
                    } else if (!scalar) {
                        switch (na) {
                            case 4: dot_avx2<4>(type, row, acts, k, res); break;
                            case 3: dot_avx2<3>(type, row, acts, k, res); break;
                            case 2: dot_avx2<2>(type, row, acts, k, res); break;
                            default: dot_avx2<1>(type, row, acts, k, res);
                        }
                    } else
#endif
                    {
                        for (int j = 0; j < na; ++j)
                            res[j] = act.wide ? dot16_scalar(type, row, acts[j], k) : dot_scalar(type, row, acts[j], k);
                    }
                    for (int j = 0; j < na; ++j) py[(i0 + j) * n_total + task.col + r] = res[j];
                }
            }
        }
    });
    if (bias.has_value()) y.add_(*bias);
    return y;
}

// The activation blocks ggml_linear multiplies with, as bytes [M, blocks * block size] (for the tests).
at::Tensor ggml_quantize_activations(const at::Tensor& x, int64_t vec_type) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "ggml_quantize_activations: fp32 [M, K]");
    TORCH_CHECK(vec_type == Q8_0 || vec_type == Q8_1 || vec_type == Q8_K || vec_type == Q16_0 || vec_type == Q16_K,
                "ggml_quantize_activations: vec_type is Q8_0, Q8_1, Q8_K, Q16_0 or Q16_K");
    const at::Tensor xc = x.contiguous();
    const int64_t m = xc.size(0), k = xc.size(1);
    const bool super = vec_type == Q8_K || vec_type == Q16_K;
    const int64_t size = vec_type == Q8_K ? sizeof(BlockQ8_K) : vec_type == Q16_K ? sizeof(BlockQ16_K)
                       : vec_type == Q16_0 ? sizeof(BlockQ16_0) : vec_type == Q8_1 ? sizeof(BlockQ8_1) : sizeof(BlockQ8_0);
    TORCH_CHECK(k % (super ? QKK : QK) == 0, "ggml_quantize_activations: K is not a whole number of blocks");
    const int64_t per = k / (super ? QKK : QK) * size;
    at::Tensor out = at::empty({m, per}, xc.options().dtype(at::kByte));
    for (int64_t r = 0; r < m; ++r) {
        const float* row = xc.data_ptr<float>() + r * k;
        void* dst = out.data_ptr<uint8_t>() + r * per;
        switch (vec_type) {
            case Q8_K: quantize_q8_k(row, static_cast<BlockQ8_K*>(dst), k); break;
            case Q8_1: quantize_q8_0(row, nullptr, k, true, static_cast<BlockQ8_1*>(dst)); break;
            case Q16_0: quantize_q16_0(row, static_cast<BlockQ16_0*>(dst), k); break;
            case Q16_K: quantize_q16_k(row, static_cast<BlockQ16_K*>(dst), k); break;
            default: quantize_q8_0(row, static_cast<BlockQ8_0*>(dst), k, false, nullptr);
        }
    }
    return out;
}

// Rows `ids` of a [V, row bytes] block matrix, dequantized to fp32 as ggml's dequantize_row_* computes them
// (the embedding lookup: llama.cpp's get_rows).
// One weight row of `type`, dequantized into y (k floats): the values the integer kernels multiply, exactly.
void dequantize_row(int t, const uint8_t* row, int64_t k, float* y, bool scalar = false) {
#ifdef __AVX2__
    if (!scalar && dequantize_row_avx2(t, row, k, y)) return;
#endif
    int q[QKK], sc16[16], m16[16];
    if (is_k(t)) {
        for (int64_t b = 0; b < k / QKK; ++b, y += QKK) {
            float d, dmin;
            codes256(t, row + b * block_bytes(t), q, sc16, m16, d, dmin);
            if (t == Q6_K) {
                for (int j = 0; j < QKK; ++j) y[j] = d * static_cast<float>(sc16[j / 16]) * static_cast<float>(q[j]);
            } else {
                for (int j = 0; j < QKK; ++j) {
                    const float ds = d * static_cast<float>(sc16[j / 16]), ms = dmin * static_cast<float>(m16[j / 16]);
                    y[j] = ds * static_cast<float>(q[j]) - ms;
                }
            }
        }
    } else if (is_r4(t)) {  // the repacked layout's codes, as ggml_repack placed them
        for (int64_t g = 0; g < k / (4 * QK); ++g) {
            for (int bk = 0; bk < 4; ++bk, y += QK) {
                const float d = r4_block_scale(t, row, g, bk);
                for (int j = 0; j < QK; ++j) y[j] = static_cast<float>(r4_block_code(t, row, g, bk, j)) * d;
            }
        }
    } else {
        for (int64_t b = 0; b < k / QK; ++b, y += QK) {
            float d, m;
            codes32(t, row + b * block_bytes(t), q, d, m);
            for (int j = 0; j < QK; ++j) y[j] = static_cast<float>(q[j]) * d + m;
        }
    }
}

at::Tensor ggml_dequantize_rows(const at::Tensor& weight, int64_t type, const at::Tensor& ids) {
    const int t = static_cast<int>(type);
    check_type(t);
    TORCH_CHECK(weight.dim() == 2 && weight.scalar_type() == at::kByte && weight.is_contiguous(),
                "ggml_dequantize_rows: weight must be a contiguous uint8 [V, row bytes] tensor");
    const at::Tensor idx = ids.to(at::kLong).contiguous();
    const int64_t rb = weight.size(1), k = row_length(t, rb), n = idx.numel(), v = weight.size(0);
    at::Tensor out = at::empty({n, k}, weight.options().dtype(at::kFloat));
    const int64_t* pi = idx.data_ptr<int64_t>();
    for (int64_t i = 0; i < n; ++i) TORCH_CHECK(pi[i] >= 0 && pi[i] < v, "ggml_dequantize_rows: id out of range");
    at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i)
            dequantize_row(t, weight.data_ptr<uint8_t>() + pi[i] * rb, k, out.data_ptr<float>() + i * k);
    });
    return out;
}

// The whole weight W (the parts stacked, as ggml_linear multiplies them) in fp32: [sum of rows, k]. Prefill
// multiplies many rows at once, where a float GEMM over W is faster than the block kernels and exact in W.
at::Tensor ggml_dequantize(const std::vector<int64_t>& types, const std::vector<at::Tensor>& weights, bool scalar,
                           const c10::optional<at::Tensor>& scratch) {
    TORCH_CHECK(!weights.empty() && types.size() == weights.size(), "ggml_dequantize: one type per weight part");
    int64_t n = 0, k = -1;
    std::vector<int64_t> first;
    for (size_t p = 0; p < weights.size(); ++p) {
        const int t = static_cast<int>(types[p]);
        check_type(t);
        const at::Tensor& w = weights[p];
        TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
                    "ggml_dequantize: each part must be a contiguous uint8 [rows, row bytes] tensor");
        const int64_t kp = row_length(t, w.size(1));
        TORCH_CHECK(k < 0 || kp == k, "ggml_dequantize: the parts' row lengths differ");
        k = kp;
        first.push_back(n);
        n += w.size(0);
    }
    // A caller's scratch buffer, reused call after call: a fresh tensor this large is fresh pages from the kernel,
    // whose first touch costs about as much as the dequantization itself.
    at::Tensor out;
    if (scratch.has_value() && scratch->is_contiguous() && scratch->scalar_type() == at::kFloat && scratch->numel() >= n * k)
        out = scratch->view({-1}).narrow(0, 0, n * k).view({n, k});
    else
        out = at::empty({n, k}, weights[0].options().dtype(at::kFloat));
    float* po = out.data_ptr<float>();
    at::parallel_for(0, n, 16, [&](int64_t i0, int64_t i1) {
        size_t p = 0;
        for (int64_t i = i0; i < i1; ++i) {
            while (p + 1 < first.size() && i >= first[p + 1]) ++p;
            while (i < first[p]) --p;
            const at::Tensor& w = weights[p];
            dequantize_row(static_cast<int>(types[p]), w.data_ptr<uint8_t>() + (i - first[p]) * w.size(1), k, po + i * k, scalar);
        }
    });
    return out;
}

// A weight part in the layout its AVX2 kernel reads fastest, with the same codes and scales: (type, blocks).
// Q5_0 rows whose length is a multiple of 128 become Q5_0_R4, or with `lanes` (the 16-bit kernels) Q5_0_R4L, and
// with `lanes` Q8_0 rows Q8_0_R4L; everything else is returned as it is.
std::tuple<int64_t, at::Tensor> ggml_repack(const at::Tensor& weight, int64_t type, bool lanes) {
#ifdef __AVX2__
    if (type == Q5_0 && weight.dim() == 2 && weight.is_contiguous() && weight.size(1) % (4 * sizeof(BlockQ5_0)) == 0) {
        const int64_t n = weight.size(0), groups = weight.size(1) / (4 * sizeof(BlockQ5_0));
        const int64_t group_bytes = lanes ? sizeof(BlockQ5_0R4L) : sizeof(BlockQ5_0R4);
        at::Tensor out = at::empty({n, groups * group_bytes}, weight.options());
        // One group's fields, in either struct (R4: fp32 scales; R4L: the file's fp16 ones).
        auto fill = [&](auto& o, const BlockQ5_0* blocks) {
            std::memset(&o, 0, sizeof(o));
            for (int bk = 0; bk < 4; ++bk) {
                const BlockQ5_0& b = blocks[bk];
                if constexpr (std::is_same_v<std::decay_t<decltype(o)>, BlockQ5_0R4L>) o.d[bk] = b.d;
                else o.d[bk] = h2f(b.d);
                uint32_t qh;
                std::memcpy(&qh, b.qh, 4);
                for (int c = 0; c < QK; ++c) {
                    const int code = c < 16 ? (b.qs[c] & 0xF) : (b.qs[c - 16] >> 4);
                    int v = bk, j = c;  // the code's slot: R4 keeps block bk's code c in (bk, c)
                    if (lanes) q5l_slot(bk, c, v, j);
                    uint8_t* nib = v < 2 ? o.nib01 : o.nib23;
                    nib[j] |= static_cast<uint8_t>(code << ((v % 2) * 4));
                    if ((qh >> c) & 1) o.hb[j % 16] |= static_cast<uint8_t>(1 << (v + (j < 16 ? 0 : 4)));
                }
            }
        };
        for (int64_t r = 0; r < n; ++r) {
            auto src = reinterpret_cast<const BlockQ5_0*>(weight.data_ptr<uint8_t>() + r * weight.size(1));
            uint8_t* dst = out.data_ptr<uint8_t>() + r * out.size(1);
            for (int64_t g = 0; g < groups; ++g) {
                if (lanes) fill(reinterpret_cast<BlockQ5_0R4L*>(dst)[g], src + 4 * g);
                else fill(reinterpret_cast<BlockQ5_0R4*>(dst)[g], src + 4 * g);
            }
        }
        return {static_cast<int64_t>(lanes ? Q5_0_R4L : Q5_0_R4), out};
    }
    if (type == Q8_0 && lanes && weight.dim() == 2 && weight.is_contiguous() && weight.size(1) % (4 * sizeof(BlockQ8_0)) == 0) {
        const int64_t n = weight.size(0), groups = weight.size(1) / (4 * sizeof(BlockQ8_0));
        at::Tensor out = at::empty({n, groups * static_cast<int64_t>(sizeof(BlockQ8_0R4L))}, weight.options());
        at::parallel_for(0, n, 256, [&](int64_t r0, int64_t r1) {  // the head is 150k rows
            for (int64_t r = r0; r < r1; ++r) {
                auto src = reinterpret_cast<const BlockQ8_0*>(weight.data_ptr<uint8_t>() + r * weight.size(1));
                auto dst = reinterpret_cast<BlockQ8_0R4L*>(out.data_ptr<uint8_t>() + r * out.size(1));
                for (int64_t g = 0; g < groups; ++g) {
                    for (int b = 0; b < 4; ++b) {
                        const BlockQ8_0& blk = src[4 * g + b];
                        dst[g].d[b] = blk.d;
                        for (int n2 = 0; n2 < QK; ++n2) {
                            int v, j;
                            r4l_slot(b, n2, v, j);
                            dst[g].qs[32 * v + j] = blk.qs[n2];
                        }
                    }
                }
            }
        });
        return {static_cast<int64_t>(Q8_0_R4L), out};
    }
#endif
    return {type, weight};
}
