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
                  Q5_K = 13, Q6_K = 14, Q8_K = 15 };

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

static_assert(sizeof(BlockQ4_0) == 18 && sizeof(BlockQ4_1) == 20 && sizeof(BlockQ5_0) == 22 &&
              sizeof(BlockQ5_1) == 24 && sizeof(BlockQ8_0) == 34 && sizeof(BlockQ8_1) == 36 &&
              sizeof(BlockQ4_K) == 144 && sizeof(BlockQ5_K) == 176 && sizeof(BlockQ6_K) == 210 &&
              sizeof(BlockQ8_K) == 292, "a block layout differs from ggml's");

}  // namespace ggml
