// The small per-layer operations of a CPU decode step, each one pass in C++.
//
// Why: in plain PyTorch a layer of a 0.5B model is ~55 small ops (an RMSNorm alone is a cast, the norm's
// pow/mean/rsqrt/mul, a cast back and a weight multiply), 2-20 us each on this CPU, ~7 ms of a ~25 ms
// step. These fuse them the way the GPU path's Triton kernels do (layers/triton_fused.py), and round to
// the activation dtype wherever the PyTorch reference rounds, so both paths compute the same numbers up to
// the order of fp32 sums:
// - rms_norm: optional residual add, then Qwen's RMSNorm;
// - qk_norm_rope_store: per-head q/k RMSNorm (Qwen3), NeoX rotary in place, k/v written to cache slots;
// - silu_mul: SwiGLU's silu(gate) * up;
// - paged_decode_attention: one query per sequence against its paged fp32 K/V cache, read in place.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace {

// The value PyTorch would hold after storing v in a tensor of type T (rounding to bf16 when T is bf16).
template <typename T>
inline float rnd(float v) {
    return static_cast<float>(static_cast<T>(v));
}

template <typename T>
void rms_norm_rows(const T* x, const T* res, const T* w, T* out, T* res_out, int64_t rows, int64_t h, float eps) {
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
        std::vector<float> buf(h);
        for (int64_t r = r0; r < r1; ++r) {
            float ss = 0.0f;
            for (int64_t i = 0; i < h; ++i) {
                float v = static_cast<float>(x[r * h + i]);
                if (res != nullptr) {
                    v = rnd<T>(v + static_cast<float>(res[r * h + i]));
                    res_out[r * h + i] = static_cast<T>(v);
                }
                buf[i] = v;
                ss += v * v;
            }
            const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(h) + eps);
            for (int64_t i = 0; i < h; ++i)
                out[r * h + i] = static_cast<T>(rnd<T>(buf[i] * rstd) * static_cast<float>(w[i]));
        }
    });
}

}  // namespace

// x [T, H]; weight [H]; residual [T, H] or None. Returns (norm(x + residual) * weight, x + residual);
// without a residual the second value is x.
std::vector<at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                 const c10::optional<at::Tensor>& residual) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous(), "rms_norm: x must be a contiguous [T, H] tensor");
    at::Tensor w = weight.to(x.scalar_type()).contiguous();
    at::Tensor out = at::empty_like(x);
    const bool has_res = residual.has_value();
    at::Tensor res = has_res ? residual->contiguous() : x;
    at::Tensor res_out = has_res ? at::empty_like(x) : x;
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "rms_norm", [&] {
        rms_norm_rows<scalar_t>(x.data_ptr<scalar_t>(), has_res ? res.data_ptr<scalar_t>() : nullptr,
                                w.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(),
                                has_res ? res_out.data_ptr<scalar_t>() : nullptr, x.size(0), x.size(1),
                                static_cast<float>(eps));
    });
    return {out, res_out};
}

