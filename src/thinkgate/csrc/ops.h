// The CPU kernels' entry points (each defined in the file named after it), shared by the Python bindings
// and the single-sequence decoder.
#pragma once

#include <ATen/ATen.h>

#include <vector>

// q4_linear.cpp
at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                     const at::Tensor& mins, const c10::optional<at::Tensor>& bias);

// decode_ops.cpp (paged_decode_attention: paged_attention.cpp)
std::vector<at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                 const c10::optional<at::Tensor>& residual);
void qk_norm_rope_store(const at::Tensor& qkv, int64_t nq, int64_t nkv, const c10::optional<at::Tensor>& q_weight,
                        const c10::optional<at::Tensor>& k_weight, double eps, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& positions, const at::Tensor& slot_mapping,
                        const at::Tensor& k_cache, const at::Tensor& v_cache);
at::Tensor silu_mul(const at::Tensor& x);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale);
