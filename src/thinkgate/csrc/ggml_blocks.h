// llama.cpp's block formats (ggml-common.h), as a GGUF file stores them, and the 8-bit activation blocks
// its CPU matmuls quantize the input into. Layouts must match the file byte for byte: a weight row is read
// straight from the bytes the loader copied out of the GGUF.
#pragma once

#include <cstdint>

namespace ggml {

constexpr int QK = 32;    // weights per block of the "legacy" types (Q4_0 ... Q8_0)
constexpr int QKK = 256;  // weights per super-block of the K-quants

// ggml's type ids (GGMLQuantizationType in the gguf package).
enum Type : int { F32 = 0, F16 = 1, Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q8_1 = 9, Q4_K = 12,
                  Q5_K = 13, Q6_K = 14, Q8_K = 15,
                  // Ours: Q5_0 rows rearranged for AVX2 decode (same codes and scales; ggml_linear.cpp).
                  Q5_0_R4 = 106,
                  // Ours: the R4 layout with each group's 128 codes placed so that an int32 lane holds one block's
                  // products (ggml_linear.cpp, the 16-bit kernels): the same codes and scales.
                  Q5_0_R4L = 107,
                  // Ours: Q8_0 in groups of 4 blocks, codes in R4L's slots (the default's output head).
                  Q8_0_R4L = 108,
                  // Ours: 16-bit activation blocks (the default's one pass; ggml_linear.cpp).
                  Q16_0 = 116, Q16_K = 117 };

struct BlockQ4_0 { uint16_t d; uint8_t qs[QK / 2]; };
struct BlockQ4_1 { uint16_t d, m; uint8_t qs[QK / 2]; };
struct BlockQ5_0 { uint16_t d; uint8_t qh[4]; uint8_t qs[QK / 2]; };
struct BlockQ5_1 { uint16_t d, m; uint8_t qh[4]; uint8_t qs[QK / 2]; };
struct BlockQ8_0 { uint16_t d; int8_t qs[QK]; };
struct BlockQ8_1 { uint16_t d, s; int8_t qs[QK]; };  // s = d * sum(qs)
struct BlockQ4_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qs[QKK / 2]; };
struct BlockQ5_K { uint16_t d, dmin; uint8_t scales[12]; uint8_t qh[QKK / 8]; uint8_t qs[QKK / 2]; };
struct BlockQ6_K { uint8_t ql[QKK / 2]; uint8_t qh[QKK / 4]; int8_t scales[QKK / 16]; uint16_t d; };
struct BlockQ8_K { float d; int8_t qs[QKK]; int16_t bsums[QKK / 16]; };

// Four Q5_0 blocks of a row, rearranged so AVX2 unpacks them with fewer operations: the scales as fp32 (the
// same values), the low nibbles of blocks 0/1 and 2/3 sharing bytes (byte j: weight j of the first block in
// the low nibble, of the second in the high), and the fifth bits as planes (byte j, bit k: weight j of block
// k; bit k + 4: weight j + 16 of block k).
struct BlockQ5_0R4 { float d[4]; uint8_t nib01[32]; uint8_t nib23[32]; uint8_t hb[16]; };
// An activation block for it: the scale as fp32 and, per 4 codes (an int32 lane), 16 x their sum, which the
// kernel subtracts to turn its unsigned codes (0..31) back into Q5_0's signed ones (-16..15).
struct BlockQ8_0L { int32_t corr[8]; float d; int8_t qs[QK]; };

// R4L: every int32 lane of a group's vpmaddwd products belongs to one block (lanes 0-3: blocks 0-3, codes 0-15;
// lanes 4-7: blocks 0-3, codes 16-31), so a group's products need no reduction across lanes before the blocks'
// scales [d0 d1 d2 d3 d0 d1 d2 d3] multiply them. Q5_0 and Q8_0 reach that with different slots, as their codes are
// widened to int16 differently:
// - Q5_0 (R4's fields with fp16 scales: as many bytes as the file's 4 blocks, a decode step of one row streams its
//   weights from DRAM): slot (v, j) (code vector v = the nibbles and bit planes R4 gives block v, byte j) holds code
//   n of block b where, with lane l = j / 4: b = l % 4, n = 16 * (l / 4) + 4v + j % 4 (q5l_slot). Its signed
//   bytes are widened as code x 256 (even bytes by a 16-bit shift, odd ones by a mask: two cheap operations where
//   sign extension costs two slow cross-lane ones), so bytes 4l .. 4l + 3 meet int32 lane l; the rows' scales
//   carry the 1 / 256. A lane sums 16 products of at most 4096 x 32767 < 2^31.
// - Q8_0 (the codes from memory, sign-extended in 16-byte chunks: 128 x 256 would pass int16's products): with
//   i = j % 16 and c = 2v + j / 16 (the slot's chunk), b = (i / 2) % 4, n = 16 * (i / 8) + 2c + i % 2 (r4l_slot).
// The input rows for each: per group the 4 blocks' scales and their 128 codes in the order the widened vectors
// meet them (the kernel's c-th int16 vector at qs + 16c).
struct BlockQ5_0R4L { uint16_t d[4]; uint8_t nib01[32]; uint8_t nib23[32]; uint8_t hb[16]; };
struct BlockQ16_0L { float d[4]; int16_t qs[4 * QK]; };
// Four Q8_0 blocks: their fp16 scales, then their codes in R4L's slots (qs[32v + j]); as many bytes as the four.
struct BlockQ8_0R4L { uint16_t d[4]; int8_t qs[4 * QK]; };

// 16-bit activation blocks: codes round(x / d) with d = amax / 32767, so one integer pass carries ~15 bits where
// ggml's 8-bit blocks carry 8. Q16_0 pairs with the 32-weight types (s = d * sum(qs), for Q4_1/Q5_1's min),
// Q16_K with the K-quants (sums per 32, for Q4_K/Q5_K's mins).
struct BlockQ16_0 { float d; float s; int16_t qs[QK]; };
struct BlockQ16_K { float d; int32_t bsums[QKK / 32]; int16_t qs[QKK]; };
// A Q16_K block's codes split into bytes, code = 256 * hi + lo (lo unsigned, hi signed): the form the AVX2
// Q4_K / Q5_K kernel multiplies with vpmaddubsw (unsigned x signed bytes, 32 products per instruction), where the
// int16 codes would need the weights widened to 16 bits first. The same integers, so the same products.
struct BlockQ16_KS { float d; int32_t bsums[QKK / 32]; uint8_t lo[QKK]; int8_t hi[QKK]; };

static_assert(sizeof(BlockQ5_0R4) == 96 && sizeof(BlockQ5_0R4L) == 88 && sizeof(BlockQ8_0L) == 68 && sizeof(BlockQ16_0L) == 272 && sizeof(BlockQ8_0R4L) == 136 && sizeof(BlockQ16_KS) == 548,
              "a repacked layout has padding");
static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22 &&
              sizeof(BlockQ5_1) == 24 && sizeof(BlockQ8_0) == 34 && sizeof(BlockQ8_1) == 36 &&
              sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210 &&
              sizeof(BlockQ8_K) == 292, "a block layout differs from ggml's");

}  // namespace ggml
