// The prefill GEMM of the default GGUF mode: many input rows times a weight in the file's blocks, in 16-bit
// integers.
//
// Why: a prefill chunk's linears are 86 % of its time (BENCHMARKS.md, "CPU, sixth round"), and as a float GEMM
// over the dequantized weight they run at 8 multiply-adds per FMA, two FMAs a cycle. vpmaddwd does 16 int16
// multiply-adds (and the pair sums) per instruction; with the vpaddd that accumulates them this machine sustains
// ~1.5x the FMA rate (measured: 75 against 48 GMAC/s a core). The weights' codes are small integers (Q5_0: 5
// bits, Q8_0: 8, the K-quants' 4-6 bits) and the input rows become int16 codes with a scale per 32 values: the
// 16-bit activation blocks the default's decode kernels already multiply (~15 bits, as faithful as fp32 rows by
// the fidelity measure). So each output is, per block of 32 inputs,
//     y += (s_w * s_x) * sum_k c_w[k] * c_x[k]  (+ o_w * x_sum for the types with a min)
// with the integer sum exact, exactly as the decode kernels compute it, just many rows at a time.
//
// Layout. The weight is packed per call, 16 weight rows (output columns) at a time, into int16 codes ordered
// [k / 2][16 columns][2], so one 256-bit load holds 8 columns' consecutive code pairs and one vpmaddwd against
// an input row's broadcast pair adds two products into each column's int32 lane. Each panel also holds its
// rows' fp32 scales per group of G codes (32; Q6_K's scales change every 16) and, for the types with a min
// (Q4_1, Q5_1, Q4_K, Q5_K), the fp32 offset per 32 codes. A weight value is s * c + o exactly in fp32 (s is an
// fp16 scale times an integer of at most 8 bits), so this is the file's weight, not an approximation of it.
// Lane sums stay in int32: 32 products of |c_w| <= 128 and |c_x| <= 32767 (Q6_K: 16 of |c_w| <= 32).
#include "ggml_blocks.h"
#include "ggml_codes.h"

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <memory>
#include <tuple>
#include <vector>

using namespace ggml;

#define TG_INLINE inline __attribute__((always_inline))

