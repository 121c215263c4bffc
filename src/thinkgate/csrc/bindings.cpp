// Python bindings of thinkgate's CPU kernels (one module; each kernel lives in the file named after it).

#include <torch/extension.h>

#include <vector>

at::Tensor q4_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& scales,
                     const at::Tensor& mins, const c10::optional<at::Tensor>& bias);
std::vector<at::Tensor> rms_norm(const at::Tensor& x, const at::Tensor& weight, double eps,
                                 const c10::optional<at::Tensor>& residual);
void qk_norm_rope_store(const at::Tensor& qkv, int64_t nq, int64_t nkv, const c10::optional<at::Tensor>& q_weight,
                        const c10::optional<at::Tensor>& k_weight, double eps, const at::Tensor& cos,
                        const at::Tensor& sin, const at::Tensor& positions, const at::Tensor& slot_mapping,
                        const at::Tensor& k_cache, const at::Tensor& v_cache);
at::Tensor silu_mul(const at::Tensor& x);
at::Tensor paged_decode_attention(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                                  const at::Tensor& block_tables, const at::Tensor& context_lens, double scale);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("q4_linear", &q4_linear, "int4 weights x int8 activations (AVX-512 VNNI), for decode-sized batches");
    m.def("rms_norm", &rms_norm, "optional residual add, then RMSNorm");
    m.def("qk_norm_rope_store", &qk_norm_rope_store, "q/k norm, rotary and the K/V cache write, in place");
    m.def("silu_mul", &silu_mul, "silu(gate) * up");
    m.def("paged_decode_attention", &paged_decode_attention, "one query per sequence over its paged cache");
}
