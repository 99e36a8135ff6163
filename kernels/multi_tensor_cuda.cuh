// The CUDA multi-tensor engine: one kernel launch covers every tensor of a
// Layout, and writes the count slots too.
//
// A DeviceTable, built once per (layout, tensor addresses) and kept in
// device memory, lists each tensor (addresses, buffer offset, size, dtype)
// and cuts every tensor into chunks of kChunkElements. Block b takes chunks
// b, b + gridDim.x, ...; its threads stride through the chunk. Every element
// is visited by exactly one thread, so ops need no synchronization.
//
// Memory access: where the chunk's tensor, secondary and buffer addresses
// are 16-byte aligned (the buffer always is, see layout.h; a tensor is
// unless it is a view at an odd offset), each thread moves 16-byte vectors,
// several in flight, then a scalar tail; otherwise the whole chunk takes the
// scalar path. Chunks start at multiples of kChunkElements, so a chunk's
// alignment is its tensor's.
//
// An Op declares which streams it touches and combines one element of each
// in registers (element math comes from element_ops.h):
//   static constexpr bool kReadsPrimary, kWritesPrimary, kReadsSecondary,
//                         kWritesSecondary, kReadsBuffer, kWritesBuffer;
//   template <typename B> __device__ void prepare(const B* buffer);  // once per thread
//   template <typename T, typename B>
//   __device__ void operator()(T& primary, T& secondary, B& buffer) const;
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../csrc/cuda_check.h"
#include "device_table.h"
#include "element_ops.h"
#include "layout.h"
#include "scalar_types.h"
#include "vector_io.cuh"

namespace distlearn {

// 16K elements (64 KB of fp32) per chunk: enough work per block to hide the
// table lookup, small enough that 25M elements make ~1,600 blocks.
constexpr int64_t kChunkElements = int64_t{1} << 14;
constexpr int kThreadsPerBlock = 256;
// Blocks beyond this loop over chunks instead (grid-stride).
constexpr int64_t kMaxBlocks = int64_t{1} << 16;
// Bytes of the wider stream each thread keeps in flight per step: four
// 16-byte vectors, enough outstanding loads to cover DRAM latency at full
// occupancy on A100/H100 without spilling registers.
constexpr int kBytesInFlight = 64;

// Count slots the kernel writes: all zero, then 1 in `slot` when slot >= 0.
// slots == nullptr: the op writes none. flag: where the kernel sets 1 when
// a value it wrote to the buffer is a NaN or an infinity (zeroed by the
// launcher before the kernel); nullptr: no check.
struct CountSlotWrite {
  void* slots;
  int64_t num_slots;
  int64_t slot;
  void* flag;
};

template <typename B>
__device__ void write_count_slots(const CountSlotWrite& count) {
  if (count.slots == nullptr || blockIdx.x != 0) return;
  B* slots = static_cast<B*>(count.slots);
  for (int64_t i = threadIdx.x; i < count.num_slots; i += blockDim.x) {
    slots[i] = from_acc<B>(i == count.slot ? 1.0f : 0.0f);
  }
}

template <typename T, typename B, typename Op>
__device__ void apply_scalar(const Op& op, T* primary, T* secondary, B* segment, int64_t i) {
  T p{};
  T s{};
  B b{};
  if (Op::kReadsPrimary) p = primary[i];
  if (Op::kReadsSecondary) s = secondary[i];
  if (Op::kReadsBuffer) b = segment[i];
  op(p, s, b);
  if (Op::kWritesPrimary) primary[i] = p;
  if (Op::kWritesSecondary) secondary[i] = s;
  if (Op::kWritesBuffer) segment[i] = b;
}

// Elements [begin, end) of one tensor, by this block's threads. With
// check_buffer, sets nonfinite when a value written to the buffer is not finite.
template <typename T, typename B, typename Op>
__device__ void run_chunk(const Op& op, T* primary, T* secondary, B* segment, int64_t begin,
                          int64_t end, bool check_buffer, bool& nonfinite) {
  using Acc = typename AccumulateType<T, B>::type;
  const bool probe = Op::kWritesBuffer && check_buffer;
  // kN elements fill one vector of the narrower type (and one or more of the wider).
  constexpr int kN = kVectorBytes / (sizeof(T) < sizeof(B) ? sizeof(T) : sizeof(B));
  constexpr int kWideBytes = kN * (sizeof(T) > sizeof(B) ? sizeof(T) : sizeof(B));
  constexpr int kIlp = kBytesInFlight / kWideBytes > 0 ? kBytesInFlight / kWideBytes : 1;
  bool vectorized = is_vector_aligned(primary + begin) && is_vector_aligned(segment + begin);
  if (Op::kReadsSecondary || Op::kWritesSecondary) {
    vectorized = vectorized && is_vector_aligned(secondary + begin);
  }
  int64_t scalar_begin = begin;
  if (vectorized) {
    const int64_t vectors = (end - begin) / kN;
    const int64_t stride = static_cast<int64_t>(blockDim.x);
    for (int64_t first = threadIdx.x; first < vectors; first += stride * kIlp) {
      VectorRegisters<T, kN> p[kIlp];
      VectorRegisters<T, kN> s[kIlp];
      VectorRegisters<B, kN> b[kIlp];
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const int64_t i = begin + (first + k * stride) * kN;
        if (first + k * stride < vectors) {
          if (Op::kReadsPrimary) p[k].load(primary + i);
          if (Op::kReadsSecondary) s[k].load(secondary + i);
          if (Op::kReadsBuffer) b[k].load(segment + i);
        }
      }
#pragma unroll
      for (int k = 0; k < kIlp; ++k) {
        const int64_t i = begin + (first + k * stride) * kN;
        if (first + k * stride < vectors) {
#pragma unroll
          for (int e = 0; e < kN; ++e) {
            op(p[k].element[e], s[k].element[e], b[k].element[e]);
            if (probe) nonfinite |= nonfinite_probe(to_acc<Acc>(b[k].element[e])) != Acc(0);
          }
          if (Op::kWritesPrimary) p[k].store(primary + i);
          if (Op::kWritesSecondary) s[k].store(secondary + i);
          if (Op::kWritesBuffer) b[k].store(segment + i);
        }
      }
    }
    scalar_begin = begin + vectors * kN;
  }
  for (int64_t i = scalar_begin + threadIdx.x; i < end; i += blockDim.x) {
    apply_scalar(op, primary, secondary, segment, i);
    if (probe) nonfinite |= nonfinite_probe(to_acc<Acc>(segment[i])) != Acc(0);
  }
}