namespace {

constexpr int NR = 16;  // weight rows (output columns) per packed panel
// Input rows per micro-kernel call: 4 x 2 int32 accumulators, 2 weight vectors and the 4 rows' broadcast pairs fit
// the 16 registers (at 6 rows GCC loaded all 6 broadcasts first and spilled accumulators to the stack).
constexpr int MR = 4;

// ---- the input rows' 16-bit codes ----

// Row x (k values) -> codes q (round-half-even(x * 32767 / amax) per block of 32), scales d = amax / 32767 and
// the blocks' sums d * sum(q): the Q16_0 blocks of ggml_linear.cpp, split into arrays.
void quantize_row16_scalar(const float* x, int64_t k, int16_t* q, float* d, float* xs) {
    for (int64_t b = 0; b < k / QK; ++b, x += QK, q += QK) {
        const float amax = absmax(x, QK);
        d[b] = amax / kQ16;
        xs[b] = d[b] * static_cast<float>(quantize16(x, QK, amax != 0.0f ? kQ16 / amax : 0.0f, q));
    }
}

#ifdef __AVX2__
// The same codes with AVX2 (quantize16x32_avx2).
void quantize_row16_avx2(const float* x, int64_t k, int16_t* q, float* d, float* xs) {
    for (int64_t b = 0; b < k / QK; ++b, x += QK, q += QK) {
        const float amax = absmax_avx2(x, QK);
        d[b] = amax / kQ16;
        xs[b] = d[b] * static_cast<float>(quantize16x32_avx2(x, amax != 0.0f ? kQ16 / amax : 0.0f, q));
    }
}
#endif

// ---- packing the weight ----

bool has_min(int t) { return t == Q4_1 || t == Q5_1 || t == Q4_K || t == Q5_K; }
int group_of(int t) { return t == Q6_K ? 16 : 32; }
// One weight row's codes c (k ints), scales s (one per group of group_of(t)) and offsets o (one per 32; zero
// for the types without a min): the row's value j is s[j / G] * c[j] + o[j / 32].
void row_codes(int t, const uint8_t* row, int64_t k, int* c, float* s, float* o) {
    if (is_k(t)) {
        int sc16[16], m16[16];
        for (int64_t b = 0; b < k / QKK; ++b) {
            float d, dmin;
            codes256(t, row + b * block_bytes(t), c + b * QKK, sc16, m16, d, dmin);
            if (t == Q6_K) {
                for (int g = 0; g < 16; ++g) s[b * 16 + g] = d * static_cast<float>(sc16[g]);
                for (int g = 0; g < 8; ++g) o[b * 8 + g] = 0.0f;
            } else {  // sc16 / m16 repeat each sub-block of 32's scale and min
                for (int g = 0; g < 8; ++g) {
                    s[b * 8 + g] = d * static_cast<float>(sc16[2 * g]);
                    o[b * 8 + g] = -(dmin * static_cast<float>(m16[2 * g]));
                }
            }
        }
    } else if (is_r4(t)) {  // four blocks per group (ggml_repack's layouts)
        for (int64_t g = 0; g < k / (4 * QK); ++g) {
            for (int bk = 0; bk < 4; ++bk) {
                for (int j = 0; j < QK; ++j) c[(4 * g + bk) * QK + j] = r4_block_code(t, row, g, bk, j);
                s[4 * g + bk] = r4_block_scale(t, row, g, bk);
                o[4 * g + bk] = 0.0f;
            }
        }
    } else {
        for (int64_t b = 0; b < k / QK; ++b) {
            float d, m;
            codes32(t, row + b * block_bytes(t), c + b * QK, d, m);
            s[b] = d;
            o[b] = m;
        }
    }
}

// A packed panel of 16 weight rows; see the file's comment for the layout.
struct Panel {
    int part, type;
    int64_t r0, rows, col;  // its first row in the part, how many of its 16 are real, its first output column
};

struct Packed {
    int64_t k = 0, code_elems = 0, scale_elems = 0, bytes = 0;
    uint8_t* base = nullptr;
    int16_t* codes() const { return reinterpret_cast<int16_t*>(base); }
    float* scales() const { return reinterpret_cast<float*>(base + 2 * code_elems); }
    float* offsets() const { return scales() + scale_elems; }
};

#ifdef __AVX2__
// 32 signed byte codes -> 32 int16 at c.
TG_INLINE void store_widened(__m256i v, int16_t* c) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c), _mm256_cvtepi8_epi16(_mm256_castsi256_si128(v)));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(c + 16), _mm256_cvtepi8_epi16(_mm256_extracti128_si256(v, 1)));
}

