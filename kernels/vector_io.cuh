// 16-byte vector loads and stores between global memory and registers.
//
// A group of N elements of type S moves as N * sizeof(S) / 16 loads of
// uint4 (LDG.128 / STG.128), so the address must be 16-byte aligned: the
// caller checks, and takes its scalar path otherwise.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

namespace distlearn {

constexpr int kVectorBytes = 16;

__device__ inline bool is_vector_aligned(const void* address) {
  return reinterpret_cast<uintptr_t>(address) % kVectorBytes == 0;
}

// Registers for N elements of S. The union lets the 16-byte pieces move as
// whole uint4 values (one vector instruction each) while the op works on the
// elements; nvcc keeps both views in the same registers. The explicit
// global load/store intrinsics (default caching: .ca loads, .wb stores) pin
// the 128-bit instructions: with plain assignments nvcc was seen splitting
// the buffer stores into four 32-bit ones (CUDA 13.0, sm_90 PTX). Tensors and
// buffers are device (global) memory, which these instructions require.
template <typename S, int N>
struct VectorRegisters {
  static_assert(N * sizeof(S) % kVectorBytes == 0, "a whole number of 16-byte vectors");
  static constexpr int kPieces = static_cast<int>(N * sizeof(S) / kVectorBytes);
  union {
    uint4 piece[kPieces];
    S element[N];
  };

  __device__ VectorRegisters() {}

  __device__ void load(const S* source) {
    const uint4* from = reinterpret_cast<const uint4*>(source);
#pragma unroll
    for (int p = 0; p < kPieces; ++p) piece[p] = __ldca(from + p);
  }

  __device__ void store(S* destination) const {
    uint4* to = reinterpret_cast<uint4*>(destination);
#pragma unroll
    for (int p = 0; p < kPieces; ++p) __stwb(to + p, piece[p]);
  }
};

}  // namespace distlearn
