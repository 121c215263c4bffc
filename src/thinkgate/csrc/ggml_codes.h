// The scalar forms of a GGUF block's integer codes and scales, shared by the block kernels (ggml_linear.cpp) and
// the 16-bit prefill GEMM's packing (ggml_gemm16.cpp): one reading of ggml's layouts for both.
#pragma once

#include "ggml_blocks.h"

#include <c10/util/Half.h>

#if defined(__AVX2__) || defined(__F16C__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

namespace ggml {

#ifdef __F16C__
inline float h2f(uint16_t h) { return _cvtsh_ss(h); }  // one instruction; the portable form is ~15
#else
inline float h2f(uint16_t h) { return c10::detail::fp16_ieee_to_fp32_value(h); }
#endif
inline uint16_t f2h(float f) { return c10::detail::fp16_ieee_from_fp32_value(f); }
// Round half to even, as _mm256_round_ps(_MM_ROUND_NEAREST) and ggml's nearest_int do.
inline int rne(float v) { return static_cast<int>(std::nearbyint(v)); }

inline void scale_min_k4(int j, const uint8_t* q, int& sc, int& m) {
    if (j < 4) {
        sc = q[j] & 63;
        m = q[j + 4] & 63;
    } else {
        sc = (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4);
        m = (q[j + 4] >> 4) | ((q[j] >> 6) << 4);
    }
}

// Bytes of one block of a type (0: not a type the kernels read), and the values a row of row_bytes holds.
inline bool is_k(int type) { return type == Q4_K || type == Q5_K || type == Q6_K; }
// The repacked layouts of 4 blocks a group.
inline bool is_r4(int type) { return type == Q5_0_R4 || type == Q5_0_R4L || type == Q8_0_R4L; }

inline int block_bytes(int type) {
    switch (type) {
        case Q4_0: return sizeof(BlockQ4_0);
        case Q4_1: return sizeof(BlockQ4_1);
        case Q5_0: return sizeof(BlockQ5_0);
        case Q5_1: return sizeof(BlockQ5_1);
        case Q8_0: return sizeof(BlockQ8_0);
        case Q4_K: return sizeof(BlockQ4_K);
        case Q5_K: return sizeof(BlockQ5_K);
        case Q6_K: return sizeof(BlockQ6_K);
#ifdef __AVX2__
        case Q5_0_R4: return sizeof(BlockQ5_0R4);
        case Q5_0_R4L: return sizeof(BlockQ5_0R4L);
        case Q8_0_R4L: return sizeof(BlockQ8_0R4L);
#endif
        default: return 0;
    }
}

inline int64_t row_length(int type, int64_t row_bytes) {
    return row_bytes / block_bytes(type) * (is_k(type) ? QKK : is_r4(type) ? 4 * QK : QK);
}

// 16-bit blocks (ours, the default): d = amax / 32767 over the block, codes round-half-even(x * 32767 / amax).
inline constexpr float kQ16 = 32767.f;

// The codes of n values in one scale; returns their sum.
inline int64_t quantize16(const float* x, int n, float id, int16_t* q) {
    int64_t sum = 0;
    for (int j = 0; j < n; ++j) {
        q[j] = static_cast<int16_t>(std::clamp(rne(x[j] * id), -32767, 32767));
        sum += q[j];
    }
    return sum;
}

inline float absmax(const float* x, int n) {
    float amax = 0.0f;
    for (int j = 0; j < n; ++j) amax = std::max(amax, std::fabs(x[j]));
    return amax;
}

#ifdef __AVX2__
// absmax of n values, n a multiple of 8 (the same float: max is exact).
inline float absmax_avx2(const float* x, int n) {
    const __m256 sign = _mm256_set1_ps(-0.0f);
    __m256 m = _mm256_setzero_ps();
    for (int i = 0; i < n; i += 8) m = _mm256_max_ps(m, _mm256_andnot_ps(sign, _mm256_loadu_ps(x + i)));
    __m128 h = _mm_max_ps(_mm256_castps256_ps128(m), _mm256_extractf128_ps(m, 1));
    h = _mm_max_ps(h, _mm_movehl_ps(h, h));
    h = _mm_max_ss(h, _mm_movehdup_ps(h));
    return _mm_cvtss_f32(h);
}

// An R4L group's 4 code vectors (slot order, ggml_blocks.h) -> its blocks' codes in order: half[4h + b] holds codes
// 16h .. 16h + 15 of block b. As 16-bit words (code pairs) that is an 8 x 8 transpose of the 8 chunks.
inline void r4l_natural(const __m256i* codes, __m128i* half) {
    __m128i c[8], t[8];
    for (int v = 0; v < 4; ++v) {
        c[2 * v] = _mm256_castsi256_si128(codes[v]);
        c[2 * v + 1] = _mm256_extracti128_si256(codes[v], 1);
    }
    for (int i = 0; i < 8; i += 2) {
        t[i] = _mm_unpacklo_epi16(c[i], c[i + 1]);
        t[i + 1] = _mm_unpackhi_epi16(c[i], c[i + 1]);
    }
    for (int i = 0; i < 8; i += 4) {
        c[i] = _mm_unpacklo_epi32(t[i], t[i + 2]);
        c[i + 1] = _mm_unpackhi_epi32(t[i], t[i + 2]);
        c[i + 2] = _mm_unpacklo_epi32(t[i + 1], t[i + 3]);
        c[i + 3] = _mm_unpackhi_epi32(t[i + 1], t[i + 3]);
    }
    for (int i = 0; i < 4; ++i) {
        half[2 * i] = _mm_unpacklo_epi64(c[i], c[i + 4]);
        half[2 * i + 1] = _mm_unpackhi_epi64(c[i], c[i + 4]);
    }
}

// The same, as the group's 4 blocks: codes[b] becomes block b's 32 codes in order (from its slot vectors).
inline void r4l_to_blocks(__m256i* codes) {
    __m128i half[8];
    r4l_natural(codes, half);
    for (int b = 0; b < 4; ++b) codes[b] = _mm256_set_m128i(half[4 + b], half[b]);
}

// A Q5_0 R4L group's 4 code vectors (slot order) -> its 4 blocks' codes in order: int32 lane l of vector v holds
// codes 16 * (l / 4) + 4v .. + 3 of block l % 4, so within each 128-bit half this is a 4 x 4 transpose of int32s.
inline void q5l_to_blocks(__m256i* codes) {
    const __m256i t0 = _mm256_unpacklo_epi32(codes[0], codes[1]), t1 = _mm256_unpackhi_epi32(codes[0], codes[1]);
    const __m256i t2 = _mm256_unpacklo_epi32(codes[2], codes[3]), t3 = _mm256_unpackhi_epi32(codes[2], codes[3]);
    codes[0] = _mm256_unpacklo_epi64(t0, t2);
    codes[1] = _mm256_unpackhi_epi64(t0, t2);
    codes[2] = _mm256_unpacklo_epi64(t1, t3);
    codes[3] = _mm256_unpackhi_epi64(t1, t3);
}

// A Q8_0 R4L group's 4 blocks of codes, in order.
inline void q8r4l_blocks(const BlockQ8_0R4L* x, __m256i* codes) {
    for (int v = 0; v < 4; ++v) codes[v] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x->qs + 32 * v));
    r4l_to_blocks(codes);
}