// The codes of the types the default GGUF keeps most of its weights in, with AVX2 (false: another type, for the
// scalar form). Q5_0 as R4: block bk's low nibbles are nib01 / nib23's low or high halves; its fifth bit of code j
// is bit bk (j < 16) or bk + 4 (j >= 16) of hb[j % 16].
bool row_codes16_avx2(int t, const uint8_t* row, int64_t k, int16_t* c, float* s, float* o) {
    const __m256i low4 = _mm256_set1_epi8(0x0F), bit4 = _mm256_set1_epi8(0x10), sixteen = _mm256_set1_epi8(16);
    if (t == Q8_0_R4L) {
        for (int64_t g = 0; g < k / (4 * QK); ++g) {
            auto x = reinterpret_cast<const BlockQ8_0R4L*>(row) + g;
            __m256i codes[4];
            q8r4l_blocks(x, codes);
            for (int b = 0; b < 4; ++b) {
                store_widened(codes[b], c + (4 * g + b) * QK);
                s[4 * g + b] = h2f(x->d[b]);
                o[4 * g + b] = 0.0f;
            }
        }
        return true;
    }
    if (t == Q5_0_R4 || t == Q5_0_R4L) {
        // The same fields in R4's and R4L's structs (their scales fp32 / fp16, so at other offsets).
        struct Fields { uint8_t nib01[32]; uint8_t nib23[32]; uint8_t hb[16]; };
        const int64_t stride = block_bytes(t), scales = t == Q5_0_R4L ? 8 : 16;
        for (int64_t g = 0; g < k / (4 * QK); ++g) {
            auto x = reinterpret_cast<const Fields*>(row + g * stride + scales);
            const __m256i n01 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x->nib01));
            const __m256i n23 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(x->nib23));
            const __m128i hb = _mm_loadu_si128(reinterpret_cast<const __m128i*>(x->hb));
            const __m256i h = _mm256_set_m128i(_mm_srli_epi16(hb, 4), hb);  // codes 16..31 read bits 4..7
            const __m256i lo[4] = {_mm256_and_si256(n01, low4), _mm256_and_si256(_mm256_srli_epi16(n01, 4), low4),
                                   _mm256_and_si256(n23, low4), _mm256_and_si256(_mm256_srli_epi16(n23, 4), low4)};
            __m256i codes[4];
            for (int bk = 0; bk < 4; ++bk) {
                // bit bk of each byte moved to bit 4 (the shifts cross bytes; the mask keeps only each byte's own)
                const __m256i high = _mm256_and_si256(bk <= 4 ? _mm256_slli_epi16(h, 4 - bk) : h, bit4);
                codes[bk] = _mm256_sub_epi8(_mm256_or_si256(lo[bk], high), sixteen);
            }
            if (t == Q5_0_R4L) q5l_to_blocks(codes);  // the slots back in the blocks' order
            for (int bk = 0; bk < 4; ++bk) {
                store_widened(codes[bk], c + (4 * g + bk) * QK);
                s[4 * g + bk] = r4_block_scale(t, row, g, bk);
                o[4 * g + bk] = 0.0f;
            }
        }
        return true;
    }
    if (t == Q8_0) {
        for (int64_t b = 0; b < k / QK; ++b) {
            auto x = reinterpret_cast<const BlockQ8_0*>(row) + b;
            store_widened(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(x->qs)), c + b * QK);
            s[b] = h2f(x->d);
            o[b] = 0.0f;
        }
        return true;
    }
    return false;
}

// Rows [16][k] of int16 -> the panel's [k / 2][16][2] layout: 8 x 8 transposes of int32 code pairs.
void interleave_avx2(const int16_t* rows, int64_t k, int16_t* pc) {
    for (int half = 0; half < 2; ++half) {
        for (int64_t p0 = 0; p0 < k / 2; p0 += 8) {
            __m256i v[8], t[8];
            for (int i = 0; i < 8; ++i)
                v[i] = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(rows + (8 * half + i) * k + 2 * p0));
            for (int i = 0; i < 4; ++i) {
                t[2 * i] = _mm256_unpacklo_epi32(v[2 * i], v[2 * i + 1]);
                t[2 * i + 1] = _mm256_unpackhi_epi32(v[2 * i], v[2 * i + 1]);
            }
            for (int i = 0; i < 2; ++i) {
                for (int j = 0; j < 2; ++j) {
                    v[4 * i + 2 * j] = _mm256_unpacklo_epi64(t[4 * i + j], t[4 * i + j + 2]);
                    v[4 * i + 2 * j + 1] = _mm256_unpackhi_epi64(t[4 * i + j], t[4 * i + j + 2]);
                }
            }
            // v[0..3]: rows 0-3, v[4..7]: rows 4-7; in each, 128-bit lane L holds pairs p0 + 4L + {0, 1, 2, 3}
            // (v[0]: pair 0, v[1]: pair 1, v[2]: pair 2, v[3]: pair 3 of each lane)
            for (int j = 0; j < 4; ++j) {
                const __m256i lo = _mm256_permute2x128_si256(v[j], v[4 + j], 0x20);  // pair p0 + j
                const __m256i hi = _mm256_permute2x128_si256(v[j], v[4 + j], 0x31);  // pair p0 + 4 + j
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(pc + (p0 + j) * 2 * NR + 16 * half), lo);
                _mm256_storeu_si256(reinterpret_cast<__m256i*>(pc + (p0 + 4 + j) * 2 * NR + 16 * half), hi);
            }
        }
    }
}
#endif

