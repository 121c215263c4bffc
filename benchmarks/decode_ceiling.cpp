// The fastest any 8-row decode kernel of the default's arithmetic can run on this core (issue 19, the 8-stream
// target): the block kernels' inner loop with nothing else in it. Per group of 4 blocks (128 weights) and input
// row, the R4L kernels (csrc/ggml_linear.cpp, TG_ROWS8) spend 8 vpmaddwd against the row's 16-bit codes, 7 vpaddd
// for the exact int32 sum, a conversion, the scale product and one FMA. Here the 8 code vectors stay in registers
// (no weight is unpacked or read), the 8 rows' activations sit in L1, and the accumulators stay in registers (rows
// 4-7 add into rows 0-3's four, a chain each loop has time for): an upper bound on speed, as no real kernel does less. Also: the same without the float tail (the integer products alone),
// and the 8-bit form llama.cpp's arithmetic allows (4 vpmaddubsw of unsigned codes against the row's signed bytes,
// their int16 pair sums added in int16, one vpmaddwd to widen, the codes' offset subtracted, then the same tail).
//
//     g++ -O2 -o /tmp/decode_ceiling benchmarks/decode_ceiling.cpp && /tmp/decode_ceiling
//
// Prints cycles per 32 weights and input row (32 multiply-adds), the unit benchmarks/batched_ceiling.py uses.
#include <chrono>
#include <cstdio>

static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

#define R8(x) x x x x x x x x
// One row's 16-bit group at byte offset O of %0: ymm13 = float(sum of ymm0..7 x the row's 8 chunks).
#define SUM16(O)                                                                                                   \
    "vpmaddwd " #O "+0(%0), %%ymm0, %%ymm13\n vpmaddwd " #O "+32(%0), %%ymm1, %%ymm14\n vpaddd %%ymm14, %%ymm13, %%ymm13\n" \
    "vpmaddwd " #O "+64(%0), %%ymm2, %%ymm14\n vpmaddwd " #O "+96(%0), %%ymm3, %%ymm15\n"                              \
    "vpaddd %%ymm15, %%ymm14, %%ymm14\n vpaddd %%ymm14, %%ymm13, %%ymm13\n"                                             \
    "vpmaddwd " #O "+128(%0), %%ymm4, %%ymm14\n vpmaddwd " #O "+160(%0), %%ymm5, %%ymm15\n"                            \
    "vpaddd %%ymm15, %%ymm14, %%ymm14\n vpaddd %%ymm14, %%ymm13, %%ymm13\n"                                             \
    "vpmaddwd " #O "+192(%0), %%ymm6, %%ymm14\n vpmaddwd " #O "+224(%0), %%ymm7, %%ymm15\n"                            \
    "vpaddd %%ymm15, %%ymm14, %%ymm14\n vpaddd %%ymm14, %%ymm13, %%ymm13\n"
// The float tail: conversion, the row's scale (a broadcast from memory) times the weights' (ymm8), one FMA into A.
#define TAIL16(O, A) "vcvtdq2ps %%ymm13, %%ymm13\n vbroadcastss " #O "+256(%0), %%ymm14\n vmulps %%ymm8, %%ymm14, %%ymm14\n" \
                     "vfmadd231ps %%ymm13, %%ymm14, %%ymm" #A "\n"
#define ROW16(O, A) SUM16(O) TAIL16(O, A)
// The integer part only, kept live by adding it into A's register as an integer.
#define ROW16I(O, A) SUM16(O) "vpaddd %%ymm13, %%ymm" #A ", %%ymm" #A "\n"
// 8-bit: the row's 128 signed bytes at O, the codes' offset correction at O + 128, its scale at O + 160.
#define ROW8(O, A)                                                                                                 \
    "vpmaddubsw " #O "+0(%0), %%ymm0, %%ymm13\n vpmaddubsw " #O "+32(%0), %%ymm1, %%ymm14\n vpaddw %%ymm14, %%ymm13, %%ymm13\n" \
    "vpmaddubsw " #O "+64(%0), %%ymm2, %%ymm14\n vpmaddubsw " #O "+96(%0), %%ymm3, %%ymm15\n"                          \
    "vpaddw %%ymm15, %%ymm14, %%ymm14\n vpaddw %%ymm14, %%ymm13, %%ymm13\n vpmaddwd %%ymm13, %%ymm4, %%ymm13\n"         \
    "vpsubd " #O "+128(%0), %%ymm13, %%ymm13\n vcvtdq2ps %%ymm13, %%ymm13\n vbroadcastss " #O "+160(%0), %%ymm14\n"       \
    "vmulps %%ymm8, %%ymm14, %%ymm14\n vfmadd231ps %%ymm13, %%ymm14, %%ymm" #A "\n"
#define CLOB "xmm8", "xmm9", "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15", "memory"

int main() {
    const long N = 20000000;
    alignas(64) static char act[8 * 320] = {};
    double t = now();
    for (long n = 0; n < 5 * N; n++) asm volatile(R8("vpaddd %%ymm0, %%ymm1, %%ymm1\n") ::: "xmm0", "xmm1");
    const double cyc = (now() - t) / (8.0 * 5 * N);
    printf("clock %.2f GHz (dependent vpaddd)\n", 1e-9 / cyc);
    // per iteration: 8 rows x 128 weights = 32 units of 32 weights x row
    auto report = [&](const char* name, double secs) { printf("%-44s %.2f cycles per 32 weights and row\n", name, secs / cyc / (32.0 * N)); };
    asm volatile("vpxor %%ymm8, %%ymm8, %%ymm8\n vpxor %%ymm9, %%ymm9, %%ymm9\n vpxor %%ymm10, %%ymm10, %%ymm10\n"
                 "vpxor %%ymm11, %%ymm11, %%ymm11\n vpxor %%ymm12, %%ymm12, %%ymm12\n" ::: "xmm8", "xmm9", "xmm10", "xmm11", "xmm12");
    t = now();
    for (long n = 0; n < N; n++)
        asm volatile(ROW16I(0, 9) ROW16I(320, 10) ROW16I(640, 11) ROW16I(960, 12) ROW16I(1280, 9) ROW16I(1600, 10)
                     ROW16I(1920, 11) ROW16I(2240, 12) :: "r"(act) : CLOB);
    report("16-bit: vpmaddwd + vpaddd only", now() - t);
    t = now();
    for (long n = 0; n < N; n++)
        asm volatile(ROW16(0, 9) ROW16(320, 10) ROW16(640, 11) ROW16(960, 12) ROW16(1280, 9) ROW16(1600, 10)
                     ROW16(1920, 11) ROW16(2240, 12) :: "r"(act) : CLOB);
    report("16-bit: the R4L row (products, sum, tail)", now() - t);
    t = now();
    for (long n = 0; n < N; n++)
        asm volatile(ROW8(0, 9) ROW8(320, 10) ROW8(640, 11) ROW8(960, 12) ROW8(1280, 9) ROW8(1600, 10)
                     ROW8(1920, 11) ROW8(2240, 12) :: "r"(act) : CLOB);
    report("8-bit: vpmaddubsw form (llama.cpp's bits)", now() - t);
    return 0;
}