// quantize16 of 32 values with AVX2, the same codes: |x * id| <= 32767 (x's magnitude is at most amax), and
// vcvtps2dq rounds half to even under the default MXCSR, as nearbyint does.
inline int32_t quantize16x32_avx2(const float* x, float id_scalar, int16_t* q) {
    const __m256 id = _mm256_set1_ps(id_scalar);
    __m256i c[4];
    for (int i = 0; i < 4; ++i) c[i] = _mm256_cvtps_epi32(_mm256_mul_ps(_mm256_loadu_ps(x + 8 * i), id));
    // packs works within 128-bit lanes: [0a 1a 0b 1b] -> reorder to [0a 0b 1a 1b]
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q), _mm256_permute4x64_epi64(_mm256_packs_epi32(c[0], c[1]), 0xD8));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(q + 16), _mm256_permute4x64_epi64(_mm256_packs_epi32(c[2], c[3]), 0xD8));
    const __m256i s = _mm256_add_epi32(_mm256_add_epi32(c[0], c[1]), _mm256_add_epi32(c[2], c[3]));
    __m128i s4 = _mm_add_epi32(_mm256_castsi256_si128(s), _mm256_extracti128_si256(s, 1));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0x4E));
    s4 = _mm_add_epi32(s4, _mm_shuffle_epi32(s4, 0xB1));
    return _mm_cvtsi128_si32(s4);
}
#endif