// One weight row's codes as int16 (see row_codes).
void row_codes16(int t, const uint8_t* row, int64_t k, int16_t* c, float* s, float* o, bool scalar, int* tmp) {
#ifdef __AVX2__
    if (!scalar && row_codes16_avx2(t, row, k, c, s, o)) return;
#endif
    row_codes(t, row, k, tmp, s, o);
    for (int64_t j = 0; j < k; ++j) c[j] = static_cast<int16_t>(tmp[j]);
}

// A thread's scratch for packing: the 16 rows' codes, row-major, and their scales and offsets.
struct PackScratch {
    std::vector<int16_t> rows;
    std::vector<int> wide;
    std::vector<float> s, o;
    explicit PackScratch(int64_t k) : rows(NR * k), wide(k), s(k / 16), o(k / QK) {}
};

// Rows r0 .. r0 + rows of a part into the panel (the missing rows of a last, partial panel are zeros).
void pack_panel(const Panel& pn, const uint8_t* part, int64_t row_bytes, const Packed& pk, bool scalar,
                PackScratch& ws) {
    const int64_t k = pk.k;
    const int g = group_of(pn.type);
    int16_t* pc = pk.codes();
    float* ps = pk.scales();
    float* po = pk.offsets();
    for (int i = 0; i < NR; ++i) {
        int16_t* c = ws.rows.data() + i * k;
        if (i < pn.rows) {
            row_codes16(pn.type, part + (pn.r0 + i) * row_bytes, k, c, ws.s.data(), ws.o.data(), scalar,
                        ws.wide.data());
        } else {
            std::fill(c, c + k, int16_t{0});
            std::fill(ws.s.begin(), ws.s.end(), 0.0f);
            std::fill(ws.o.begin(), ws.o.end(), 0.0f);
        }
        for (int64_t j = 0; j < k / g; ++j) ps[j * NR + i] = ws.s[j];
        if (has_min(pn.type))
            for (int64_t j = 0; j < k / QK; ++j) po[j * NR + i] = ws.o[j];
    }
#ifdef __AVX2__
    if (!scalar && k % 16 == 0) {
        interleave_avx2(ws.rows.data(), k, pc);
        return;
    }
#endif
    for (int i = 0; i < NR; ++i)
        for (int64_t j = 0; j < k; ++j) pc[(j / 2) * 2 * NR + 2 * i + (j & 1)] = ws.rows[i * k + j];
}

// ---- the micro-kernel: R input rows x one panel ----

