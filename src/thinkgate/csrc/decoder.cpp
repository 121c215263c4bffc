// Why a C++ layer loop: with the matmuls and the small ops already in C++, what was left of a
// single-sequence decode step on this CPU was Python: ~20 calls per layer (module calls, wrappers, views),
// ~3 ms of a ~16 ms step for a 24-layer model. Here the same kernels run in the same order from C++.

#include "decoder.h"

#include "ops.h"

namespace {

Q4Weight q4_weight(const std::vector<at::Tensor>& parts, c10::optional<at::Tensor> bias) {
    TORCH_CHECK(parts.size() == 3, "Q4Decoder: a linear layer is (packed, scales, mins)");
    return Q4Weight{parts[0], parts[1], parts[2], std::move(bias)};
}

at::Tensor linear(const at::Tensor& x, const Q4Weight& w) { return q4_linear(x, w.packed, w.scales, w.mins, w.bias); }

}  // namespace

Q4Decoder::Q4Decoder(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale,
                     at::Tensor cos, at::Tensor sin, at::Tensor final_norm)
    : nq_(num_heads), nkv_(num_kv_heads), d_(head_dim), eps_(eps), scale_(scale), cos_(std::move(cos)),
      sin_(std::move(sin)), final_norm_(std::move(final_norm)) {}

void Q4Decoder::add_layer(at::Tensor input_norm, at::Tensor post_norm, c10::optional<at::Tensor> q_norm,
                          c10::optional<at::Tensor> k_norm, std::vector<at::Tensor> qkv,
                          c10::optional<at::Tensor> qkv_bias, std::vector<at::Tensor> o, std::vector<at::Tensor> gate_up,
                          std::vector<at::Tensor> down, at::Tensor k_cache, at::Tensor v_cache) {
    layers_.push_back(DecoderLayer{std::move(input_norm), std::move(post_norm), std::move(q_norm), std::move(k_norm),
                                   q4_weight(qkv, std::move(qkv_bias)), q4_weight(o, c10::nullopt),
                                   q4_weight(gate_up, c10::nullopt), q4_weight(down, c10::nullopt),
                                   std::move(k_cache), std::move(v_cache)});
}

at::Tensor Q4Decoder::forward(const at::Tensor& x_in, const at::Tensor& positions, const at::Tensor& slot_mapping,
                              const at::Tensor& block_tables, const at::Tensor& context_lens) const {
    const int64_t t = x_in.size(0);
    at::Tensor x = x_in.contiguous();
    c10::optional<at::Tensor> residual;
    for (const DecoderLayer& layer : layers_) {
        std::vector<at::Tensor> nr = rms_norm(x, layer.input_norm, eps_, residual);
        residual = nr[1];
        at::Tensor qkv = linear(nr[0], layer.qkv).view({t, nq_ + 2 * nkv_, d_});
        qk_norm_rope_store(qkv, nq_, nkv_, layer.q_norm, layer.k_norm, eps_, cos_, sin_, positions, slot_mapping,
                           layer.k_cache, layer.v_cache);
        at::Tensor attn = paged_decode_attention(qkv.narrow(1, 0, nq_), layer.k_cache, layer.v_cache, block_tables,
                                                 context_lens, scale_);
        x = linear(attn.view({t, nq_ * d_}), layer.o);
        nr = rms_norm(x, layer.post_norm, eps_, residual);
        residual = nr[1];
        x = linear(silu_mul(linear(nr[0], layer.gate_up)), layer.down);
    }
    return rms_norm(x, final_norm_, eps_, residual)[0];
}
