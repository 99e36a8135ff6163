// The CUDA multi-tensor engine: one kernel launch covers every tensor of a
// Layout.
//
// A DeviceTable, built once per (layout, tensor addresses) and kept in
// device memory, lists each tensor (addresses, buffer offset, size, dtype)
// and cuts every tensor into chunks of kChunkElements. Block b takes chunks
// b, b + gridDim.x, ...; its threads stride through the chunk. Every element
// is visited by exactly one thread, so ops need no synchronization.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "device_table.h"
#include "layout.h"
#include "scalar_types.h"

namespace distlearn {

// Throws std::runtime_error naming the failed call, with CUDA's message.
#define DL_CUDA_CHECK(call)                                                                       \
  do {                                                                                            \
    const cudaError_t dl_status = (call);                                                         \
    if (dl_status != cudaSuccess) {                                                               \
      throw std::runtime_error(std::string(#call) + " failed: " + cudaGetErrorString(dl_status) + \
                               " (" + __FILE__ + ":" + std::to_string(__LINE__) + ")");           \
    }                                                                                             \
  } while (0)

// 16K elements (64 KB of fp32) per chunk: enough work per block to hide the
// table lookup, small enough that 25M elements make ~1,600 blocks.
constexpr int64_t kChunkElements = int64_t{1} << 14;
constexpr int kThreadsPerBlock = 256;
// Blocks beyond this loop over chunks instead (grid-stride).
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

// Runs op(TypeTag<T>, TypeTag<B>, primary, secondary, buffer_segment, i) for
// every element i of every tensor; T is the tensor's storage type, B the
// buffer's.
template <typename Op>
__global__ void multi_tensor_kernel(const DeviceTensor* tensors, const DeviceChunk* chunks,
                                    int64_t num_chunks, void* buffer, int32_t buffer_dtype, Op op) {
  for (int64_t c = blockIdx.x; c < num_chunks; c += gridDim.x) {
    const DeviceChunk chunk = chunks[c];
    const DeviceTensor tensor = tensors[chunk.tensor];
    const int64_t end =
        chunk.begin + kChunkElements < tensor.numel ? chunk.begin + kChunkElements : tensor.numel;
    visit_dtype(static_cast<DType>(tensor.dtype), [&](auto tensor_tag) {
      visit_dtype(static_cast<DType>(buffer_dtype), [&](auto buffer_tag) {
        using T = typename decltype(tensor_tag)::type;
        using B = typename decltype(buffer_tag)::type;
        T* primary = reinterpret_cast<T*>(tensor.primary);
        T* secondary = reinterpret_cast<T*>(tensor.secondary);
        B* segment = static_cast<B*>(buffer) + tensor.offset;
        for (int64_t i = chunk.begin + threadIdx.x; i < end; i += blockDim.x) {
          op(primary, secondary, segment, i);
        }
      });
    });
  }
}

// Launches op over the table's tensors on stream; checks the launch.
template <typename Op>
void launch_multi_tensor(const DeviceTable& table, const Layout& layout, void* buffer,
                         cudaStream_t stream, const Op& op) {
  if (table.num_chunks() == 0) return;
  const int64_t blocks = table.num_chunks() < kMaxBlocks ? table.num_chunks() : kMaxBlocks;
  multi_tensor_kernel<<<static_cast<unsigned>(blocks), kThreadsPerBlock, 0, stream>>>(
      table.tensors(), table.chunks(), table.num_chunks(), buffer,
      static_cast<int32_t>(layout.buffer_dtype), op);
  DL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace distlearn
