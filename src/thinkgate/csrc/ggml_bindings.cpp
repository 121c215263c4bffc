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
std::tuple<int64_t, at::Tensor> ggml_repack(const at::Tensor& weight, int64_t type, bool lanes);
std::tuple<at::Tensor, at::Tensor, at::Tensor> ggml_quantize16(const at::Tensor& x, bool scalar);  // ggml_gemm16.cpp
at::Tensor ggml_gemm16(const at::Tensor& codes, const at::Tensor& scales, const at::Tensor& sums,
                       const std::vector<int64_t>& types, const std::vector<at::Tensor>& weights,
                       const c10::optional<at::Tensor>& bias, bool scalar);
bool ggml_gemm16_fast();
void bind_ggml_decoder(py::module& m);  // ggml_decoder.cpp
at::Tensor greedy_argmax(const at::Tensor& logits, int64_t n_valid);  // sampling.cpp
at::Tensor sample_softmax(const at::Tensor& logits, int64_t n_valid, const at::Tensor& u);

// The compute calls run without the GIL (`nogil`): a decode step holds the engine thread in C++ for tens of
// milliseconds, and with the GIL held the server's event loop could not send the last token, read a request or
// answer a health check until the step ended. ggml_quantize_activations and ggml_gemm16_fast are quick.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    const auto nogil = py::call_guard<py::gil_scoped_release>();
    m.def("ggml_linear", &ggml_linear, "x @ W^T with W in a GGUF's quantized blocks (llama.cpp's arithmetic)", nogil,
          py::arg("x"), py::arg("types"), py::arg("weights"), py::arg("bias") = py::none(), py::arg("scalar") = false,
          py::arg("act_bits") = 8);
    m.def("ggml_quantize_activations", &ggml_quantize_activations, "rows -> Q8_0 / Q8_1 / Q8_K blocks (bytes)");
    m.def("ggml_dequantize_rows", &ggml_dequantize_rows, "rows of a block matrix, dequantized to fp32", nogil);
    m.def("ggml_dequantize", &ggml_dequantize, "the stacked weight parts, dequantized to fp32 [rows, k]", nogil,
          py::arg("types"), py::arg("weights"), py::arg("scalar") = false, py::arg("scratch") = py::none());
    m.def("ggml_repack", &ggml_repack, "(type, blocks) in the layout the AVX2 kernel reads fastest, same codes", nogil,
          py::arg("weight"), py::arg("type"), py::arg("lanes") = false);
    m.def("ggml_quantize16", &ggml_quantize16, "rows -> (int16 codes, scales, block sums) per 32 values", nogil,
          py::arg("x"), py::arg("scalar") = false);
    m.def("ggml_gemm16", &ggml_gemm16, "quantized rows @ W^T, W in a GGUF's blocks, in 16-bit integers (prefill)", nogil,
          py::arg("codes"), py::arg("scales"), py::arg("sums"), py::arg("types"), py::arg("weights"),
          py::arg("bias") = py::none(), py::arg("scalar") = false);
    m.def("ggml_gemm16_fast", &ggml_gemm16_fast, "whether ggml_gemm16 runs its AVX2 kernel");
    m.def("greedy_argmax", &greedy_argmax, "argmax over each row's first n_valid logits (torch.argmax's answer)", nogil,
          py::arg("logits"), py::arg("n_valid"));
    m.def("sample_softmax", &sample_softmax, "a draw from softmax over each row's first n_valid logits, by inverse CDF",
          nogil, py::arg("logits"), py::arg("n_valid"), py::arg("u"));
    bind_ggml_decoder(m);
}
