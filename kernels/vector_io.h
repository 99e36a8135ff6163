// 16-byte vector loads and stores between memory and registers, the one
// place where the device and the host differ inside a kernel body.
//
// On the device, a group of N elements of type S moves as N * sizeof(S) / 16
// loads of uint4 (LDG.128 / STG.128), so the address must be 16-byte
// aligned: the caller checks, and takes its scalar path otherwise. On the
// host (the test harness runs the kernel bodies there) the same group moves
// with memcpy, after the alignment check the device instruction implies, so
// the harness's sanitizers see exactly the bytes the device would touch.
#pragma once

#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "scalar_types.h"

namespace distlearn {

constexpr int kVectorBytes = 16;

// The register type of one load or store: 16 bytes, or 8 for a group of
// a narrow type beside a much wider one (see run_chunk).
#if defined(__CUDACC__)
template <int kBytes>
struct VectorPiece {
  using type = uint4;
};
template <>
struct VectorPiece<8> {
  using type = uint2;
};
#else
template <int kBytes>
struct alignas(kBytes) HostPiece {
  uint32_t word[kBytes / 4];
};
template <int kBytes>
struct VectorPiece {
  using type = HostPiece<kBytes>;
};
#endif

DL_INLINE bool is_vector_aligned(const void* address) {
  return reinterpret_cast<uintptr_t>(address) % kVectorBytes == 0;
}

// Registers for N elements of S, which move as 16-byte pieces (8-byte ones
// when N elements of S are 8 bytes). On the device the union lets the
// pieces move as whole uint4 (uint2) values (one vector instruction each) while the
// op works on the elements; nvcc keeps both views in the same registers. The
// explicit global load/store intrinsics (default caching: .ca loads, .wb
// stores) pin the 128-bit instructions: with plain assignments nvcc was seen
// splitting the buffer stores into four 32-bit ones (CUDA 13.0, sm_90 PTX).
// Tensors and buffers are device (global) memory, which these instructions
// require. On the host only the element view is used.
template <typename S, int N>
struct VectorRegisters {
  static constexpr int kBytes = static_cast<int>(N * sizeof(S));
  static constexpr int kPieceBytes = kBytes < kVectorBytes ? kBytes : kVectorBytes;
  static_assert(kPieceBytes == 8 || kBytes % kVectorBytes == 0,
                "whole 16-byte vectors, or 8 bytes");
  static constexpr int kPieces = kBytes / kPieceBytes;
  using Piece = typename VectorPiece<kPieceBytes>::type;
  static_assert(sizeof(Piece) == kPieceBytes, "a piece is one load");
  union {
    Piece piece[kPieces];
    S element[N];
  };

  DL_HOST_DEVICE VectorRegisters() {}

#if !defined(__CUDA_ARCH__)
  // On the device a vector access at an address that is not a multiple of
  // its size faults (cudaErrorMisalignedAddress); memcpy would not, so the
  // host model checks and throws instead, and the host harness sees the bug.
  static void check_host_alignment(const void* address) {
    if (reinterpret_cast<uintptr_t>(address) % kPieceBytes != 0) {
      throw std::logic_error("vector access at a misaligned address");
    }
  }
#endif

  DL_HOST_DEVICE void load(const S* source) {
#if defined(__CUDA_ARCH__)
    const Piece* from = reinterpret_cast<const Piece*>(source);
    DL_PRAGMA_UNROLL
    for (int p = 0; p < kPieces; ++p) piece[p] = __ldca(from + p);
#else
    check_host_alignment(source);
    std::memcpy(element, source, sizeof(element));
#endif
  }

  DL_HOST_DEVICE void store(S* destination) const {
#if defined(__CUDA_ARCH__)
    Piece* to = reinterpret_cast<Piece*>(destination);
    DL_PRAGMA_UNROLL
    for (int p = 0; p < kPieces; ++p) __stwb(to + p, piece[p]);
#else
    check_host_alignment(destination);
    std::memcpy(destination, element, sizeof(element));
#endif
  }
};

}  // namespace distlearn