// The input rows' codes (row stride lda = K int16), their scales and block sums (row stride ldb = K / 32 floats);
// c: the R x 16 fp32 results, accumulated in place from zero. Per group: the integer sums, then one fp32 multiply-add per output with
// the scale s_w * s_x; per block of 32 (types with a min): one more with o_w * x_sum. The scalar form below does the
// same operations in the same order, so the two agree bit for bit.
#ifdef __AVX2__
template <int R, int G, bool MIN>
void tile_avx2(const int16_t* a, int64_t lda, const float* sa, const float* xs, int64_t ldb, const Packed& pk,
               float* c) {
    const int16_t* pc = pk.codes();
    const float* ps = pk.scales();
    const float* po = pk.offsets();
    __m256 acc[R][2];
    for (int r = 0; r < R; ++r) {
        acc[r][0] = _mm256_loadu_ps(c + r * NR);
        acc[r][1] = _mm256_loadu_ps(c + r * NR + 8);
    }
    for (int64_t kb = 0; kb < ldb; ++kb) {
        for (int h = 0; h < QK / G; ++h) {
            const int64_t k0 = kb * QK + h * G;
            const int16_t* b = pc + k0 * NR;
            __m256i s[R][2];
            for (int r = 0; r < R; ++r) s[r][0] = s[r][1] = _mm256_setzero_si256();
            // Unrolled: as a loop GCC copies each sum to another register every pair (8 extra moves a step).
#pragma GCC unroll 16
            for (int q = 0; q < G / 2; ++q) {
                const __m256i b0 = _mm256_load_si256(reinterpret_cast<const __m256i*>(b + q * 2 * NR));
                const __m256i b1 = _mm256_load_si256(reinterpret_cast<const __m256i*>(b + q * 2 * NR + 16));
                for (int r = 0; r < R; ++r) {
                    int32_t pair;
                    std::memcpy(&pair, a + r * lda + k0 + 2 * q, 4);
                    const __m256i av = _mm256_set1_epi32(pair);
                    s[r][0] = _mm256_add_epi32(s[r][0], _mm256_madd_epi16(av, b0));
                    s[r][1] = _mm256_add_epi32(s[r][1], _mm256_madd_epi16(av, b1));
                    // Keeps each sum in its register, one add per product: unrolled, GCC otherwise reassociates
                    // the integer adds into a tree and parks every product on the stack.
                    __asm__("" : "+x"(s[r][0]), "+x"(s[r][1]));
                }
            }
            const float* sw = ps + (k0 / G) * NR;
            const __m256 w0 = _mm256_load_ps(sw), w1 = _mm256_load_ps(sw + 8);
            for (int r = 0; r < R; ++r) {
                const __m256 sx = _mm256_set1_ps(sa[r * ldb + kb]);
                acc[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r][0]), _mm256_mul_ps(w0, sx), acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(s[r][1]), _mm256_mul_ps(w1, sx), acc[r][1]);
            }
        }
        if (MIN) {
            const __m256 o0 = _mm256_load_ps(po + kb * NR), o1 = _mm256_load_ps(po + kb * NR + 8);
            for (int r = 0; r < R; ++r) {
                const __m256 x = _mm256_set1_ps(xs[r * ldb + kb]);
                acc[r][0] = _mm256_fmadd_ps(o0, x, acc[r][0]);
                acc[r][1] = _mm256_fmadd_ps(o1, x, acc[r][1]);
            }
        }
    }
    for (int r = 0; r < R; ++r) {
        _mm256_storeu_ps(c + r * NR, acc[r][0]);
        _mm256_storeu_ps(c + r * NR + 8, acc[r][1]);
    }
}
#endif

template <int G, bool MIN>
void tile_scalar(int rows, const int16_t* a, int64_t lda, const float* sa, const float* xs, int64_t ldb,
                 const Packed& pk, float* c) {
    const int16_t* pc = pk.codes();
    const float* ps = pk.scales();
    const float* po = pk.offsets();
    for (int r = 0; r < rows; ++r) {
        for (int n = 0; n < NR; ++n) {
            float acc = c[r * NR + n];
            for (int64_t kb = 0; kb < ldb; ++kb) {
                for (int h = 0; h < QK / G; ++h) {
                    const int64_t k0 = kb * QK + h * G;
                    int32_t s = 0;
                    for (int j = 0; j < G; ++j)
                        s += static_cast<int32_t>(a[r * lda + k0 + j]) * pc[((k0 + j) / 2) * 2 * NR + 2 * n + (j & 1)];
                    acc = std::fma(static_cast<float>(s), ps[(k0 / G) * NR + n] * sa[r * ldb + kb], acc);
                }
                if (MIN) acc = std::fma(po[kb * NR + n], xs[r * ldb + kb], acc);
            }
            c[r * NR + n] = acc;
        }
    }
}

