// A decode step of a dense Qwen2/Qwen3 model served from a GGUF's own blocks, whole layer stack in one call.
//
// Why: on an AVX2 CPU (where the AVX-512 decoder in decoder.cpp cannot run) the Python layer loop spent
// ~30 ms of a ~70 ms step on ~40 small torch ops per layer (norms, rotary, the cache gather, SDPA's set-up,
// casts), as much as the matmuls themselves. Here the same arithmetic runs in C++ over T sequences at once
// (one new token each), in fp32, reading and writing the paged KV cache (fp16 or fp32) in place.
//
// Numerics follow the Python path (models/qwen.py): RMSNorm in fp32, NeoX rotary with the model's fp32
// tables, softmax attention in fp32, SiLU(gate) * up; the matmuls are ggml_linear's.

#include <torch/extension.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Half.h>

#if defined(__AVX2__) && defined(__F16C__)
#include <immintrin.h>
#endif

#include "vec_avx2.h"

#include <algorithm>
#include <cmath>
#include <vector>

at::Tensor ggml_linear(const at::Tensor& x, const std::vector<int64_t>& types, const std::vector<at::Tensor>& weights,
                       const c10::optional<at::Tensor>& bias, bool scalar, int64_t act_bits);

namespace {

struct Linear {
    std::vector<int64_t> types;
    std::vector<at::Tensor> blocks;
    c10::optional<at::Tensor> bias;
    int64_t act_bits;  // 8: llama.cpp's activation blocks; 16: ours (ggml_linear.cpp)
    at::Tensor operator()(const at::Tensor& x) const { return ggml_linear(x, types, blocks, bias, false, act_bits); }
};

struct Layer {
    at::Tensor input_norm, post_norm;
    c10::optional<at::Tensor> q_norm, k_norm;
    Linear qkv, o, gate_up, down;
    at::Tensor k_cache, v_cache;  // [blocks, block size, Hkv, D], fp16 or fp32
};

// y = x * rsqrt(mean(x^2) + eps) * w over rows of n (in place on y; x may alias y).
void rms_norm_row(const float* x, const float* w, float* y, int64_t n, double eps) {
    double ss = 0.0;
    for (int64_t i = 0; i < n; ++i) ss += static_cast<double>(x[i]) * x[i];
    const float r = static_cast<float>(1.0 / std::sqrt(ss / static_cast<double>(n) + eps));
    for (int64_t i = 0; i < n; ++i) y[i] = w[i] * (x[i] * r);
}

inline float dot(const float* q, const float* k, int64_t d) {
    float s = 0.0f;
    for (int64_t i = 0; i < d; ++i) s += q[i] * k[i];
    return s;
}
inline void axpy(float a, const float* v, float* out, int64_t d) {
    for (int64_t i = 0; i < d; ++i) out[i] += a * v[i];
}

inline float dot(const float* q, const c10::Half* k, int64_t d) {
#if defined(__AVX2__) && defined(__F16C__)
    if (d % 8 == 0) {
        __m256 acc = _mm256_setzero_ps();
        for (int64_t i = 0; i < d; i += 8)
            acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k + i))), acc);
        __m128 r = _mm_add_ps(_mm256_extractf128_ps(acc, 1), _mm256_castps256_ps128(acc));
        r = _mm_add_ps(r, _mm_movehl_ps(r, r));
        r = _mm_add_ss(r, _mm_movehdup_ps(r));
        return _mm_cvtss_f32(r);
    }
#endif
    float s = 0.0f;
    for (int64_t i = 0; i < d; ++i) s += q[i] * static_cast<float>(k[i]);
    return s;
}
inline void axpy(float a, const c10::Half* v, float* out, int64_t d) {
#if defined(__AVX2__) && defined(__F16C__)
    if (d % 8 == 0) {
        const __m256 av = _mm256_set1_ps(a);
        for (int64_t i = 0; i < d; i += 8)
            _mm256_storeu_ps(out + i, _mm256_fmadd_ps(av, _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + i))),
                                                      _mm256_loadu_ps(out + i)));
        return;
    }
