// The whole layer stack of a dense Qwen2/Qwen3 model for decode steps, in one call from Python.
#pragma once

#include <ATen/ATen.h>

#include <vector>

struct Q4Weight {  // a linear layer in q4_linear's format
    at::Tensor packed, scales, mins;
    c10::optional<at::Tensor> bias;
};

struct DecoderLayer {
    at::Tensor input_norm, post_norm;
    c10::optional<at::Tensor> q_norm, k_norm;  // Qwen3
    Q4Weight qkv, o, gate_up, down;
    at::Tensor k_cache, v_cache;
};

class Q4Decoder {
public:
    Q4Decoder(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, double eps, double scale,
              at::Tensor cos, at::Tensor sin, at::Tensor final_norm);
    void add_layer(at::Tensor input_norm, at::Tensor post_norm, c10::optional<at::Tensor> q_norm,
                   c10::optional<at::Tensor> k_norm, std::vector<at::Tensor> qkv, c10::optional<at::Tensor> qkv_bias,
                   std::vector<at::Tensor> o, std::vector<at::Tensor> gate_up, std::vector<at::Tensor> down,
                   at::Tensor k_cache, at::Tensor v_cache);
    // x: embedded tokens [T, H], one per sequence; returns the final-normed hidden states [T, H].
    at::Tensor forward(const at::Tensor& x, const at::Tensor& positions, const at::Tensor& slot_mapping,
                       const at::Tensor& block_tables, const at::Tensor& context_lens) const;
    int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }

private:
    int64_t nq_, nkv_, d_;
    double eps_, scale_;
    at::Tensor cos_, sin_, final_norm_;
    std::vector<DecoderLayer> layers_;
};