using TileFn = void (*)(const int16_t*, int64_t, const float*, const float*, int64_t, const Packed&, float*);

template <int G, bool MIN>
void run_tile(bool scalar, int rows, const int16_t* a, int64_t lda, const float* sa, const float* xs, int64_t ldb,
              const Packed& pk, float* c) {
#ifdef __AVX2__
    if (!scalar) {
        static constexpr TileFn fns[MR] = {tile_avx2<1, G, MIN>, tile_avx2<2, G, MIN>, tile_avx2<3, G, MIN>,
                                           tile_avx2<4, G, MIN>};
        fns[rows - 1](a, lda, sa, xs, ldb, pk, c);
        return;
    }
#endif
    tile_scalar<G, MIN>(rows, a, lda, sa, xs, ldb, pk, c);
}

void tile(int type, bool scalar, int rows, const int16_t* a, int64_t lda, const float* sa, const float* xs, int64_t ldb,
          const Packed& pk, float* c) {
    if (type == Q6_K) run_tile<16, false>(scalar, rows, a, lda, sa, xs, ldb, pk, c);
    else if (has_min(type)) run_tile<32, true>(scalar, rows, a, lda, sa, xs, ldb, pk, c);
    else run_tile<32, false>(scalar, rows, a, lda, sa, xs, ldb, pk, c);
}

}  // namespace

// x [M, K] fp32 -> (codes int16 [M, K], scales fp32 [M, K / 32], block sums fp32 [M, K / 32]): the input rows of
// ggml_gemm16, quantized once and shared by every linear (or panel of one) that reads the same rows.
std::tuple<at::Tensor, at::Tensor, at::Tensor> ggml_quantize16(const at::Tensor& x, bool scalar) {
    TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "ggml_quantize16: x must be an fp32 [M, K] tensor");
    const at::Tensor xc = x.contiguous();
    const int64_t m = xc.size(0), k = xc.size(1);
    TORCH_CHECK(k % QK == 0, "ggml_quantize16: K must be a multiple of 32");
    at::Tensor q = at::empty({m, k}, xc.options().dtype(at::kShort));
    at::Tensor d = at::empty({m, k / QK}, xc.options());
    at::Tensor s = at::empty({m, k / QK}, xc.options());
    const float* px = xc.data_ptr<float>();
    int16_t* pq = q.data_ptr<int16_t>();
    float* pd = d.data_ptr<float>();
    float* ps = s.data_ptr<float>();
    at::parallel_for(0, m, 16, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) {
#ifdef __AVX2__
            if (!scalar) {
                quantize_row16_avx2(px + r * k, k, pq + r * k, pd + r * (k / QK), ps + r * (k / QK));
                continue;
            }
#endif
            quantize_row16_scalar(px + r * k, k, pq + r * k, pd + r * (k / QK), ps + r * (k / QK));
        }
    });
    return {q, d, s};
}

