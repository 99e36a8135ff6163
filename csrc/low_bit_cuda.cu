// CUDA launchers of the low-bit sum's passes: kernels/low_bit_sum.h's
// blocks, one per device thread, enqueued on the caller's stream. The
// arguments travel by value in the launch; nothing allocates, copies or
// synchronizes. No math lives here.
#include <cuda_runtime.h>

#include "../kernels/cuda_check.h"
#include "low_bit_ops.h"

namespace distlearn {
namespace {

template <typename Args>
__global__ void __launch_bounds__(kLowBitThreadsPerBlock) low_bit_kernel(const Args args) {
  low_bit_thread(args,
                 LowBitThread{static_cast<int64_t>(blockIdx.x), static_cast<int64_t>(gridDim.x),
                              static_cast<int64_t>(threadIdx.x)});
}

template <typename Args>
void launch(const Args& args, uintptr_t stream) {
  const int64_t blocks = low_bit_grid_blocks(block_count(args));
  low_bit_kernel<Args><<<dim3(static_cast<unsigned>(blocks)), kLowBitThreadsPerBlock, 0,
                         reinterpret_cast<cudaStream_t>(stream)>>>(args);
  DL_CUDA_CHECK(cudaGetLastError());
}

}  // namespace

void low_bit_encode_cuda(const LowBitShape& shape, uintptr_t values, uintptr_t residual,
                         uintptr_t next_residual, int64_t n, uintptr_t messages, uintptr_t stream) {
  launch(encode_args(shape, values, residual, next_residual, n, messages), stream);
}

void low_bit_sum_cuda(const LowBitShape& shape, uintptr_t received, uintptr_t summed,
                      uintptr_t stream) {
  launch(sum_args(shape, received, summed), stream);
}

void low_bit_decode_cuda(const LowBitShape& shape, uintptr_t gathered, int64_t n, uintptr_t values,
                         uintptr_t stream) {
  launch(decode_args(shape, gathered, n, values), stream);
}

}  // namespace distlearn
