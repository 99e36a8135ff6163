// Low-bit formats of issue 24, one block at a time: the codecs the fused
// pack and unpack will call. __host__ __device__ and exact: every rounding
// is round-to-nearest-even on values that the scaling left exact (the MX
// scale is a power of two) or that float32 computed once. Tested against
// the float64 oracle written from the specifications (tests/quant_reference.py).
#pragma once

#include <cmath>
#include <cstdint>

#include "scalar_types.h"

namespace distlearn {

// x rounded to an integer, ties to even, for |x| < 2^22 (the codecs round
// only such values), without a branch: adding 1.5 * 2^23
// leaves a float in [2^23, 2^24), whose unit is 1, so the addition rounds
// x to an integer in the default mode and the subtraction is exact.
DL_INLINE float round_half_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  constexpr float kMagic = 12582912.0f;  // 1.5 * 2^23
  return (x + kMagic) - kMagic;
#endif
}

// 2^e as a float, for e in the normal range [-126, 127].
DL_INLINE float power_of_two(int e) { return bits_float(static_cast<uint32_t>(e + 127) << 23); }

// floor(log2 a) of a normal positive float; -127 for 0 and subnormals.
DL_INLINE int exponent_of(float a) { return static_cast<int>((float_bits(a) >> 23) & 0xFF) - 127; }

// A small float format of kBits bits (sign first), kMantissa mantissa bits
// and exponent bias kBias, whose largest finite magnitude has code kMaxCode:
// v rounded to the nearest representable value, ties to an even mantissa,
// saturated to the largest (infinities too); NaN to kNanCode. Subnormals
// below 2^(1 - kBias). Without branches on the value (random codes would
// mispredict every other one): the magnitude's steps of its binade's unit,
// 2^(e - kMantissa) with e clamped up to the smallest normal exponent,
// count from 2^kMantissa in a normal binade, from 0 in the subnormal one.
template <int kBits, int kMantissa, int kBias, int kMaxCode, int kNanCode>
DL_INLINE uint8_t encode_small_float(float v) {
  constexpr int kTopExponent = (kMaxCode >> kMantissa) - kBias;
  constexpr float kLargest =
      (1.0f + static_cast<float>(kMaxCode & ((1 << kMantissa) - 1)) / (1 << kMantissa)) *
      static_cast<float>(int64_t{1} << kTopExponent);
  constexpr int kMinExponent = 1 - kBias;
  const uint32_t sign = (float_bits(v) >> 31) << (kBits - 1);
  const float magnitude = std::fabs(v);
  const bool nan = !(magnitude == magnitude);
  const float a = magnitude < kLargest ? magnitude : kLargest;  // a NaN too: replaced below
  int e = exponent_of(a);
  e = e < kMinExponent ? kMinExponent : e;
  // Exact (a power-of-two scaling); a carry into the next binade moves e up.
  const int steps = static_cast<int>(round_half_even(a * power_of_two(kMantissa - e)));
  int code = ((e + kBias - 1) << kMantissa) + steps;
  code = code > kMaxCode ? kMaxCode : code;
  return static_cast<uint8_t>(nan ? static_cast<uint32_t>(kNanCode) : (sign | code));
}

// The value of a small float's code (see encode_small_float): the
// significand (with its implicit 1 in a normal binade) times the binade's
// unit, without branches.
template <int kMantissa, int kBias, int kBits>
DL_INLINE float decode_small_float(uint8_t code) {
  const int magnitude = code & ((1 << (kBits - 1)) - 1);
  const int exponent = magnitude >> kMantissa;
  const int significand =
      (exponent != 0 ? 1 << kMantissa : 0) | (magnitude & ((1 << kMantissa) - 1));
  const float value = static_cast<float>(significand) *
                      power_of_two((exponent > 1 ? exponent : 1) - kBias - kMantissa);
  const uint32_t sign = static_cast<uint32_t>((code >> (kBits - 1)) & 1) << 31;
  return bits_float(float_bits(value) | sign);
}

// OCP OFP8 E4M3 (v1.0): bias 7, no infinities, S.1111.111 is NaN, the
// largest finite is S.1111.110 = 448.
DL_INLINE uint8_t encode_e4m3(float v) { return encode_small_float<8, 3, 7, 0x7E, 0x7F>(v); }
DL_INLINE float decode_e4m3(uint8_t code) {
  if ((code & 0x7F) == 0x7F) return NAN;
  return decode_small_float<3, 7, 8>(code);
}

// OCP MX FP4 E2M1 (v1.0, 5.3.3): bias 1, no infinity or NaN, largest 6;
// a 4-bit code (sign in bit 3). NaN has no code: it maps to 0 here (its
// block's scale is NaN: NOTE [Non-finite blocks]).
DL_INLINE uint8_t encode_e2m1(float v) { return encode_small_float<4, 1, 1, 0x7, 0x0>(v); }
DL_INLINE float decode_e2m1(uint8_t code) { return decode_small_float<1, 1, 4>(code & 0xF); }