template <typename T, typename B, typename Op>
__device__ void run_table_chunk(const Op& op, const DeviceTensor& tensor, const DeviceChunk& chunk,
                                B* buffer, bool check_buffer, bool& nonfinite) {
  const int64_t end =
      chunk.begin + kChunkElements < tensor.numel ? chunk.begin + kChunkElements : tensor.numel;
  run_chunk(op, reinterpret_cast<T*>(tensor.primary), reinterpret_cast<T*>(tensor.secondary),
            buffer + tensor.offset, chunk.begin, end, check_buffer, nonfinite);
}

// Every thread that saw a non-finite value stores 1 (the same value, so the
// racing stores agree); the launcher zeroed the flag before the kernel.
template <typename B>
__device__ void raise_flag(const CountSlotWrite& count, bool nonfinite) {
  if (nonfinite && count.flag != nullptr) *static_cast<B*>(count.flag) = from_acc<B>(1.0f);
}

// Every tensor has storage type T (the common case: one instantiation, the
// fewest registers).
template <typename T, typename B, typename Op>
__global__ void __launch_bounds__(kThreadsPerBlock)
    multi_tensor_uniform_kernel(const DeviceTensor* tensors, const DeviceChunk* chunks,
                                int64_t num_chunks, B* buffer, CountSlotWrite count, Op op) {
  write_count_slots<B>(count);
  op.prepare(buffer);
  const bool check_buffer = count.flag != nullptr;
  bool nonfinite = false;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const DeviceChunk chunk = chunks[c];
    run_table_chunk<T>(op, tensors[chunk.tensor], chunk, buffer, check_buffer, nonfinite);
  }
  raise_flag<B>(count, nonfinite);
}

// Tensors of different storage types: the type is read per chunk.
template <typename B, typename Op>
__global__ void __launch_bounds__(kThreadsPerBlock)
    multi_tensor_mixed_kernel(const DeviceTensor* tensors, const DeviceChunk* chunks,
                              int64_t num_chunks, B* buffer, CountSlotWrite count, Op op) {
  write_count_slots<B>(count);
  op.prepare(buffer);
  const bool check_buffer = count.flag != nullptr;
  bool nonfinite = false;
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const DeviceChunk chunk = chunks[c];
    const DeviceTensor tensor = tensors[chunk.tensor];
    visit_dtype(static_cast<DType>(tensor.dtype), [&](auto tensor_tag) {
      using T = typename decltype(tensor_tag)::type;
      run_table_chunk<T>(op, tensor, chunk, buffer, check_buffer, nonfinite);
    });
  }
  raise_flag<B>(count, nonfinite);
}

// Launches op over the table's tensors (and the count-slot write) on stream,
// as one kernel; checks the launch.
template <typename Op>
void launch_multi_tensor(const DeviceTable& table, const Layout& layout, void* buffer,
                         const CountSlotWrite& count, cudaStream_t stream, const Op& op) {
  if (table.num_chunks() == 0 && count.slots == nullptr && count.flag == nullptr) return;
  if (count.flag != nullptr) {
    // All-zero bits are 0 in every buffer type.
    DL_CUDA_CHECK(cudaMemsetAsync(count.flag, 0,
                                  static_cast<size_t>(dtype_size(layout.buffer_dtype)), stream));
  }
  int64_t blocks = table.num_chunks() < kMaxBlocks ? table.num_chunks() : kMaxBlocks;
  if (blocks == 0) blocks = 1;  // only the count slots (and flag) to write
  const dim3 grid(static_cast<unsigned>(blocks));
  visit_dtype(layout.buffer_dtype, [&](auto buffer_tag) {
    using B = typename decltype(buffer_tag)::type;
    B* typed_buffer = static_cast<B*>(buffer);
    if (table.uniform_dtype() >= 0) {
      visit_dtype(static_cast<DType>(table.uniform_dtype()), [&](auto tensor_tag) {
        using T = typename decltype(tensor_tag)::type;
        multi_tensor_uniform_kernel<T, B, Op><<<grid, kThreadsPerBlock, 0, stream>>>(
            table.tensors(), table.chunks(), table.num_chunks(), typed_buffer, count, op);
      });
    } else {
      multi_tensor_mixed_kernel<B, Op><<<grid, kThreadsPerBlock, 0, stream>>>(
          table.tensors(), table.chunks(), table.num_chunks(), typed_buffer, count, op);
    }
  });
  DL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace distlearn
