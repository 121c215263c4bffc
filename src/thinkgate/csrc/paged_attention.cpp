// Decode attention on the CPU: one query per sequence (and its GQA group) against the sequence's paged
// fp32 K/V cache, read in place through the block table, softmax in fp32.
//
// Why the shape of the fast path: a thinking model's contexts run to thousands of tokens, where this is
// most of a step. Per (kv head, sequence) task, keys are taken 16 positions at a time; each query's 16 dot
// products are summed by one transpose-and-add tree (about 3 vector ops per score instead of a horizontal
// reduction per score), and the weighted sum of values keeps up to 4 queries' outputs in registers while
// the value rows stream past. Head sizes that are not a multiple of 16 (or above 128) take the general
// loop below, which computes the same thing.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace {

inline __m512 pick_add(__m512 a, __m512 b, __m512i lo, __m512i hi) {
    return _mm512_add_ps(_mm512_permutex2var_ps(a, lo, b), _mm512_permutex2var_ps(a, hi, b));
}

// S[j] = sum of the lanes of p[j], for 16 vectors at once.
inline __m512 sum16(__m512* p) {
    const __m512i h_lo = _mm512_set_epi32(23, 22, 21, 20, 19, 18, 17, 16, 7, 6, 5, 4, 3, 2, 1, 0);
    const __m512i h_hi = _mm512_set_epi32(31, 30, 29, 28, 27, 26, 25, 24, 15, 14, 13, 12, 11, 10, 9, 8);
    const __m512i q_lo = _mm512_set_epi32(27, 26, 25, 24, 11, 10, 9, 8, 19, 18, 17, 16, 3, 2, 1, 0);
    const __m512i q_hi = _mm512_set_epi32(31, 30, 29, 28, 15, 14, 13, 12, 23, 22, 21, 20, 7, 6, 5, 4);
    const __m512i p_lo = _mm512_set_epi32(29, 28, 13, 12, 25, 24, 9, 8, 21, 20, 5, 4, 17, 16, 1, 0);
    const __m512i p_hi = _mm512_set_epi32(31, 30, 15, 14, 27, 26, 11, 10, 23, 22, 7, 6, 19, 18, 3, 2);
    const __m512i s_lo = _mm512_set_epi32(30, 14, 28, 12, 26, 10, 24, 8, 22, 6, 20, 4, 18, 2, 16, 0);
    const __m512i s_hi = _mm512_set_epi32(31, 15, 29, 13, 27, 11, 25, 9, 23, 7, 21, 5, 19, 3, 17, 1);
    __m512 l1[8], l2[4], l3[2];
    for (int i = 0; i < 8; ++i) l1[i] = pick_add(p[i], p[i + 8], h_lo, h_hi);    // 8 partials of p[i] | p[i+8]
    for (int i = 0; i < 4; ++i) l2[i] = pick_add(l1[i], l1[i + 4], q_lo, q_hi);  // 4 partials each
    for (int i = 0; i < 2; ++i) l3[i] = pick_add(l2[i], l2[i + 2], p_lo, p_hi);  // 2 partials each
    return pick_add(l3[0], l3[1], s_lo, s_hi);
}

// Each of `rows` rows of `len` scores replaced by its softmax.
void softmax_rows(float* scores, int64_t rows, int64_t len) {
    for (int64_t g = 0; g < rows; ++g) {
        float* s = scores + g * len;
        __m512 mx = _mm512_set1_ps(-INFINITY);
        for (int64_t pos = 0; pos < len; pos += 16) mx = _mm512_max_ps(mx, _mm512_mask_loadu_ps(mx, tg::tail_mask(len - pos), s + pos));
        const __m512 top = _mm512_set1_ps(_mm512_reduce_max_ps(mx));
        __m512 sum = _mm512_setzero_ps();
        for (int64_t pos = 0; pos < len; pos += 16) {
            const __mmask16 m = tg::tail_mask(len - pos);
            const __m512 e = _mm512_maskz_mov_ps(m, tg::exp16(_mm512_sub_ps(tg::load16(s + pos, m), top)));
            tg::store16(s + pos, e, m);
            sum = _mm512_add_ps(sum, e);
        }
        const __m512 inv = _mm512_set1_ps(1.0f / _mm512_reduce_add_ps(sum));
        for (int64_t pos = 0; pos < len; pos += 16) {
            const __mmask16 m = tg::tail_mask(len - pos);
            tg::store16(s + pos, _mm512_mul_ps(tg::load16(s + pos, m), inv), m);
        }
    }
}