// Code j (signed, -16..15) of block bk of a Q5_0 R4 group (ggml_repack's layout, ggml_blocks.h), or of slot
// (bk, j) of an R4L group.
template <class Block>
inline int r4_code(const Block* x, int bk, int j) {
    const uint8_t* nib = bk < 2 ? x->nib01 : x->nib23;
    const int high = (x->hb[j % 16] >> (bk + (j < 16 ? 0 : 4))) & 1;
    return (((nib[j] >> ((bk % 2) * 4)) & 0xF) | (high << 4)) - 16;
}

// The slot (code vector v, byte j) where Q5_0's R4L layout keeps code n of block b (ggml_blocks.h).
inline void q5l_slot(int b, int n, int& v, int& j) {
    v = (n % 16) / 4;
    j = 4 * (b + 4 * (n / 16)) + n % 4;
}

// The slot (code vector v, byte j) where Q8_0's R4L layout keeps code n of block b (ggml_blocks.h).
inline void r4l_slot(int b, int n, int& v, int& j) {
    const int c = (n % 16) / 2;
    v = c / 2;
    j = 16 * (c % 2) + 8 * (n / 16) + 2 * b + n % 2;
}

// Code n of block b of group g of a row in a repacked layout (is_r4), and the block's scale.
inline int r4_block_code(int type, const uint8_t* row, int64_t g, int b, int n) {
    if (type == Q8_0_R4L) {
        int v, j;
        r4l_slot(b, n, v, j);
        return reinterpret_cast<const BlockQ8_0R4L*>(row)[g].qs[32 * v + j];
    }
    if (type == Q5_0_R4) return r4_code(reinterpret_cast<const BlockQ5_0R4*>(row) + g, b, n);
    int v, j;
    q5l_slot(b, n, v, j);
    return r4_code(reinterpret_cast<const BlockQ5_0R4L*>(row) + g, v, j);
}
inline float r4_block_scale(int type, const uint8_t* row, int64_t g, int b) {
    if (type == Q8_0_R4L) return h2f(reinterpret_cast<const BlockQ8_0R4L*>(row)[g].d[b]);
    if (type == Q5_0_R4L) return h2f(reinterpret_cast<const BlockQ5_0R4L*>(row)[g].d[b]);
    return reinterpret_cast<const BlockQ5_0R4*>(row)[g].d[b];
}

// ---- the weights' integer codes of one block (scalar reference forms) ----

// Legacy types: the 32 codes, and whether they carry a min (Q4_1/Q5_1) instead of a zero offset.
inline void codes32(int type, const uint8_t* blk, int* q, float& d, float& m) {
    m = 0.0f;
    switch (type) {
        case Q4_0: {
            auto b = reinterpret_cast<const BlockQ4_0*>(blk);
            d = h2f(b->d);
            for (int j = 0; j < 16; ++j) { q[j] = (b->qs[j] & 0xF) - 8; q[j + 16] = (b->qs[j] >> 4) - 8; }
            break;
        }
        case Q4_1: {
            auto b = reinterpret_cast<const BlockQ4_1*>(blk);
            d = h2f(b->d);
            m = h2f(b->m);
            for (int j = 0; j < 16; ++j) { q[j] = b->qs[j] & 0xF; q[j + 16] = b->qs[j] >> 4; }
            break;
        }
        case Q5_0:
        case Q5_1: {
            const bool with_min = type == Q5_1;
            const uint8_t* qh8 = with_min ? reinterpret_cast<const BlockQ5_1*>(blk)->qh : reinterpret_cast<const BlockQ5_0*>(blk)->qh;
            const uint8_t* qs = with_min ? reinterpret_cast<const BlockQ5_1*>(blk)->qs : reinterpret_cast<const BlockQ5_0*>(blk)->qs;
            uint32_t qh;
            std::memcpy(&qh, qh8, 4);
            d = h2f(with_min ? reinterpret_cast<const BlockQ5_1*>(blk)->d : reinterpret_cast<const BlockQ5_0*>(blk)->d);
            if (with_min) m = h2f(reinterpret_cast<const BlockQ5_1*>(blk)->m);
            const int off = with_min ? 0 : 16;
            for (int j = 0; j < 16; ++j) {
                q[j] = ((qs[j] & 0xF) | (((qh >> j) << 4) & 0x10)) - off;
                q[j + 16] = ((qs[j] >> 4) | ((qh >> (j + 12)) & 0x10)) - off;
            }
            break;
        }
        default: {  // Q8_0
            auto b = reinterpret_cast<const BlockQ8_0*>(blk);
            d = h2f(b->d);
            for (int j = 0; j < 32; ++j) q[j] = b->qs[j];
        }
    }
}