#endif
    for (int64_t i = 0; i < d; ++i) out[i] += a * static_cast<float>(v[i]);
}

template <typename C>
void attend(const float* q, const C* kc, const C* vc, const int32_t* table, int64_t ctx, int64_t bs, int64_t nkv,
            int64_t kvh, int64_t d, float scale, float* out, std::vector<float>& scores) {
    scores.resize(ctx);
    float mx = -INFINITY;
    for (int64_t p = 0; p < ctx; ++p) {
        const int64_t slot = static_cast<int64_t>(table[p / bs]) * bs + p % bs;
        scores[p] = dot(q, kc + (slot * nkv + kvh) * d, d) * scale;
        mx = std::max(mx, scores[p]);
    }
    float sum = 0.0f;
    for (int64_t p = 0; p < ctx; ++p) {
        scores[p] = std::exp(scores[p] - mx);
        sum += scores[p];
    }
    std::fill(out, out + d, 0.0f);
    for (int64_t p = 0; p < ctx; ++p) {
        const int64_t slot = static_cast<int64_t>(table[p / bs]) * bs + p % bs;
        axpy(scores[p], vc + (slot * nkv + kvh) * d, out, d);
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < d; ++i) out[i] *= inv;
}

#if defined(__AVX2__) && defined(__F16C__)
inline __m256 load8(const c10::Half* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }

// The 8 horizontal sums of a[0..7], lane j holding a[j]'s.
inline __m256 hsums8(const __m256* a) {
    const __m256 s0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    const __m256 s1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(s0, s1, 0x20), _mm256_permute2f128_ps(s0, s1, 0x31));
}


// Keys (values) are fetched this many ahead of their use. Why: the cache is read in 128-byte pieces at a
// 256-byte stride through scattered 4 KB pages, which the hardware prefetcher does not follow across pages:
// without this, decode attention at 16K tokens waited on memory most of its time (perf: 54% of its samples
// on the first use of a key), though it needs a small share of the machine's bandwidth.
constexpr int64_t kAhead = 16;
template <typename C>
inline void prefetch_row(const C* p, int64_t d) {
    const char* c = reinterpret_cast<const char*>(p);
    for (int64_t b = 0; b < d * static_cast<int64_t>(sizeof(C)); b += 64) _mm_prefetch(c + b, _MM_HINT_T0);
}

