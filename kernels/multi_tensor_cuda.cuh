// The CUDA side of the multi-tensor engine: the kernel, a thin adapter
// around the body in multi_tensor_engine.h, and the launcher that enqueues
// the planned launches on a stream. Nothing here allocates, copies or
// synchronizes: a launch's tensors are in its parameters.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "cuda_check.h"
#include "multi_tensor_engine.h"

#if !defined(CUDART_VERSION) || CUDART_VERSION < 12010
#error "the launch parameters need CUDA >= 12.1 (32,764 bytes of kernel parameters)"
#endif

namespace distlearn {

// __grid_constant__: the kernel reads its parameters in place (a search
// indexes them at run time) instead of copying 32 KB to local memory.
template <typename T, typename B, typename Op>
__global__ void __launch_bounds__(kThreadsPerBlock, kMinBlocksPerSm)
    multi_tensor_kernel(const __grid_constant__ KernelParams<Op> params) {
  const GridPosition at{static_cast<int64_t>(blockIdx.x), static_cast<int64_t>(gridDim.x),
                        static_cast<int64_t>(threadIdx.x), static_cast<int64_t>(blockDim.x)};
  multi_tensor_thread<T, B>(params, at);
}

// Enqueues on one stream; see run_multi_tensor. Every call is checked.
class CudaLauncher {
 public:
  explicit CudaLauncher(cudaStream_t stream) : stream_(stream) {}

  int64_t max_blocks() const { return kMaxBlocks; }

  void zero(void* address, int64_t bytes) {
    DL_CUDA_CHECK(cudaMemsetAsync(address, 0, static_cast<size_t>(bytes), stream_));
  }

  template <typename T, typename B, typename Op>
  void launch(const KernelParams<Op>& params, int64_t blocks) {
    multi_tensor_kernel<T, B, Op>
        <<<dim3(static_cast<unsigned>(blocks)), kThreadsPerBlock, 0, stream_>>>(params);
    DL_CUDA_CHECK(cudaGetLastError());
  }

 private:
  cudaStream_t stream_;
};

}  // namespace distlearn
