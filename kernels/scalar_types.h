// Scalar types the kernels move, and their conversions to and from the
// accumulation type. Plain C++ with no torch dependency: the same header is
// compiled by the host compiler for the CPU flavor and by nvcc for the CUDA
// flavor, so every conversion is a __host__ __device__ function.
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define DL_HOST_DEVICE __host__ __device__
#else
#define DL_HOST_DEVICE
#endif

#define DL_INLINE DL_HOST_DEVICE inline

// Unrolls the next loop in device code; host compilers ignore it.
#if defined(__CUDA_ARCH__)
#define DL_PRAGMA_UNROLL _Pragma("unroll")
#else
#define DL_PRAGMA_UNROLL
#endif

namespace distlearn {

// Codes shared with Python (distlearn_cuda/_native.py keeps the same table).
enum class DType : int32_t { kFloat32 = 0, kFloat64 = 1, kFloat16 = 2, kBFloat16 = 3 };

inline bool is_valid_dtype(int32_t code) { return code >= 0 && code <= 3; }

inline int64_t dtype_size(DType dtype) {
  switch (dtype) {
    case DType::kFloat32:
      return 4;
    case DType::kFloat64:
      return 8;
    case DType::kFloat16:
    case DType::kBFloat16:
      return 2;
  }
  return 0;
}

// IEEE binary16 and bfloat16 as bare storage: arithmetic always happens in
// the accumulation type after a conversion below.
struct Half {
  uint16_t bits;
};
struct BFloat16 {
  uint16_t bits;
};

DL_INLINE uint32_t float_bits(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof(u));
  return u;
#endif
}

DL_INLINE float bits_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

// binary16 -> binary32 is exact: widen the exponent (bias 15 -> 127),
// shift the 10-bit mantissa into the 23-bit field.
DL_INLINE float half_to_float(Half h) {
  const uint32_t sign = static_cast<uint32_t>(h.bits & 0x8000u) << 16;
  const uint32_t exponent = (h.bits >> 10) & 0x1fu;
  const uint32_t mantissa = h.bits & 0x3ffu;
  if (exponent == 0) {
    // Zero or subnormal: the value is mantissa * 2^-24, exact in binary32.
    const float magnitude = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    return bits_float(sign | float_bits(magnitude));
  }
  if (exponent == 0x1f) return bits_float(sign | 0x7f800000u | (mantissa << 13));
  return bits_float(sign | ((exponent + 112u) << 23) | (mantissa << 13));
}

// binary32 -> binary16, round to nearest even; overflow gives infinity,
// NaN stays NaN.
DL_INLINE Half float_to_half(float f) {
  uint32_t x = float_bits(f);
  const uint16_t sign = static_cast<uint16_t>((x >> 16) & 0x8000u);
  x &= 0x7fffffffu;
  if (x >= 0x7f800000u) {
    return Half{static_cast<uint16_t>(sign | (x > 0x7f800000u ? 0x7e00u : 0x7c00u))};
  }
  // 0x477ff000 is 65520, half way between the largest half (65504) and
  // 65536: from there on, round-to-nearest-even gives infinity.
  if (x >= 0x477ff000u) return Half{static_cast<uint16_t>(sign | 0x7c00u)};
  if (x < 0x38800000u) {
    // Below 2^-14 the result is subnormal. Adding 0.5 (whose ulp is 2^-24,
    // the subnormal step) lets the FPU round; the mantissa is the answer.
    const float shifted = bits_float(x) + 0.5f;
    return Half{static_cast<uint16_t>(sign | (float_bits(shifted) - 0x3f000000u))};
  }
  const uint32_t odd = (x >> 13) & 1u;
  // Rebias the exponent by -112 (0xC8000000 mod 2^32) and round to even.
  x += 0xc8000fffu + odd;
  return Half{static_cast<uint16_t>(sign | (x >> 13))};
}

DL_INLINE float bfloat16_to_float(BFloat16 b) {
  return bits_float(static_cast<uint32_t>(b.bits) << 16);
}

// binary32 -> bfloat16, round to nearest even; NaN stays a quiet NaN.
DL_INLINE BFloat16 float_to_bfloat16(float f) {
  const uint32_t x = float_bits(f);
  if ((x & 0x7fffffffu) > 0x7f800000u) {
    return BFloat16{static_cast<uint16_t>((x >> 16) | 0x0040u)};
  }
  const uint32_t rounded = x + 0x7fffu + ((x >> 16) & 1u);
  return BFloat16{static_cast<uint16_t>(rounded >> 16)};
}

// Type tag for dtype dispatch.
template <typename T>
struct TypeTag {
  using type = T;
};

// Calls fn(TypeTag<T>{}) for the storage type T of dtype and returns true,
// or returns false for an unknown code: the one place a runtime dtype
// becomes a compile-time type, for host and device code alike.
// fn may be host-only (CPU launchers) or device-only (kernels); nvcc's check
// of host/device calls is disabled here because each instantiation is only
// ever called from the side fn belongs to.
#if defined(__CUDACC__)
#pragma nv_exec_check_disable
#endif
template <typename Fn>
DL_INLINE bool visit_dtype(DType dtype, Fn&& fn) {
  switch (dtype) {
    case DType::kFloat32:
      fn(TypeTag<float>{});
      return true;
    case DType::kFloat64:
      fn(TypeTag<double>{});
      return true;
    case DType::kFloat16:
      fn(TypeTag<Half>{});
      return true;
    case DType::kBFloat16:
      fn(TypeTag<BFloat16>{});
      return true;
  }
  return false;
}

// Accumulation type of a pair of storage types: double when either side is
// double, float otherwise (16-bit types are never accumulated in 16 bits).
template <typename A, typename B>
struct AccumulateType {
  using type = float;
};
template <typename B>
struct AccumulateType<double, B> {
  using type = double;
};
template <typename A>
struct AccumulateType<A, double> {
  using type = double;
};
template <>
struct AccumulateType<double, double> {
  using type = double;
};

template <typename Acc>
DL_INLINE Acc to_acc(float v) {
  return static_cast<Acc>(v);
}
template <typename Acc>
DL_INLINE Acc to_acc(double v) {
  return static_cast<Acc>(v);
}
template <typename Acc>
DL_INLINE Acc to_acc(Half v) {
  return static_cast<Acc>(half_to_float(v));
}
template <typename Acc>
DL_INLINE Acc to_acc(BFloat16 v) {
  return static_cast<Acc>(bfloat16_to_float(v));
}

template <typename T>
struct FromAcc;
template <>
struct FromAcc<float> {
  template <typename Acc>
  DL_INLINE static float convert(Acc v) {
    return static_cast<float>(v);
  }
};
template <>
struct FromAcc<double> {
  template <typename Acc>
  DL_INLINE static double convert(Acc v) {
    return static_cast<double>(v);
  }
};
// A double reaches 16 bits through float: for an fp64 tensor with a 16-bit
// buffer (an explicit comm_dtype) this double rounding can differ from a
// direct rounding by one 16-bit ulp in rare ties.
template <>
struct FromAcc<Half> {
  template <typename Acc>
  DL_INLINE static Half convert(Acc v) {
    return float_to_half(static_cast<float>(v));
  }
};
template <>
struct FromAcc<BFloat16> {
  template <typename Acc>
  DL_INLINE static BFloat16 convert(Acc v) {
    return float_to_bfloat16(static_cast<float>(v));
  }
};

template <typename T, typename Acc>
DL_INLINE T from_acc(Acc v) {
  return FromAcc<T>::convert(v);
}

}  // namespace distlearn
