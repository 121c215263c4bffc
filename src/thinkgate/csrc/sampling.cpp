// The sampler's passes over the vocabulary, on the CPU: greedy decoding's argmax, and a draw from the softmax.
//
// Why the argmax: torch's argmax over a [B, 151936] fp32 view took 0.3 ms for one row and 1.0 ms for eight on the 2-core
// CPU server (~2 ns a value, one thread): 1.3 % of a decode step at either batch size. Two vector passes per
// row (the maximum, then its first position) read the row at memory speed, the rows shared among the threads.
//
// Same answer as torch.argmax: the first position of the largest value, or of the first NaN if there is one.
//
// Why the draw: sampling from the whole vocabulary (a temperature and no top_k / top_p / min_p / top_a: the OpenAI
// SDK's default) took torch a softmax, a float64 copy and a cumulative sum over [B, 151,936], ~2.3 ms a row on this
// CPU; here three vector passes over the row (maximum, sum of exponentials, the scan) take a fraction of that.

#include <torch/extension.h>

#include <ATen/Parallel.h>

#if defined(__AVX2__)
#include <immintrin.h>
#endif

#include "vec_avx2.h"

#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

namespace {

int64_t argmax_row(const float* x, int64_t n) {
    int64_t i = 0;
    float best = -std::numeric_limits<float>::infinity();
#if defined(__AVX2__)
    __m256 mx = _mm256_set1_ps(best);
    __m256 nan = _mm256_setzero_ps();  // lanes that met a NaN
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        nan = _mm256_or_ps(nan, _mm256_cmp_ps(v, v, _CMP_UNORD_Q));
        mx = _mm256_max_ps(mx, v);
    }
    if (_mm256_movemask_ps(nan)) i = 0;  // the scalar loop below finds the first NaN
    else {
        alignas(32) float m[8];
        _mm256_store_ps(m, mx);
        for (float v : m) best = v > best ? v : best;
    }
#endif
    for (int64_t j = i; j < n; ++j) {
        if (std::isnan(x[j])) return j;
        best = x[j] > best ? x[j] : best;
    }
    // The first position holding `best` (every value was compared, so one exists; -inf rows give position 0).
    int64_t j = 0;
#if defined(__AVX2__)
    const __m256 b = _mm256_set1_ps(best);
    for (; j + 8 <= n; j += 8) {
        const int hits = _mm256_movemask_ps(_mm256_cmp_ps(_mm256_loadu_ps(x + j), b, _CMP_EQ_OQ));
        if (hits) return j + __builtin_ctz(static_cast<unsigned>(hits));
    }
#endif
    for (; j < n; ++j)
        if (x[j] == best) return j;
    return 0;
}

// A draw from softmax(x[0 .. n)) by inverse CDF: the first position whose cumulative exp(x - max) reaches u times
// their sum (u in (0, 1]; sums in float64). -inf (a banned token) has mass 0 and is never drawn. A row holding a
// NaN, or nothing but -inf, gives argmax_row's answer.
int64_t sample_row(const float* x, int64_t n, double u, std::vector<float>& e) {
    const int64_t top = argmax_row(x, n);
    const float mx = x[top];
    if (std::isnan(mx) || mx == -std::numeric_limits<float>::infinity()) return top;
    e.resize(static_cast<size_t>(n));
    double sum = 0.0;
    int64_t i = 0;
#if defined(__AVX2__) && defined(__F16C__)
    const __m256 m = _mm256_set1_ps(mx), ninf = _mm256_set1_ps(-std::numeric_limits<float>::infinity());
    __m256d s0 = _mm256_setzero_pd(), s1 = _mm256_setzero_pd();
    for (; i + 8 <= n; i += 8) {
        const __m256 v = _mm256_loadu_ps(x + i);
        // exp256 clamps its argument at -87.3 (~1e-38); a banned token must weigh exactly 0
        const __m256 ex = _mm256_andnot_ps(_mm256_cmp_ps(v, ninf, _CMP_EQ_OQ), tg2::exp256(_mm256_sub_ps(v, m)));
        _mm256_storeu_ps(e.data() + i, ex);
        s0 = _mm256_add_pd(s0, _mm256_cvtps_pd(_mm256_castps256_ps128(ex)));
        s1 = _mm256_add_pd(s1, _mm256_cvtps_pd(_mm256_extractf128_ps(ex, 1)));
    }
    alignas(32) double part[4];
    _mm256_store_pd(part, _mm256_add_pd(s0, s1));
    sum = (part[0] + part[1]) + (part[2] + part[3]);
#endif
    for (; i < n; ++i) {
        e[i] = x[i] == -std::numeric_limits<float>::infinity() ? 0.0f : std::exp(x[i] - mx);
        sum += e[i];
    }
    const double target = u * sum;
    double run = 0.0;
    int64_t last = top;  // the last position with mass, should rounding leave the scan short of the target
    for (int64_t j = 0; j < n; ++j) {
        if (e[j] <= 0.0f) continue;
        run += e[j];
        last = j;
        if (run >= target) return j;
    }
    return last;
}

}  // namespace

// logits [B, V] fp32 (rows contiguous), u [B] float64 in (0, 1] -> int64 [B]: a draw from softmax over each row's
// first n_valid logits (a temperature already applied), one uniform per row.
at::Tensor sample_softmax(const at::Tensor& logits, int64_t n_valid, const at::Tensor& u) {
    TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
                "sample_softmax: logits must be an fp32 [B, V] tensor with contiguous rows");
    TORCH_CHECK(n_valid > 0 && n_valid <= logits.size(1), "sample_softmax: n_valid must be in [1, V]");
    TORCH_CHECK(u.dim() == 1 && u.size(0) == logits.size(0) && u.scalar_type() == at::kDouble,
                "sample_softmax: u must be float64 [B]");
    const at::Tensor uc = u.contiguous();
    const int64_t b = logits.size(0), ld = logits.stride(0);
    at::Tensor out = at::empty({b}, logits.options().dtype(at::kLong));
    const float* px = logits.data_ptr<float>();
    const double* pu = uc.data_ptr<double>();
    int64_t* po = out.data_ptr<int64_t>();
    for (int64_t r = 0; r < b; ++r)
        TORCH_CHECK(pu[r] > 0.0 && pu[r] <= 1.0, "sample_softmax: each u must be in (0, 1]");
    at::parallel_for(0, b, 1, [&](int64_t r0, int64_t r1) {
        std::vector<float> e;
        for (int64_t r = r0; r < r1; ++r) po[r] = sample_row(px + r * ld, n_valid, pu[r], e);
    });
    return out;
}

// logits [B, V] fp32 (rows contiguous) -> int64 [B]: argmax over each row's first n_valid values.
at::Tensor greedy_argmax(const at::Tensor& logits, int64_t n_valid) {
    TORCH_CHECK(logits.dim() == 2 && logits.scalar_type() == at::kFloat && logits.stride(1) == 1,
                "greedy_argmax: logits must be an fp32 [B, V] tensor with contiguous rows");
    TORCH_CHECK(n_valid > 0 && n_valid <= logits.size(1), "greedy_argmax: n_valid must be in [1, V]");
    const int64_t b = logits.size(0), ld = logits.stride(0);
    at::Tensor out = at::empty({b}, logits.options().dtype(at::kLong));
    const float* px = logits.data_ptr<float>();
    int64_t* po = out.data_ptr<int64_t>();
    at::parallel_for(0, b, 1, [&](int64_t r0, int64_t r1) {
        for (int64_t r = r0; r < r1; ++r) po[r] = argmax_row(px + r * ld, n_valid);
    });
    return out;
}