// max(amax, |v|), NaN when either is (a NaN sticks: every later
// comparison with it is false). A select, not a library call.
DL_INLINE float larger_magnitude(float amax, float v) {
  const float a = std::fabs(v);
  return (a > amax || a != a) ? a : amax;
}

// The largest |values[i]|, i < n; NaN when one is NaN, infinity when one
// is infinite. Eight partial maxima: the maximum is exact in any order, and
// independent chains vectorize.
DL_INLINE float block_amax(const float* values, int64_t n) {
  float partial[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    DL_PRAGMA_UNROLL
    for (int j = 0; j < 8; ++j) partial[j] = larger_magnitude(partial[j], values[i + j]);
  }
  float amax = 0.0f;
  for (; i < n; ++i) amax = larger_magnitude(amax, values[i]);
  for (int j = 0; j < 8; ++j) amax = larger_magnitude(amax, partial[j]);
  return amax;
}

enum class LowBitFormat : int32_t { kInt8 = 0, kInt4 = 1, kFp8E4M3 = 2, kMxFp4 = 3 };

// A block's scale, so that value ~ scale * decode(code):
//   int8, int4: scale = amax / 127 (7), code = round(v / scale), clamped;
//   fp8 e4m3:   scale = amax / 448, code = e4m3(v / scale);
//   mxfp4:      scale = 2^(floor(log2 amax) - 2) (OCP MX v1.0, 6.3: minus
//               E2M1's largest exponent), code = e2m1(v * 2^-that), exact.
// A block of zeros gets scale 0 (mxfp4: 2^-127 is not a normal float: 0
// too) and zero codes. `inverse` is MXFP4's exact 1 / scale.
//
// NOTE [Non-finite blocks]: a block holding a NaN or an infinity gets a
// NaN scale (MXFP4: E8M0's NaN byte), so that every value of it
// dequantizes to NaN, and a sum of blocks one of which is NaN is NaN. A
// non-finite value thus stays non-finite through the low-bit sum
// (nonfinite="propagate" then leaves what GradScaler and the user see
// non-finite, as an exact sum would), spread to its block; which ranks had
// one travels exactly in the non-finite flag beside the codes, and the
// error feedback drops a flagged sum's residual.
struct BlockScale {
  float scale;
  float inverse;
};

DL_INLINE BlockScale block_scale(LowBitFormat format, float amax) {
  if (amax == 0.0f) return {0.0f, 0.0f};
  if (!(amax < INFINITY)) return {NAN, NAN};  // NOTE [Non-finite blocks]
  switch (format) {
    case LowBitFormat::kInt8:
      return {amax / 127.0f, 0.0f};
    case LowBitFormat::kInt4:
      return {amax / 7.0f, 0.0f};
    case LowBitFormat::kFp8E4M3:
      return {amax / 448.0f, 0.0f};
    case LowBitFormat::kMxFp4: {
      int e = exponent_of(amax) - 2;
      e = e < -126 ? -126 : e;  // a subnormal amax: the smallest normal scale
      return {power_of_two(e), power_of_two(-e < 127 ? -e : 127)};
    }
  }
  return {0.0f, 0.0f};
}

// v's code in a block of that scale. In a block of NaN scale (NOTE
// [Non-finite blocks]) any code reads back as NaN.
DL_INLINE uint8_t encode_code(LowBitFormat format, float v, const BlockScale& s) {
  if (s.scale == 0.0f) return 0;
  switch (format) {
    case LowBitFormat::kInt8:
    case LowBitFormat::kInt4: {
      const float top = format == LowBitFormat::kInt8 ? 127.0f : 7.0f;
      // Clamped (a NaN to top), then rounded: top is an integer, so the
      // order does not matter. Selects, not branches.
      float q = v / s.scale;
      q = q < top ? q : top;
      q = q > -top ? q : -top;
      return static_cast<uint8_t>(static_cast<int8_t>(round_half_even(q)));
    }
    case LowBitFormat::kFp8E4M3:
      return encode_e4m3(v / s.scale);
    case LowBitFormat::kMxFp4:
      return encode_e2m1(v * s.inverse);
  }
  return 0;
}

// One block of n values: a code per value (one byte each; 4-bit formats use
// the low nibble); returns the block's scale.
DL_INLINE float quantize_block(LowBitFormat format, const float* values, int64_t n,
                               uint8_t* codes) {
  const BlockScale scale = block_scale(format, block_amax(values, n));
  for (int64_t i = 0; i < n; ++i) codes[i] = encode_code(format, values[i], scale);
  return scale.scale;
}

DL_INLINE float dequantize_code(LowBitFormat format, uint8_t code, float scale) {
  switch (format) {
    case LowBitFormat::kInt8:
    case LowBitFormat::kInt4:
      return scale * static_cast<float>(static_cast<int8_t>(code));
    case LowBitFormat::kFp8E4M3:
      return scale * decode_e4m3(code);
    case LowBitFormat::kMxFp4:
      return scale * decode_e2m1(code);
  }
  return 0.0f;
}

}  // namespace distlearn