// Attention of g <= 8 query heads that share one KV head (GQA), for one new token over its ctx cached keys.
// Why grouped: each cached key and value is read and converted from fp16 once for the g heads instead of g
// times, the g scores of a key come out as one vector (lane = head), so the max, exp and sum run 8 heads
// wide, and the values are accumulated for all g heads from one load. q: g heads, d floats apart; out likewise.
// The sums run in a fixed order over the keys, so a row's result does not depend on the rows beside it.
template <int G, typename C>
void attend_group(const float* q, const C* kc, const C* vc, const int32_t* table, int64_t ctx,
                  int64_t bs, int64_t nkv, int64_t kvh, int64_t d, float scale, float* out, std::vector<float>& scores,
                  std::vector<int64_t>& offsets) {
    scores.resize(static_cast<size_t>(ctx) * 8);
    float* sc = scores.data();
    // Each key's element offset in the cache, once (a division per key per pass cost more than the arithmetic).
    offsets.resize(static_cast<size_t>(ctx));
    for (int64_t p = 0, b = 0; p < ctx; ++b)
        for (int64_t o = 0; o < bs && p < ctx; ++o, ++p) offsets[p] = ((static_cast<int64_t>(table[b]) * bs + o) * nkv + kvh) * d;
    const int64_t* off = offsets.data();
    const __m256 vscale = _mm256_set1_ps(scale);
    __m256 mx = _mm256_set1_ps(-INFINITY);
    for (int64_t p = 0; p < ctx; ++p) {
        const C* k = kc + off[p];
        if (p + kAhead < ctx) prefetch_row(kc + off[p + kAhead], d);
        __m256 acc[8];
        for (int j = 0; j < 8; ++j) acc[j] = _mm256_setzero_ps();  // lanes past G stay 0
        for (int64_t c = 0; c < d; c += 8) {
            const __m256 kv = load8(k + c);
            for (int j = 0; j < G; ++j) acc[j] = _mm256_fmadd_ps(_mm256_loadu_ps(q + j * d + c), kv, acc[j]);
        }
        const __m256 s = _mm256_mul_ps(hsums8(acc), vscale);
        _mm256_storeu_ps(sc + 8 * p, s);
        mx = _mm256_max_ps(mx, s);
    }
    __m256 sum = _mm256_setzero_ps();
    for (int64_t p = 0; p < ctx; ++p) {
        const __m256 e = tg2::exp256(_mm256_sub_ps(_mm256_loadu_ps(sc + 8 * p), mx));
        _mm256_storeu_ps(sc + 8 * p, e);
        sum = _mm256_add_ps(sum, e);
    }
    for (int j = 0; j < G; ++j) std::fill(out + j * d, out + j * d + d, 0.0f);
    constexpr int64_t tile = 128;  // keys per pass over the dimensions: their values stay in L1
    for (int64_t p0 = 0; p0 < ctx; p0 += tile) {
        const int64_t p1 = std::min(ctx, p0 + tile);
        for (int64_t c = 0; c < d; c += 8) {
            __m256 acc[8];
            for (int j = 0; j < G; ++j) acc[j] = _mm256_loadu_ps(out + j * d + c);
            for (int64_t p = p0; p < p1; ++p) {
                if (c == 0 && p + kAhead < ctx) prefetch_row(vc + off[p + kAhead], d);
                const __m256 v = load8(vc + off[p] + c);
                for (int j = 0; j < G; ++j) acc[j] = _mm256_fmadd_ps(_mm256_broadcast_ss(sc + 8 * p + j), v, acc[j]);
            }
            for (int j = 0; j < G; ++j) _mm256_storeu_ps(out + j * d + c, acc[j]);
        }
    }
    alignas(32) float sums[8];
    _mm256_store_ps(sums, sum);
    for (int j = 0; j < G; ++j) {
        const float inv = 1.0f / sums[j];
        for (int64_t i = 0; i < d; ++i) out[j * d + i] *= inv;
    }
}
// The group size as a constant, so the compiler keeps the g accumulators in registers.
template <typename C>
void attend_group(const float* q, int64_t g, const C* kc, const C* vc, const int32_t* table, int64_t ctx, int64_t bs,
                  int64_t nkv, int64_t kvh, int64_t d, float scale, float* out, std::vector<float>& scores,
                  std::vector<int64_t>& offsets) {
    switch (g) {
#define TG_GROUP(n) case n: attend_group<n>(q, kc, vc, table, ctx, bs, nkv, kvh, d, scale, out, scores, offsets); break;
        TG_GROUP(1) TG_GROUP(2) TG_GROUP(3) TG_GROUP(4) TG_GROUP(5) TG_GROUP(6) TG_GROUP(7) TG_GROUP(8)
#undef TG_GROUP
        default: TORCH_CHECK(false, "GGMLDecoder: more than 8 query heads per KV head");
    }
}
#endif

// out[j] = SiLU(gate[j]) * up[j] = gate / (1 + exp(-gate)) * up.
inline void silu_mul_row(const float* gate, const float* up, float* out, int64_t n) {
    int64_t j = 0;
#if defined(__AVX2__) && defined(__F16C__)
    const __m256 one = _mm256_set1_ps(1.0f);
    for (; j + 8 <= n; j += 8) {
        const __m256 a = _mm256_loadu_ps(gate + j);
        const __m256 e = tg2::exp256(_mm256_sub_ps(_mm256_setzero_ps(), a));
        _mm256_storeu_ps(out + j, _mm256_mul_ps(_mm256_div_ps(a, _mm256_add_ps(one, e)), _mm256_loadu_ps(up + j)));
    }
#endif
    for (; j < n; ++j) out[j] = gate[j] / (1.0f + std::exp(-gate[j])) * up[j];
}