// y [M, sum N_i] = rows @ concat(W_i)^T (+ bias), the rows given as ggml_quantize16's (codes, scales, sums) and
// W_i as a GGUF's rows of blocks of types[i] ([N_i, row bytes] uint8, Q5_0 possibly in ggml_repack's R4 layout).
at::Tensor ggml_gemm16(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& sums,
                       const std::vector<int64_t>& types, const std::vector<at::Tensor>& weights,
                       const c10::optional<at::Tensor>& bias, bool scalar) {
    TORCH_CHECK(codes.dim() == 2 && codes.scalar_type() == at::kShort && codes.is_contiguous(),
                "ggml_gemm16: codes must be a contiguous int16 [M, K] tensor");
    const int64_t m = codes.size(0), k = codes.size(1), nb = k / QK;
    TORCH_CHECK(k % QK == 0 && scales.sizes() == at::IntArrayRef({m, nb}) && sums.sizes() == at::IntArrayRef({m, nb}) &&
                    scales.is_contiguous() && sums.is_contiguous() && scales.scalar_type() == at::kFloat &&
                    sums.scalar_type() == at::kFloat,
                "ggml_gemm16: scales and sums must be contiguous fp32 [M, K / 32] tensors");
    TORCH_CHECK(!types.empty() && types.size() == weights.size(), "ggml_gemm16: one type per weight part");
    std::vector<Panel> panels;
    int64_t n_total = 0;
    for (size_t i = 0; i < types.size(); ++i) {
        const int t = static_cast<int>(types[i]);
        TORCH_CHECK(block_bytes(t) > 0, "ggml_gemm16: unsupported ggml type ", t);
        const at::Tensor& w = weights[i];
        TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous() && w.size(1) % block_bytes(t) == 0 &&
                        row_length(t, w.size(1)) == k,
                    "ggml_gemm16: a weight part's rows do not hold K = ", k, " values");
        for (int64_t r = 0; r < w.size(0); r += NR)
            panels.push_back({static_cast<int>(i), t, r, std::min<int64_t>(NR, w.size(0) - r), n_total + r});
        n_total += w.size(0);
    }
    Packed pk;
    pk.k = k;
    pk.code_elems = k * NR;
    pk.scale_elems = k / 16 * NR;
    pk.bytes = (2 * pk.code_elems + 4 * (pk.scale_elems + nb * NR) + 63) / 64 * 64;  // codes, scales, offsets
    const int64_t np = static_cast<int64_t>(panels.size());
    at::Tensor y = at::empty({m, n_total}, codes.options().dtype(at::kFloat));
    float* py = y.data_ptr<float>();
    const int16_t* pa = codes.data_ptr<int16_t>();
    const float* psa = scales.data_ptr<float>();
    const float* pxs = sums.data_ptr<float>();
    // A thread packs one panel at a time into its own buffer (16 x K int16: 28 KB at K = 896, 152 KB for the
    // default model's down) and passes every input row over it while it sits in L1 / L2; the rows (M x K int16)
    // stream from L3. Packing the whole weight first would write it to DRAM and read it back (17 MB for gate/up).
    at::parallel_for(0, np, 1, [&](int64_t p0, int64_t p1) {
        Packed own = pk;
        std::unique_ptr<uint8_t, decltype(&std::free)> mem(
            static_cast<uint8_t*>(std::aligned_alloc(64, pk.bytes)), &std::free);
        TORCH_CHECK(mem, "ggml_gemm16: out of memory");
        own.base = mem.get();
        PackScratch ws(k);
        alignas(32) float c[MR * NR];
        for (int64_t p = p0; p < p1; ++p) {
            const Panel& pn = panels[p];
            const at::Tensor& w = weights[pn.part];
            pack_panel(pn, w.data_ptr<uint8_t>(), w.size(1), own, scalar, ws);
            for (int64_t r = 0; r < m; r += MR) {
                const int rows = static_cast<int>(std::min<int64_t>(MR, m - r));
                std::fill(c, c + MR * NR, 0.0f);
                tile(pn.type, scalar, rows, pa + r * k, k, psa + r * nb, pxs + r * nb, nb, own, c);
                float* out = py + r * n_total + pn.col;
                for (int i = 0; i < rows; ++i)
                    std::memcpy(out + i * n_total, c + i * NR, pn.rows * sizeof(float));
            }
        }
    });
    if (bias.has_value()) y.add_(*bias);
    return y;
}

// Whether ggml_gemm16 runs its AVX2 kernel (else the scalar form: correct, not fast).
bool ggml_gemm16_fast() {
#ifdef __AVX2__
    return true;
#else
    return false;
#endif
}
