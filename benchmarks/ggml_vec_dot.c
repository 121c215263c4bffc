// llama.cpp's own CPU dot products (ggml_get_type_traits_cpu(type)->vec_dot, its 8-bit activation blocks) on the
// default model's decode shapes, one row at a time on one thread: ns per 32 weights, the figure
// benchmarks/decode_linears.py prints for thinkgate's kernels. Weights are random floats quantized by ggml.
//
//   G=<llama.cpp>/ggml (the unpacked llama-cpp-python sdist's vendor/llama.cpp/ggml, "Reproducing the llama.cpp
//   comparator" in BENCHMARKS.md; its libraries in /tmp/llamacpp/bin), then
//   gcc -O2 -I$G/include benchmarks/ggml_vec_dot.c -o /tmp/ggml_vec_dot -L/tmp/llamacpp/bin -lggml-cpu -lggml-base -lm
//   LD_LIBRARY_PATH=/tmp/llamacpp/bin /tmp/ggml_vec_dot
#include "ggml.h"
#include "ggml-cpu.h"

#include <stdio.h>
#include <stdlib.h>
#include <time.h>

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + 1e-9 * t.tv_nsec;
}

int main(void) {
    ggml_cpu_init();
    const struct { const char* name; enum ggml_type type; long rows, k; } shapes[] = {
        {"gate/up 9728 x 896, Q5_0", GGML_TYPE_Q5_0, 9728, 896},
        {"down 896 x 4864, Q4_K", GGML_TYPE_Q4_K, 896, 4864},
        {"down 896 x 4864, Q6_K", GGML_TYPE_Q6_K, 896, 4864},
        {"output head 151936 x 896, Q8_0", GGML_TYPE_Q8_0, 151936, 896},
    };
    for (size_t s = 0; s < sizeof(shapes) / sizeof(shapes[0]); ++s) {
        const enum ggml_type t = shapes[s].type;
        const long rows = shapes[s].rows, k = shapes[s].k;
        const size_t rb = ggml_row_size(t, k);
        float* f = malloc(sizeof(float) * k * 64);
        for (long i = 0; i < k * 64; ++i) f[i] = (rand() % 2001 - 1000) / 1000.0f;
        char* w = malloc(rb * rows);
        for (long r = 0; r < rows; r += 64) ggml_quantize_chunk(t, f, w + r * rb, 0, rows - r < 64 ? rows - r : 64, k, NULL);
        const struct ggml_type_traits_cpu* tr = ggml_get_type_traits_cpu(t);
        char* a = malloc(ggml_row_size(tr->vec_dot_type, k));
        ggml_get_type_traits_cpu(tr->vec_dot_type)->from_float(f, a, k);
        double times[40];
        float acc = 0.0f, out;
        for (int rep = 0; rep < 40; ++rep) {
            const double t0 = now();
            for (long r = 0; r < rows; ++r) {
                tr->vec_dot((int)k, &out, 0, w + r * rb, 0, a, 0, 1);
                acc += out;
            }
            times[rep] = now() - t0;
        }
        for (int i = 1; i < 40; ++i)  // insertion sort for the median
            for (int j = i; j > 0 && times[j] < times[j - 1]; --j) { double x = times[j]; times[j] = times[j - 1]; times[j - 1] = x; }
        printf("| %s | %.2f ns per 32 weights (%g) |\n", shapes[s].name, times[20] / (rows * (double)k / 32) * 1e9, (double)(acc != acc));
        free(f); free(w); free(a);
    }
    return 0;
}