template <int NV>  // head size / 16
void attend_fast(const float* q0, float* o0, int64_t group, int64_t len, const int32_t* table, int64_t bs,
                 int64_t hkv, int64_t h, const float* kc, const float* vc, float sc, std::vector<float>& scores,
                 std::vector<int64_t>& rows) {
    constexpr int64_t d = NV * 16;
    rows.resize(len);
    for (int64_t pos = 0; pos < len; ++pos)  // the offset of each position's row (K and V share it)
        rows[pos] = ((static_cast<int64_t>(table[pos / bs]) * bs + pos % bs) * hkv + h) * d;
    scores.resize(group * len);
    for (int64_t p0 = 0; p0 < len; p0 += 16) {  // 16 keys at a time, reused by every query of the group
        const int64_t n = std::min<int64_t>(16, len - p0);
        for (int64_t g = 0; g < group; ++g) {
            __m512 qv[NV];
            for (int v = 0; v < NV; ++v) qv[v] = _mm512_loadu_ps(q0 + g * d + 16 * v);
            __m512 part[16];
            for (int64_t j = 0; j < 16; ++j) {
                if (j >= n) {
                    part[j] = _mm512_setzero_ps();
                    continue;
                }
                const float* k = kc + rows[p0 + j];
                __m512 acc = _mm512_mul_ps(qv[0], _mm512_loadu_ps(k));
                for (int v = 1; v < NV; ++v) acc = _mm512_fmadd_ps(qv[v], _mm512_loadu_ps(k + 16 * v), acc);
                part[j] = acc;
            }
            _mm512_mask_storeu_ps(scores.data() + g * len + p0, tg::tail_mask(n),
                                  _mm512_mul_ps(sum16(part), _mm512_set1_ps(sc)));
        }
    }
    softmax_rows(scores.data(), group, len);
    constexpr int64_t kChunk = NV >= 8 ? 2 : 4;  // queries whose outputs stay in registers
    for (int64_t g0 = 0; g0 < group; g0 += kChunk) {
        const int64_t gc = std::min(kChunk, group - g0);
        __m512 acc[kChunk][NV];
        for (int c = 0; c < kChunk; ++c)
            for (int v = 0; v < NV; ++v) acc[c][v] = _mm512_setzero_ps();
        for (int64_t pos = 0; pos < len; ++pos) {
            const float* vr = vc + rows[pos];
            __m512 vv[NV];
            for (int v = 0; v < NV; ++v) vv[v] = _mm512_loadu_ps(vr + 16 * v);
            for (int c = 0; c < kChunk; ++c) {
                if (c >= gc) break;
                const __m512 p = _mm512_set1_ps(scores[(g0 + c) * len + pos]);
                for (int v = 0; v < NV; ++v) acc[c][v] = _mm512_fmadd_ps(p, vv[v], acc[c][v]);
            }
        }
        for (int c = 0; c < gc; ++c)
            for (int v = 0; v < NV; ++v) _mm512_storeu_ps(o0 + (g0 + c) * d + 16 * v, acc[c][v]);
    }
}