template <typename C>
void store(C* dst, const float* src, int64_t d) {
    for (int64_t i = 0; i < d; ++i) dst[i] = static_cast<C>(src[i]);
}

}  // namespace

class GGMLDecoder {
public:
    GGMLDecoder(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale, at::Tensor cos,
                at::Tensor sin, at::Tensor final_norm)
        : nq_(num_heads), nkv_(num_kv_heads), d_(head_dim), eps_(eps), scale_(scale), cos_(cos.contiguous().to(at::kFloat)),
          sin_(sin.contiguous().to(at::kFloat)), final_norm_(final_norm.contiguous().to(at::kFloat)) {}

    void add_layer(at::Tensor input_norm, at::Tensor post_norm, c10::optional<at::Tensor> q_norm,
                   c10::optional<at::Tensor> k_norm, std::vector<int64_t> qkv_types, std::vector<at::Tensor> qkv,
                   c10::optional<at::Tensor> qkv_bias, std::vector<int64_t> o_types, std::vector<at::Tensor> o,
                   std::vector<int64_t> gu_types, std::vector<at::Tensor> gate_up, std::vector<int64_t> down_types,
                   std::vector<at::Tensor> down, at::Tensor k_cache, at::Tensor v_cache, int64_t act_bits) {
        TORCH_CHECK(k_cache.scalar_type() == at::kHalf || k_cache.scalar_type() == at::kFloat,
                    "GGMLDecoder: the KV cache must be fp16 or fp32");
        auto f32 = [](const at::Tensor& t) { return t.contiguous().to(at::kFloat); };
        auto opt = [&](const c10::optional<at::Tensor>& t) -> c10::optional<at::Tensor> {
            return t.has_value() ? c10::optional<at::Tensor>(f32(*t)) : c10::nullopt;
        };
        layers_.push_back(Layer{f32(input_norm), f32(post_norm), opt(q_norm), opt(k_norm),
                                Linear{qkv_types, qkv, opt(qkv_bias), act_bits}, Linear{o_types, o, c10::nullopt, act_bits},
                                Linear{gu_types, gate_up, c10::nullopt, act_bits},
                                Linear{down_types, down, c10::nullopt, act_bits},
                                k_cache, v_cache});
    }