// K-quants: the 256 codes and, per group of 16 codes, an integer scale and min (a group's value is
// code * d * scale - dmin * min). Q6_K has no min and codes already centred (code - 32).
inline void codes256(int type, const uint8_t* blk, int* q, int* sc16, int* m16, float& d, float& dmin) {
    if (type == Q6_K) {
        auto b = reinterpret_cast<const BlockQ6_K*>(blk);
        d = h2f(b->d);
        dmin = 0.0f;
        for (int n = 0; n < 2; ++n) {
            const uint8_t* ql = b->ql + 64 * n;
            const uint8_t* qh = b->qh + 32 * n;
            for (int l = 0; l < 32; ++l) {
                q[128 * n + l] = ((ql[l] & 0xF) | (((qh[l] >> 0) & 3) << 4)) - 32;
                q[128 * n + l + 32] = ((ql[l + 32] & 0xF) | (((qh[l] >> 2) & 3) << 4)) - 32;
                q[128 * n + l + 64] = ((ql[l] >> 4) | (((qh[l] >> 4) & 3) << 4)) - 32;
                q[128 * n + l + 96] = ((ql[l + 32] >> 4) | (((qh[l] >> 6) & 3) << 4)) - 32;
            }
        }
        for (int g = 0; g < 16; ++g) { sc16[g] = b->scales[g]; m16[g] = 0; }
        return;
    }
    const bool five = type == Q5_K;
    const uint8_t* scales = five ? reinterpret_cast<const BlockQ5_K*>(blk)->scales : reinterpret_cast<const BlockQ4_K*>(blk)->scales;
    const uint8_t* qs = five ? reinterpret_cast<const BlockQ5_K*>(blk)->qs : reinterpret_cast<const BlockQ4_K*>(blk)->qs;
    d = h2f(five ? reinterpret_cast<const BlockQ5_K*>(blk)->d : reinterpret_cast<const BlockQ4_K*>(blk)->d);
    dmin = h2f(five ? reinterpret_cast<const BlockQ5_K*>(blk)->dmin : reinterpret_cast<const BlockQ4_K*>(blk)->dmin);
    for (int j = 0; j < 4; ++j) {
        for (int l = 0; l < 32; ++l) {
            q[64 * j + l] = qs[32 * j + l] & 0xF;
            q[64 * j + l + 32] = qs[32 * j + l] >> 4;
            if (five) {
                const uint8_t h = reinterpret_cast<const BlockQ5_K*>(blk)->qh[l];
                q[64 * j + l] += ((h >> (2 * j)) & 1) << 4;
                q[64 * j + l + 32] += ((h >> (2 * j + 1)) & 1) << 4;
            }
        }
    }
    for (int s = 0; s < 8; ++s) {
        int sc, m;
        scale_min_k4(s, scales, sc, m);
        sc16[2 * s] = sc16[2 * s + 1] = sc;
        m16[2 * s] = m16[2 * s + 1] = m;
    }
}

}  // namespace ggml
