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

// Round to the nearest integer, ties to even.
DL_INLINE float round_half_even(float x) {
#if defined(__CUDA_ARCH__)
  return rintf(x);
#else
  return std::nearbyint(x);  // the default rounding mode: to nearest, ties to even
#endif
}

// 2^e as a float, for e in the normal range [-126, 127].
DL_INLINE float power_of_two(int e) { return bits_float(static_cast<uint32_t>(e + 127) << 23); }

// floor(log2 a) of a normal positive float.
DL_INLINE int exponent_of(float a) { return static_cast<int>((float_bits(a) >> 23) & 0xFF) - 127; }

// A small float format of kBits bits (sign first), kMantissa mantissa bits
// and exponent bias kBias, whose largest finite magnitude has code kMaxCode:
// v rounded to the nearest representable value, ties to an even mantissa,
// saturated to the largest (infinities too); NaN to kNanCode. Subnormals
// below 2^(1 - kBias).
template <int kBits, int kMantissa, int kBias, int kMaxCode, int kNanCode>
DL_INLINE uint8_t encode_small_float(float v) {
  const uint8_t sign = static_cast<uint8_t>((float_bits(v) >> 31) << (kBits - 1));
  const float a = std::fabs(v);
  if (!(a == a)) return static_cast<uint8_t>(kNanCode);
  constexpr int kTopExponent = (kMaxCode >> kMantissa) - kBias;
  constexpr float kLargest =
      (1.0f + static_cast<float>(kMaxCode & ((1 << kMantissa) - 1)) / (1 << kMantissa)) *
      static_cast<float>(int64_t{1} << kTopExponent);
  if (a >= kLargest) return static_cast<uint8_t>(sign | kMaxCode);
  constexpr int kMinExponent = 1 - kBias;
  int code;
  if (a < power_of_two(kMinExponent)) {
    // Subnormal: a multiple of 2^(kMinExponent - kMantissa); rounding up to
    // 2^kMantissa steps gives the smallest normal's code, as wanted.
    code = static_cast<int>(round_half_even(a * power_of_two(kMantissa - kMinExponent)));
  } else {
    const int e = exponent_of(a);  // in [kMinExponent, kTopExponent]
    const float steps = round_half_even((a * power_of_two(-e) - 1.0f) * (1 << kMantissa));
    code = ((e + kBias) << kMantissa) + static_cast<int>(steps);  // a carry moves e up
  }
  if (code > kMaxCode) code = kMaxCode;
  return static_cast<uint8_t>(sign | code);
}

template <int kMantissa, int kBias, int kBits>
DL_INLINE float decode_small_float(uint8_t code) {
  const int magnitude = code & ((1 << (kBits - 1)) - 1);
  const int exponent = magnitude >> kMantissa;
  const int mantissa = magnitude & ((1 << kMantissa) - 1);
  const float value = exponent == 0
                          ? static_cast<float>(mantissa) * power_of_two(1 - kBias - kMantissa)
                          : (1.0f + static_cast<float>(mantissa) / (1 << kMantissa)) *
                                power_of_two(exponent - kBias);
  return (code >> (kBits - 1)) & 1 ? -value : value;
}

// OCP OFP8 E4M3 (v1.0): bias 7, no infinities, S.1111.111 is NaN, the
// largest finite is S.1111.110 = 448.
DL_INLINE uint8_t encode_e4m3(float v) { return encode_small_float<8, 3, 7, 0x7E, 0x7F>(v); }
DL_INLINE float decode_e4m3(uint8_t code) {
  if ((code & 0x7F) == 0x7F) return NAN;
  return decode_small_float<3, 7, 8>(code);
}

// OCP MX FP4 E2M1 (v1.0, 5.3.3): bias 1, no infinity or NaN, largest 6;
// a 4-bit code (sign in bit 3). NaN has no code: it maps to 0 here (the
// non-finite flag travels beside the codes, losslessly).
DL_INLINE uint8_t encode_e2m1(float v) {
  if (!(v == v)) return 0;
  return encode_small_float<4, 1, 1, 0x7, 0x0>(v);
}
DL_INLINE float decode_e2m1(uint8_t code) { return decode_small_float<1, 1, 4>(code & 0xF); }

enum class LowBitFormat : int32_t { kInt8 = 0, kInt4 = 1, kFp8E4M3 = 2, kMxFp4 = 3 };

// One block of n values: a code per value (one byte each; 4-bit formats use
// the low nibble) and the block's scale, so that value ~ scale * decode(code):
//   int8, int4: scale = amax / 127 (7), code = round(v / scale), clamped;
//   fp8 e4m3:   scale = amax / 448, code = e4m3(v / scale);
//   mxfp4:      scale = 2^(floor(log2 amax) - 2) (OCP MX v1.0, 6.3: minus
//               E2M1's largest exponent), code = e2m1(v / scale), exact.
// A block of zeros gets scale 0 (mxfp4: 2^-127 is not a normal float: 0
// too) and zero codes.
DL_INLINE float quantize_block(LowBitFormat format, const float* values, int64_t n,
                               uint8_t* codes) {
  float amax = 0.0f;
  for (int64_t i = 0; i < n; ++i) amax = std::fmax(amax, std::fabs(values[i]));
  if (amax == 0.0f) {
    for (int64_t i = 0; i < n; ++i) codes[i] = 0;
    return 0.0f;
  }
  switch (format) {
    case LowBitFormat::kInt8:
    case LowBitFormat::kInt4: {
      const float top = format == LowBitFormat::kInt8 ? 127.0f : 7.0f;
      const float scale = amax / top;
      for (int64_t i = 0; i < n; ++i) {
        float q = round_half_even(values[i] / scale);
        q = q > top ? top : (q < -top ? -top : q);
        codes[i] = static_cast<uint8_t>(static_cast<int8_t>(q));
      }
      return scale;
    }
    case LowBitFormat::kFp8E4M3: {
      const float scale = amax / 448.0f;
      for (int64_t i = 0; i < n; ++i) codes[i] = encode_e4m3(values[i] / scale);
      return scale;
    }
    case LowBitFormat::kMxFp4: {
      int e = exponent_of(amax) - 2;
      e = e < -126 ? -126 : e;  // a subnormal amax: the smallest normal scale
      const float inverse = power_of_two(-e < 127 ? -e : 127);
      for (int64_t i = 0; i < n; ++i) codes[i] = encode_e2m1(values[i] * inverse);
      return power_of_two(e);
    }
  }
  return 0.0f;
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