    // x: embedded tokens [T, H] (one per sequence); returns the final-normed hidden states [T, H] (fp32).
    at::Tensor forward(const at::Tensor& x_in, const at::Tensor& positions, const at::Tensor& slot_mapping,
                       const at::Tensor& block_tables, const at::Tensor& context_lens) const {
        const int64_t t = x_in.size(0), h = x_in.size(1), nq = nq_, nkv = nkv_, d = d_, half = d_ / 2;
        at::Tensor residual = x_in.to(at::kFloat).contiguous().clone();
        at::Tensor hs = at::empty_like(residual);
        const at::Tensor pos = positions.to(at::kLong).contiguous(), slots = slot_mapping.to(at::kLong).contiguous();
        const at::Tensor tables = block_tables.to(at::kInt).contiguous(), lens = context_lens.to(at::kInt).contiguous();
        const int64_t width = tables.size(1);
        float* res = residual.data_ptr<float>();
        float* hp = hs.data_ptr<float>();
        at::Tensor attn = at::empty({t, nq * d}, residual.options());
        bool first = true;
        for (const Layer& L : layers_) {
            // residual += previous layer's output (in hp); hp = norm(residual)
            for (int64_t i = 0; i < t; ++i) {
                float* r = res + i * h;
                if (!first) for (int64_t j = 0; j < h; ++j) r[j] += hp[i * h + j];
                rms_norm_row(r, L.input_norm.data_ptr<float>(), hp + i * h, h, eps_);
            }
            first = false;
            at::Tensor qkv = L.qkv(hs);  // [T, (Hq + 2 Hkv) D]
            float* qp = qkv.data_ptr<float>();
            const int64_t bs = L.k_cache.size(1);
            for (int64_t i = 0; i < t; ++i) {
                float* row = qp + i * (nq + 2 * nkv) * d;
                const int64_t p = pos.data_ptr<int64_t>()[i];
                const float* c = cos_.data_ptr<float>() + p * half;
                const float* s = sin_.data_ptr<float>() + p * half;
                for (int64_t hd = 0; hd < nq + nkv; ++hd) {
                    float* v = row + hd * d;
                    if (L.q_norm.has_value()) {
                        const float* w = (hd < nq ? *L.q_norm : *L.k_norm).data_ptr<float>();
                        rms_norm_row(v, w, v, d, eps_);
                    }
                    for (int64_t j = 0; j < half; ++j) {
                        const float a = v[j], b = v[j + half];
                        v[j] = a * c[j] - b * s[j];
                        v[j + half] = b * c[j] + a * s[j];
                    }
                }
                const int64_t slot = slots.data_ptr<int64_t>()[i];
                if (L.k_cache.scalar_type() == at::kHalf) {
                    store(L.k_cache.data_ptr<c10::Half>() + slot * nkv * d, row + nq * d, nkv * d);
                    store(L.v_cache.data_ptr<c10::Half>() + slot * nkv * d, row + (nq + nkv) * d, nkv * d);
                } else {
                    store(L.k_cache.data_ptr<float>() + slot * nkv * d, row + nq * d, nkv * d);
                    store(L.v_cache.data_ptr<float>() + slot * nkv * d, row + (nq + nkv) * d, nkv * d);
                }
            }
            float* ap = attn.data_ptr<float>();
            const int64_t group = nq / nkv;
#if defined(__AVX2__) && defined(__F16C__)
            if (group <= 8 && d % 8 == 0) {
                at::parallel_for(0, t * nkv, 1, [&](int64_t a0, int64_t a1) {
                    std::vector<float> scores;
                    std::vector<int64_t> offsets;
                    for (int64_t a = a0; a < a1; ++a) {
                        const int64_t i = a / nkv, kvh = a % nkv;
                        const float* q = qp + i * (nq + 2 * nkv) * d + kvh * group * d;
                        const int32_t* table = tables.data_ptr<int32_t>() + i * width;
                        const int64_t ctx = lens.data_ptr<int32_t>()[i];
                        float* out = ap + i * nq * d + kvh * group * d;
                        if (L.k_cache.scalar_type() == at::kHalf)
                            attend_group(q, group, L.k_cache.data_ptr<c10::Half>(), L.v_cache.data_ptr<c10::Half>(), table,
                                         ctx, bs, nkv, kvh, d, static_cast<float>(scale_), out, scores, offsets);
                        else
                            attend_group(q, group, L.k_cache.data_ptr<float>(), L.v_cache.data_ptr<float>(), table, ctx,
                                         bs, nkv, kvh, d, static_cast<float>(scale_), out, scores, offsets);
                    }
                });
            } else
#endif
            at::parallel_for(0, t * nq, 1, [&](int64_t a0, int64_t a1) {
                std::vector<float> scores;
                for (int64_t a = a0; a < a1; ++a) {
                    const int64_t i = a / nq, head = a % nq, kvh = head / group;
                    const float* q = qp + i * (nq + 2 * nkv) * d + head * d;
                    const int32_t* table = tables.data_ptr<int32_t>() + i * width;
                    const int64_t ctx = lens.data_ptr<int32_t>()[i];
                    if (L.k_cache.scalar_type() == at::kHalf)
                        attend(q, L.k_cache.data_ptr<c10::Half>(), L.v_cache.data_ptr<c10::Half>(), table, ctx, bs, nkv,
                               kvh, d, static_cast<float>(scale_), ap + i * nq * d + head * d, scores);
                    else
                        attend(q, L.k_cache.data_ptr<float>(), L.v_cache.data_ptr<float>(), table, ctx, bs, nkv, kvh,
                               d, static_cast<float>(scale_), ap + i * nq * d + head * d, scores);
                }
            });
            at::Tensor o = L.o(attn);
            const float* op = o.data_ptr<float>();
            for (int64_t i = 0; i < t; ++i) {
                float* r = res + i * h;
                for (int64_t j = 0; j < h; ++j) r[j] += op[i * h + j];
                rms_norm_row(r, L.post_norm.data_ptr<float>(), hp + i * h, h, eps_);
            }
            at::Tensor gu = L.gate_up(hs);  // [T, 2I]: gate rows, then up rows
            const int64_t inter = gu.size(1) / 2;
            at::Tensor act = at::empty({t, inter}, residual.options());
            float* g = gu.data_ptr<float>();
            float* ac = act.data_ptr<float>();
            for (int64_t i = 0; i < t; ++i) silu_mul_row(g + i * 2 * inter, g + i * 2 * inter + inter, ac + i * inter, inter);
            at::Tensor down = L.down(act);
            std::copy(down.data_ptr<float>(), down.data_ptr<float>() + t * h, hp);
        }
        at::Tensor out = at::empty_like(residual);
        for (int64_t i = 0; i < t; ++i) {
            float* r = res + i * h;
            for (int64_t j = 0; j < h; ++j) r[j] += hp[i * h + j];
            rms_norm_row(r, final_norm_.data_ptr<float>(), out.data_ptr<float>() + i * h, h, eps_);
        }
        return out;
    }

