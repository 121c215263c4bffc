// The small per-layer operations of a CPU decode step, each one pass in C++.
//
// Why: in plain PyTorch a layer of a 0.5B model is ~55 small ops (an RMSNorm alone is a cast, the norm's
// pow/mean/rsqrt/mul, a cast back and a weight multiply), 2-20 us each on this CPU, ~7 ms of a ~25 ms
// step. These fuse them the way the GPU path's Triton kernels do (layers/triton_fused.py), and round to
// the activation dtype wherever the PyTorch reference rounds, so both paths compute the same numbers up to
// the order of fp32 sums:
// - rms_norm: optional residual add, then Qwen's RMSNorm;
// - qk_norm_rope_store: per-head q/k RMSNorm (Qwen3), NeoX rotary in place, k/v written to cache slots;
// - silu_mul: SwiGLU's silu(gate) * up.
// Decode attention over the paged cache lives in paged_attention.cpp.

#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"
#include "vec.h"

namespace {

// Runs f with a value of the activation type (fp32 or bf16): the kernels are written once for both.
template <typename F>
void dispatch_act(at::ScalarType st, const char* name, F&& f) {
    if (st == at::kFloat) {
        f(float{});
    } else if (st == at::kBFloat16) {
        f(c10::BFloat16{});
    } else {
        TORCH_CHECK(false, name, ": activations must be fp32 or bf16");
    }
}

template <typename T>
void rms_norm_rows(const T* x, const T* res, const T* w, T* out, T* res_out, int64_t rows, int64_t h, float eps) {
    at::parallel_for(0, rows, 16, [&](int64_t r0, int64_t r1) {
        std::vector<float> buf(h);
        for (int64_t r = r0; r < r1; ++r) {
            __m512 ss = _mm512_setzero_ps();
            for (int64_t i = 0; i < h; i += 16) {
                const __mmask16 m = tg::tail_mask(h - i);
                __m512 v = tg::load16(x + r * h + i, m);
                if (res != nullptr) {
                    v = tg::round_as(_mm512_add_ps(v, tg::load16(res + r * h + i, m)), x);
                    tg::store16(res_out + r * h + i, v, m);
                }
                tg::store16(buf.data() + i, v, m);
                ss = _mm512_fmadd_ps(v, v, ss);
            }
            const __m512 rstd = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(h) + eps));
            for (int64_t i = 0; i < h; i += 16) {
                const __mmask16 m = tg::tail_mask(h - i);
                const __m512 normed = tg::round_as(_mm512_mul_ps(tg::load16(buf.data() + i, m), rstd), x);
                tg::store16(out + r * h + i, _mm512_mul_ps(normed, tg::load16(w + i, m)), m);
            }
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
    dispatch_act(x.scalar_type(), "rms_norm", [&](auto tag) {
        using scalar_t = decltype(tag);
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
    // In the activation dtype, as the reference multiplies them (no copy when they already are: every step).
    at::Tensor qw = has_norm ? q_weight->to(qkv.scalar_type()).contiguous() : at::Tensor();
    at::Tensor kw = has_norm ? k_weight->to(qkv.scalar_type()).contiguous() : at::Tensor();
    const float* cp = cos.data_ptr<float>();
    const float* sp = sin.data_ptr<float>();
    const int64_t* pp = pos.data_ptr<int64_t>();
    const int64_t* slp = slots.data_ptr<int64_t>();
    float* kc = k_cache.data_ptr<float>();
    float* vc = v_cache.data_ptr<float>();
    dispatch_act(qkv.scalar_type(), "qk_norm_rope_store", [&](auto tag) {
        using scalar_t = decltype(tag);
        using T = scalar_t;
        T* base = qkv.data_ptr<T>();
        const int64_t stride_t = qkv.stride(0);
        at::parallel_for(0, t * heads, 64, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) {
                const int64_t tok = i / heads, h = i % heads;
                T* row = base + tok * stride_t + h * d;
                const int64_t slot = slp[tok];
                if (h >= nq + nkv) {  // a value head: stored as it is
                    float* dst = vc + (slot * nkv + (h - nq - nkv)) * d;
                    for (int64_t j = 0; j < d; j += 16) {
                        const __mmask16 m = tg::tail_mask(d - j);
                        tg::store16(dst + j, tg::load16(row + j, m), m);
                    }
                    continue;
                }
                __m512 rstd = _mm512_set1_ps(1.0f);
                const T* w = nullptr;
                if (has_norm) {
                    w = (h < nq ? qw : kw).data_ptr<T>();
                    __m512 ss = _mm512_setzero_ps();
                    for (int64_t j = 0; j < d; j += 16) {
                        const __m512 v = tg::load16(row + j, tg::tail_mask(d - j));
                        ss = _mm512_fmadd_ps(v, v, ss);
                    }
                    rstd = _mm512_set1_ps(1.0f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(d) + eps));
                }
                const float* c = cp + pp[tok] * half;
                const float* s = sp + pp[tok] * half;
                float* kdst = h >= nq ? kc + (slot * nkv + (h - nq)) * d : nullptr;
                for (int64_t j = 0; j < half; j += 16) {
                    const __mmask16 m = tg::tail_mask(half - j);
                    __m512 x1 = tg::load16(row + j, m), x2 = tg::load16(row + half + j, m);
                    if (w != nullptr) {
                        x1 = tg::round_as(_mm512_mul_ps(tg::round_as(_mm512_mul_ps(x1, rstd), row),
                                                        tg::round_as(tg::load16(w + j, m), row)), row);
                        x2 = tg::round_as(_mm512_mul_ps(tg::round_as(_mm512_mul_ps(x2, rstd), row),
                                                        tg::round_as(tg::load16(w + half + j, m), row)), row);
                    }
                    const __m512 cj = tg::round_as(tg::load16(c + j, m), row);
                    const __m512 sj = tg::round_as(tg::load16(s + j, m), row);
                    const __m512 o1 = tg::round_as(_mm512_sub_ps(tg::round_as(_mm512_mul_ps(x1, cj), row),
                                                                 tg::round_as(_mm512_mul_ps(x2, sj), row)), row);
                    const __m512 o2 = tg::round_as(_mm512_add_ps(tg::round_as(_mm512_mul_ps(x2, cj), row),
                                                                 tg::round_as(_mm512_mul_ps(x1, sj), row)), row);
                    tg::store16(row + j, o1, m);
                    tg::store16(row + half + j, o2, m);
                    if (kdst != nullptr) {
                        tg::store16(kdst + j, o1, m);
                        tg::store16(kdst + half + j, o2, m);
                    }
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
    dispatch_act(x.scalar_type(), "silu_mul", [&](auto tag) {
        using scalar_t = decltype(tag);
        using T = scalar_t;
        const T* xp = x.data_ptr<T>();
        T* op = out.data_ptr<T>();
        const int64_t chunks = (inter + 15) / 16;
        at::parallel_for(0, t * chunks, 64, [&](int64_t i0, int64_t i1) {
            for (int64_t i = i0; i < i1; ++i) {
                const int64_t r = i / chunks, j = (i % chunks) * 16;
                const __mmask16 m = tg::tail_mask(inter - j);
                const __m512 g = tg::load16(xp + r * 2 * inter + j, m);
                const __m512 u = tg::load16(xp + r * 2 * inter + inter + j, m);
                const __m512 sig = _mm512_add_ps(_mm512_set1_ps(1.0f), tg::exp16(_mm512_sub_ps(_mm512_setzero_ps(), g)));
                const __m512 act = tg::round_as(_mm512_div_ps(g, sig), xp);
                tg::store16(op + r * inter + j, _mm512_mul_ps(act, u), m);
            }
        });
    });
    return out;
}
