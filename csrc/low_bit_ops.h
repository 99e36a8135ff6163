// Host entry points of the low-bit sum's passes (kernels/low_bit_sum.h) and
// of the block codecs. Arrays arrive as raw addresses, so this layer needs
// no torch; every argument is checked here (std::invalid_argument, a
// ValueError in Python) before a pass runs.
#pragma once

#include <cstdint>

#include "../kernels/low_bit_sum.h"

namespace distlearn {

// The shape of a low-bit sum: format 0 int8, 1 int4, 2 fp8 e4m3, 3 mxfp4;
// block even and in [2, kMaxLowBitBlock], blocks_per_shard >= 1, world >= 1, and the padded
// payload's bytes within int64.
LowBitShape low_bit_shape(int32_t format, int64_t block, int64_t blocks_per_shard, int64_t world);

// The passes on the CPU, on up to num_threads threads. n <= the padded
// payload (shape.shard() * shape.world); residual and next_residual are
// both 0 (no error feedback) or both given.
void low_bit_encode_cpu(const LowBitShape& shape, uintptr_t values, uintptr_t residual,
                        uintptr_t next_residual, int64_t n, uintptr_t messages, int num_threads);
void low_bit_sum_cpu(const LowBitShape& shape, uintptr_t received, uintptr_t summed,
                     int num_threads);
void low_bit_decode_cpu(const LowBitShape& shape, uintptr_t gathered, int64_t n, uintptr_t values,
                        int num_threads);

// The block codecs over one float32 array: the blocks of `block`
// consecutive values (the last may be shorter), a code per value (4-bit
// formats in the low nibble) and a float32 scale per block. For the tests
// of the formats against their specifications.
void quantize_blocks_cpu(int32_t format, uintptr_t values, int64_t n, int64_t block,
                         uintptr_t codes, uintptr_t scales);
void dequantize_blocks_cpu(int32_t format, uintptr_t codes, uintptr_t scales, int64_t n,
                           int64_t block, uintptr_t out);

// The passes' arguments from raw addresses, checked (std::invalid_argument),
// for both flavors.
EncodeArgs encode_args(const LowBitShape& shape, uintptr_t values, uintptr_t residual,
                       uintptr_t next_residual, int64_t n, uintptr_t messages);
SumArgs sum_args(const LowBitShape& shape, uintptr_t received, uintptr_t summed);
DecodeArgs decode_args(const LowBitShape& shape, uintptr_t gathered, int64_t n, uintptr_t values);

}  // namespace distlearn

#ifdef DISTLEARN_WITH_CUDA
namespace distlearn {

// The same passes on device addresses of the current device, enqueued on
// `stream` (a cudaStream_t) without synchronizing the host.
void low_bit_encode_cuda(const LowBitShape& shape, uintptr_t values, uintptr_t residual,
                         uintptr_t next_residual, int64_t n, uintptr_t messages, uintptr_t stream);
void low_bit_sum_cuda(const LowBitShape& shape, uintptr_t received, uintptr_t summed,
                      uintptr_t stream);
void low_bit_decode_cuda(const LowBitShape& shape, uintptr_t gathered, int64_t n, uintptr_t values,
                         uintptr_t stream);

}  // namespace distlearn
#endif  // DISTLEARN_WITH_CUDA