void attend_general(const float* q0, float* o0, int64_t group, int64_t len, int64_t d, const int32_t* table,
                    int64_t bs, int64_t hkv, int64_t h, const float* kc, const float* vc, float sc,
                    std::vector<float>& scores) {
    scores.resize(group * len);
    for (int64_t pos = 0; pos < len; ++pos) {  // scores of the group's queries against each key
        const float* k = kc + ((static_cast<int64_t>(table[pos / bs]) * bs + pos % bs) * hkv + h) * d;
        for (int64_t g = 0; g < group; ++g) {
            __m512 acc = _mm512_setzero_ps();
            for (int64_t j = 0; j < d; j += 16) {
                const __mmask16 m = tg::tail_mask(d - j);
                acc = _mm512_fmadd_ps(tg::load16(q0 + g * d + j, m), tg::load16(k + j, m), acc);
            }
            scores[g * len + pos] = _mm512_reduce_add_ps(acc) * sc;
        }
    }
    softmax_rows(scores.data(), group, len);
    std::fill(o0, o0 + group * d, 0.0f);
    for (int64_t pos = 0; pos < len; ++pos) {  // the weighted sum of the values
        const float* v = vc + ((static_cast<int64_t>(table[pos / bs]) * bs + pos % bs) * hkv + h) * d;
        for (int64_t g = 0; g < group; ++g) {
            const __m512 p = _mm512_set1_ps(scores[g * len + pos]);
            float* o = o0 + g * d;
            for (int64_t j = 0; j < d; j += 16) {
                const __mmask16 m = tg::tail_mask(d - j);
                tg::store16(o + j, _mm512_fmadd_ps(p, tg::load16(v + j, m), tg::load16(o + j, m)), m);
            }
        }
    }
}

}  // namespace

// q [B, Hq, D]; caches [N, bs, Hkv, D] fp32; block_tables [B, M] int32; context_lens [B] int32.
// Returns [B, Hq, D] in q's dtype: softmax(scale * q K^T) V over each sequence's context, in fp32.
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale) {
    TORCH_CHECK(q.dim() == 3, "paged_decode_attention: q must be [B, Hq, D]");
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat && k_cache.is_contiguous() && v_cache.is_contiguous(),
                "paged_decode_attention: the CPU caches are contiguous fp32");
    const int64_t b = q.size(0), hq = q.size(1), d = q.size(2);
    const int64_t bs = k_cache.size(1), hkv = k_cache.size(2), group = hq / hkv;
    at::Tensor qf = q.to(at::kFloat).contiguous();
    at::Tensor tables = block_tables.to(at::kInt).contiguous(), lens = context_lens.to(at::kInt).contiguous();
    at::Tensor out = at::empty({b, hq, d}, qf.options());
    const float* qp = qf.data_ptr<float>();
    const float* kc = k_cache.data_ptr<float>();
    const float* vc = v_cache.data_ptr<float>();
    const int32_t* tp = tables.data_ptr<int32_t>();
    const int32_t* lp = lens.data_ptr<int32_t>();
    float* op = out.data_ptr<float>();
    const int64_t width = tables.size(1);
    const float sc = static_cast<float>(scale);
    at::parallel_for(0, b * hkv, 1, [&](int64_t i0, int64_t i1) {
        std::vector<float> scores;
        std::vector<int64_t> rows;
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t seq = i / hkv, h = i % hkv, len = lp[seq];
            const int32_t* table = tp + seq * width;
            const float* q0 = qp + (seq * hq + h * group) * d;  // the group's queries, one after another
            float* o0 = op + (seq * hq + h * group) * d;
            switch (d) {
                case 64: attend_fast<4>(q0, o0, group, len, table, bs, hkv, h, kc, vc, sc, scores, rows); break;
                case 128: attend_fast<8>(q0, o0, group, len, table, bs, hkv, h, kc, vc, sc, scores, rows); break;
                case 32: attend_fast<2>(q0, o0, group, len, table, bs, hkv, h, kc, vc, sc, scores, rows); break;
                case 16: attend_fast<1>(q0, o0, group, len, table, bs, hkv, h, kc, vc, sc, scores, rows); break;
                default: attend_general(q0, o0, group, len, d, table, bs, hkv, h, kc, vc, sc, scores);
            }
        }
    });
    return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}
