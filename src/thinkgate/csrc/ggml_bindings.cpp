// Python bindings of the GGUF block kernels (ggml_linear.cpp). A module of its own: it is built for AVX2
// (or plain C++ off x86), so it runs on CPUs that the AVX-512 module (bindings.cpp) cannot.

#include <torch/extension.h>

#include <vector>

at::Tensor ggml_linear(const at::Tensor& x, const std::vector<int64_t>& types, const std::vector<at::Tensor>& weights,
                       const c10::optional<at::Tensor>& bias, bool scalar, int64_t act_bits);
at::Tensor ggml_quantize_activations(const at::Tensor& x, int64_t vec_type);
at::Tensor ggml_dequantize_rows(const at::Tensor& weight, int64_t type, const at::Tensor& ids);
at::Tensor ggml_dequantize(const std::vector<int64_t>& types, const std::vector<at::Tensor>& weights, bool scalar,
                           const c10::optional<at::Tensor>& scratch);
std::tuple<int64_t, at::Tensor> ggml_repack(const at::Tensor& weight, int64_t type);
void bind_ggml_decoder(py::module& m);  // ggml_decoder.cpp

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    m.def("ggml_linear", &ggml_linear, "x @ W^T with W in a GGUF's quantized blocks (llama.cpp's arithmetic)",
          py::arg("x"), py::arg("types"), py::arg("weights"), py::arg("bias") = py::none(), py::arg("scalar") = false,
          py::arg("act_bits") = 8);
    m.def("ggml_quantize_activations", &ggml_quantize_activations, "rows -> Q8_0 / Q8_1 / Q8_K blocks (bytes)");
    m.def("ggml_dequantize_rows", &ggml_dequantize_rows, "rows of a block matrix, dequantized to fp32");
    m.def("ggml_dequantize", &ggml_dequantize, "the stacked weight parts, dequantized to fp32 [rows, k]",
          py::arg("types"), py::arg("weights"), py::arg("scalar") = false, py::arg("scratch") = py::none());
    m.def("ggml_repack", &ggml_repack, "(type, blocks) in the layout the AVX2 kernel reads fastest, same codes");
    bind_ggml_decoder(m);
}