    int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

private:
    int64_t nq_, nkv_, d_;
    double eps_, scale_;
    at::Tensor cos_, sin_, final_norm_;
    std::vector<Layer> layers_;
};

// out[i, :p] = SiLU(x[i, :p]) * x[i, p:] for x [T, 2p] (one panel of gate/up columns, gate then up) into a
// [T, >= p] view whose rows may be longer: prefill writes each panel's activations in place in the full
// [T, I] activation, so the [T, 2I] gate/up product never exists whole (BENCHMARKS.md, "CPU, fifth round").
void ggml_silu_mul(const at::Tensor& x, at::Tensor out) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.scalar_type() == at::kFloat && x.size(1) % 2 == 0,
                "ggml_silu_mul: x must be a contiguous fp32 [T, 2p] tensor");
    const int64_t t = x.size(0), p = x.size(1) / 2;
    TORCH_CHECK(out.dim() == 2 && out.scalar_type() == at::kFloat && out.size(0) == t && out.size(1) == p &&
                    out.stride(1) == 1, "ggml_silu_mul: out must be an fp32 [T, p] view with unit column stride");
    const float* px = x.data_ptr<float>();
    float* po = out.data_ptr<float>();
    const int64_t ld = out.stride(0);
    at::parallel_for(0, t, 8, [&](int64_t i0, int64_t i1) {
        for (int64_t i = i0; i < i1; ++i) silu_mul_row(px + i * 2 * p, px + i * 2 * p + p, po + i * ld, p);
    });
}

void bind_ggml_decoder(py::module& m) {
    m.def("ggml_silu_mul", &ggml_silu_mul, "SiLU(gate) * up of a [T, 2p] gate/up panel into a [T, p] view",
          py::call_guard<py::gil_scoped_release>(),
          py::arg("x"), py::arg("out"));
    py::class_<GGMLDecoder>(m, "GGMLDecoder")
        .def(py::init<int64_t, int64_t, int64_t, double, double, at::Tensor, at::Tensor, at::Tensor>())
        .def("add_layer", &GGMLDecoder::add_layer)
        .def("forward", &GGMLDecoder::forward, py::call_guard<py::gil_scoped_release>())  // a whole step: see ggml_bindings.cpp
        .def("num_layers", &GGMLDecoder::num_layers);
}