// qkv [T, Hq + 2 Hkv, D] (rows contiguous). In place: q and k heads normed (when weights are given) and
// rotated; k and v stored at their cache slots. cos/sin: fp32 tables [P, D/2]; caches [N, bs, Hkv, D].
void qk_norm_rope_store(const at::Tensor& qkv, int64_t nq, int64_t nkv, const c10::optional<at::Tensor>& q_weight,
                        const c10::optional<at::Tensor>& k_weight, double eps, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& positions, const at::Tensor& slot_mapping,
                        const at::Tensor& k_cache, const at::Tensor& v_cache) {
    TORCH_CHECK(qkv.dim() == 3 && qkv.stride(2) == 1 && qkv.stride(1) == qkv.size(2), "qk_norm_rope_store: bad qkv");
    TORCH_CHECK(k_cache.scalar_type() == at::kFloat && v_cache.scalar_type() == at::kFloat && k_cache.is_contiguous()
                && v_cache.is_contiguous(), "qk_norm_rope_store: the CPU caches are contiguous fp32");
    const int64_t t = qkv.size(0), heads = qkv.size(1), d = qkv.size(2), half = d / 2;
    TORCH_CHECK(heads == nq + 2 * nkv, "qk_norm_rope_store: head count mismatch");
    const bool has_norm = q_weight.has_value();
    at::Tensor pos = positions.to(at::kLong).contiguous(), slots = slot_mapping.to(at::kLong).contiguous();
    at::Tensor qw = has_norm ? q_weight->to(at::kFloat).contiguous() : at::Tensor();
    at::Tensor kw = has_norm ? k_weight->to(at::kFloat).contiguous() : at::Tensor();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    const int64_t* slp = slots.data_ptr<int64_t>();
    float* kc = k_cache.data_ptr<float>();
    float* vc = v_cache.data_ptr<float>();
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "qk_norm_rope_store", [&] {
        using T = scalar_t;
        T* base = qkv.data_ptr<T>();
        const int64_t stride_t = qkv.stride(0);
        at::parallel_for(0, t * heads, 64, [&](int64_t i0, int64_t i1) {
            std::vector<float> x1(half), x2(half);
            for (int64_t i = i0; i < i1; ++i) {
                const int64_t tok = i / heads, h = i % heads;
                T* row = base + tok * stride_t + h * d;
                for (int64_t j = 0; j < half; ++j) {
                    x1[j] = static_cast<float>(row[j]);
                    x2[j] = static_cast<float>(row[half + j]);
                }
                const int64_t slot = slp[tok];
                if (h >= nq + nkv) {  // a value head: stored as it is
                    float* dst = vc + (slot * nkv + (h - nq - nkv)) * d;
                    for (int64_t j = 0; j < half; ++j) {
                        dst[j] = x1[j];
                        dst[half + j] = x2[j];
                    }
                    continue;
                }
                if (has_norm) {
                    const float* w = (h < nq ? qw : kw).data_ptr<float>();
                    float ss = 0.0f;
                    for (int64_t j = 0; j < half; ++j) ss += x1[j] * x1[j] + x2[j] * x2[j];
                    const float rstd = 1.0f / std::sqrt(ss / static_cast<float>(d) + eps);
                    for (int64_t j = 0; j < half; ++j) {
                        x1[j] = rnd<T>(rnd<T>(x1[j] * rstd) * rnd<T>(w[j]));
                        x2[j] = rnd<T>(rnd<T>(x2[j] * rstd) * rnd<T>(w[half + j]));
                    }
                }
                const float* c = cp + pp[tok] * half;
                const float* s = sp + pp[tok] * half;
                for (int64_t j = 0; j < half; ++j) {
                    const float cj = rnd<T>(c[j]), sj = rnd<T>(s[j]);
                    const T o1 = static_cast<T>(rnd<T>(x1[j] * cj) - rnd<T>(x2[j] * sj));
                    const T o2 = static_cast<T>(rnd<T>(x2[j] * cj) + rnd<T>(x1[j] * sj));
                    row[j] = o1;
                    row[half + j] = o2;
                }
                if (h >= nq) {
                    float* dst = kc + (slot * nkv + (h - nq)) * d;
                    for (int64_t j = 0; j < d; ++j) dst[j] = static_cast<float>(row[j]);
                }
            }
        });
    });
}

// x [T, 2I] (gate | up) -> silu(gate) * up [T, I].
at::Tensor silu_mul(const at::Tensor& x) {
    TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0, "silu_mul: x must be contiguous [T, 2I]");
    const int64_t t = x.size(0), inter = x.size(1) / 2;
    at::Tensor out = at::empty({t, inter}, x.options());
    AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "silu_mul", [&] {
        using T = scalar_t;
        const T* xp = x.data_ptr<T>();
        T* op = out.data_ptr<T>();
        at::parallel_for(0, t * inter, 4096, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) {
                const int64_t r = i / inter, j = i % inter;
                const float g = static_cast<float>(xp[r * 2 * inter + j]);
                const float u = static_cast<float>(xp[r * 2 * inter + inter + j]);
                op[i] = static_cast<T>(rnd<T>(g / (1.0f + std::exp(-g))) * u);
            }
        });
    });
    return out;
}

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
        for (int64_t i = i0; i < i1; ++i) {
            const int64_t seq = i / hkv, h = i % hkv, len = lp[seq];
            const int32_t* table = tp + seq * width;
            scores.assign(group * len, 0.0f);
            for (int64_t pos = 0; pos < len; ++pos) {  // scores of the group's queries against each key
                const float* k = kc + ((static_cast<int64_t>(table[pos / bs]) * bs + pos % bs) * hkv + h) * d;
                for (int64_t g = 0; g < group; ++g) {
                    const float* qv = qp + (seq * hq + h * group + g) * d;
                    float acc = 0.0f;
                    for (int64_t j = 0; j < d; ++j) acc += qv[j] * k[j];
                    scores[g * len + pos] = acc * sc;
                }
            }
            for (int64_t g = 0; g < group; ++g) {
                float* s = scores.data() + g * len;
                const float mx = *std::max_element(s, s + len);
                float sum = 0.0f;
                for (int64_t pos = 0; pos < len; ++pos) sum += (s[pos] = std::exp(s[pos] - mx));
                const float inv = 1.0f / sum;
                for (int64_t pos = 0; pos < len; ++pos) s[pos] *= inv;
                float* o = op + (seq * hq + h * group + g) * d;
                std::fill(o, o + d, 0.0f);
            }
            for (int64_t pos = 0; pos < len; ++pos) {
                const float* v = vc + ((static_cast<int64_t>(table[pos / bs]) * bs + pos % bs) * hkv + h) * d;
                for (int64_t g = 0; g < group; ++g) {
                    const float p = scores[g * len + pos];
                    float* o = op + (seq * hq + h * group + g) * d;
                    for (int64_t j = 0; j < d; ++j) o[j] += p * v[j];
                }
            }
        }
    });
    return q.scalar_type() == at::kFloat ? out : out.to(q.scalar_type());
}
