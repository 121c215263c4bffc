// Python bindings of thinkgate's CPU kernels (one module; each kernel lives in the file named after it).

#include <torch/extension.h>

#include "decoder.h"
#include "ops.h"

// The long calls (a linear, a whole decode step) run without the GIL, as in ggml_bindings.cpp: the server's
// event loop keeps running during a step.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
    const auto nogil = py::call_guard<py::gil_scoped_release>();
    m.def("q4_linear", &q4_linear, "int4 weights x int8 activations (AVX-512 VNNI), for decode-sized batches", nogil);
    m.def("rms_norm", &rms_norm, "optional residual add, then RMSNorm");
    m.def("qk_norm_rope_store", &qk_norm_rope_store, "q/k norm, rotary and the K/V cache write, in place");
    m.def("silu_mul", &silu_mul, "silu(gate) * up");
    m.def("paged_decode_attention", &paged_decode_attention, "one query per sequence over its paged cache");
    py::class_<Q4Decoder>(m, "Q4Decoder")
        .def(py::init<int64_t, int64_t, int64_t, double, double, at::Tensor, at::Tensor, at::Tensor>())
        .def("add_layer", &Q4Decoder::add_layer)
        .def("forward", &Q4Decoder::forward, nogil)
        .def("num_layers", &Q4Decoder::num_layers);
}
