// How many of the block kernels' vector instructions one core retires per cycle (issue 19: the ceiling of the
// batched decode step's arithmetic). Each figure is 12 independent chains of one instruction; the clock is
// calibrated by a dependent chain of vpaddd (one per cycle).
//
//     g++ -O2 -o /tmp/simd_throughput benchmarks/simd_throughput.cpp && /tmp/simd_throughput
//
// On this project's AMD EPYC (Zen 3): vpmaddwd, vpmaddubsw, vfmadd231ps and vcvtdq2ps 2 per cycle each, and a mix
// of vpmaddwd and vfmadd231ps 2 per cycle together: they share two pipes (BENCHMARKS.md, "CPU, tenth round");
// vpmaddwd and vpaddd 1:1 ~3 per cycle together, vphaddd 0.5 ("CPU, eleventh round"); sign extension of a
// register's bytes to int16 (vpmovsxbw ymm, xmm) 0.8 and vextracti128 1, where a 16-bit shift, vpshufb or
// vpsllvd runs 2 and vpmovsxbw from memory ~1.9 ("CPU, twelfth round").
#include <chrono>
#include <cstdio>
static double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }
#define R8(x) x x x x x x x x
int main() {
    const long N = 50000000;
    double t = now();
    for (long n = 0; n < N; n++) asm volatile(R8("vpaddd %%ymm0, %%ymm1, %%ymm1\n") ::: "xmm0", "xmm1");
    double cyc = (now() - t) / (8.0 * N);
    printf("clock %.2f GHz (dependent vpaddd)\n", 1e-9 / cyc);
    auto rate = [&](const char* name, double secs, int per) { printf("%-28s %.2f per cycle\n", name, (double)N * per / (secs / cyc)); };
#define IND(op) op " %%ymm15, %%ymm0, %%ymm0\n" op " %%ymm15, %%ymm1, %%ymm1\n" op " %%ymm15, %%ymm2, %%ymm2\n" op " %%ymm15, %%ymm3, %%ymm3\n" \
                op " %%ymm15, %%ymm4, %%ymm4\n" op " %%ymm15, %%ymm5, %%ymm5\n" op " %%ymm15, %%ymm6, %%ymm6\n" op " %%ymm15, %%ymm7, %%ymm7\n" \
                op " %%ymm15, %%ymm8, %%ymm8\n" op " %%ymm15, %%ymm9, %%ymm9\n" op " %%ymm15, %%ymm10, %%ymm10\n" op " %%ymm15, %%ymm11, %%ymm11\n"
#define CLOB "xmm0","xmm1","xmm2","xmm3","xmm4","xmm5","xmm6","xmm7","xmm8","xmm9","xmm10","xmm11","xmm15"
    t = now(); for (long n = 0; n < N; n++) asm volatile(IND("vpmaddwd") ::: CLOB); rate("vpmaddwd", now() - t, 12);
    t = now(); for (long n = 0; n < N; n++) asm volatile(IND("vpmaddubsw") ::: CLOB); rate("vpmaddubsw", now() - t, 12);
    t = now(); for (long n = 0; n < N; n++) asm volatile("vfmadd231ps %%ymm14, %%ymm15, %%ymm0\n vfmadd231ps %%ymm14, %%ymm15, %%ymm1\n vfmadd231ps %%ymm14, %%ymm15, %%ymm2\n vfmadd231ps %%ymm14, %%ymm15, %%ymm3\n vfmadd231ps %%ymm14, %%ymm15, %%ymm4\n vfmadd231ps %%ymm14, %%ymm15, %%ymm5\n vfmadd231ps %%ymm14, %%ymm15, %%ymm6\n vfmadd231ps %%ymm14, %%ymm15, %%ymm7\n vfmadd231ps %%ymm14, %%ymm15, %%ymm8\n vfmadd231ps %%ymm14, %%ymm15, %%ymm9\n vfmadd231ps %%ymm14, %%ymm15, %%ymm10\n vfmadd231ps %%ymm14, %%ymm15, %%ymm11\n" ::: CLOB, "xmm14"); rate("vfmadd231ps", now() - t, 12);
    t = now(); for (long n = 0; n < N; n++) asm volatile(IND("vpaddd") ::: CLOB); rate("vpaddd", now() - t, 12);
    t = now(); for (long n = 0; n < N; n++) asm volatile(
        "vpmaddwd %%ymm15, %%ymm0, %%ymm0\n vfmadd231ps %%ymm14, %%ymm15, %%ymm1\n vpmaddwd %%ymm15, %%ymm2, %%ymm2\n vfmadd231ps %%ymm14, %%ymm15, %%ymm3\n"
        "vpmaddwd %%ymm15, %%ymm4, %%ymm4\n vfmadd231ps %%ymm14, %%ymm15, %%ymm5\n vpmaddwd %%ymm15, %%ymm6, %%ymm6\n vfmadd231ps %%ymm14, %%ymm15, %%ymm7\n"
        "vpmaddwd %%ymm15, %%ymm8, %%ymm8\n vfmadd231ps %%ymm14, %%ymm15, %%ymm9\n vpmaddwd %%ymm15, %%ymm10, %%ymm10\n vfmadd231ps %%ymm14, %%ymm15, %%ymm11\n" ::: CLOB, "xmm14");
    rate("vpmaddwd+vfmadd (1:1)", now() - t, 12);
    // The R4L kernels' inner loop is vpmaddwd and vpaddd 1:1 (eleventh round); vphaddd is what a reduction across
    // lanes would cost instead.
    t = now(); for (long n = 0; n < N; n++) asm volatile(
        "vpmaddwd %%ymm15, %%ymm0, %%ymm0\n vpaddd %%ymm14, %%ymm6, %%ymm6\n vpmaddwd %%ymm15, %%ymm1, %%ymm1\n vpaddd %%ymm14, %%ymm7, %%ymm7\n"
        "vpmaddwd %%ymm15, %%ymm2, %%ymm2\n vpaddd %%ymm14, %%ymm8, %%ymm8\n vpmaddwd %%ymm15, %%ymm3, %%ymm3\n vpaddd %%ymm14, %%ymm9, %%ymm9\n"
        "vpmaddwd %%ymm15, %%ymm4, %%ymm4\n vpaddd %%ymm14, %%ymm10, %%ymm10\n vpmaddwd %%ymm15, %%ymm5, %%ymm5\n vpaddd %%ymm14, %%ymm11, %%ymm11\n" ::: CLOB, "xmm14");
    rate("vpmaddwd+vpaddd (1:1)", now() - t, 12);
    t = now(); for (long n = 0; n < N; n++) asm volatile(IND("vphaddd") ::: CLOB); rate("vphaddd", now() - t, 12);
    // Widening bytes to int16 (twelfth round): the cross-lane sign extensions against in-lane shifts.
#define ALL12(s) s(0) s(1) s(2) s(3) s(4) s(5) s(6) s(7) s(8) s(9) s(10) s(11)
#define MOVX(i) "vpmovsxbw %%xmm15, %%ymm" #i "\n"
#define MOVM(i) "vpmovsxbw " #i "*16(%0), %%ymm" #i "\n"
#define EXT(i) "vextracti128 $1, %%ymm15, %%xmm" #i "\n"
#define SLL(i) "vpsllw $8, %%ymm15, %%ymm" #i "\n"
    alignas(64) static char buf[256];
    t = now(); for (long n = 0; n < N; n++) asm volatile(ALL12(MOVX) :: "r"(buf) : CLOB, "memory"); rate("vpmovsxbw ymm, xmm", now() - t, 12);
    t = now(); for (long n = 0; n < N; n++) asm volatile(ALL12(MOVM) :: "r"(buf) : CLOB, "memory"); rate("vpmovsxbw ymm, m128", now() - t, 12);
    t = now(); for (long n = 0; n < N; n++) asm volatile(ALL12(EXT) :: "r"(buf) : CLOB, "memory"); rate("vextracti128", now() - t, 12);
    t = now(); for (long n = 0; n < N; n++) asm volatile(ALL12(SLL) :: "r"(buf) : CLOB, "memory"); rate("vpsllw (16-bit shift)", now() - t, 12);
    t = now(); for (long n = 0; n < N; n++) asm volatile("vcvtdq2ps %%ymm15, %%ymm0\n vcvtdq2ps %%ymm15, %%ymm1\n vcvtdq2ps %%ymm15, %%ymm2\n vcvtdq2ps %%ymm15, %%ymm3\n vcvtdq2ps %%ymm15, %%ymm4\n vcvtdq2ps %%ymm15, %%ymm5\n vcvtdq2ps %%ymm15, %%ymm6\n vcvtdq2ps %%ymm15, %%ymm7\n vcvtdq2ps %%ymm15, %%ymm8\n vcvtdq2ps %%ymm15, %%ymm9\n vcvtdq2ps %%ymm15, %%ymm10\n vcvtdq2ps %%ymm15, %%ymm11\n" ::: CLOB); rate("vcvtdq2ps (12 regs)", now() - t, 12);
    return 0;
}
