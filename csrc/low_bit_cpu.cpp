// The low-bit sum's passes and the block codecs on the CPU: argument
// checks, then kernels/low_bit_sum.h's blocks over the CPU engine's
// threads. No math lives here.
#include <initializer_list>
#include <limits>
#include <stdexcept>
#include <string>

#include "../kernels/multi_tensor_cpu.h"
#include "low_bit_ops.h"

namespace distlearn {
namespace {

LowBitFormat checked_format(int32_t format) {
  if (format < 0 || format > static_cast<int32_t>(LowBitFormat::kMxFp4)) {
    throw std::invalid_argument(
        "format must be 0 (int8), 1 (int4), 2 (fp8 e4m3) or 3 (mxfp4), got " +
        std::to_string(format));
  }
  return static_cast<LowBitFormat>(format);
}

// The block codecs' arguments.
LowBitFormat checked_codec(int32_t format, int64_t n, int64_t block) {
  const LowBitFormat f = checked_format(format);
  if (n < 0 || block < 1) {
    throw std::invalid_argument("n must be >= 0 and block >= 1, got n " + std::to_string(n) +
                                ", block " + std::to_string(block));
  }
  return f;
}

// A payload of n values fits the shape's padded payload.
void check_payload(const LowBitShape& shape, int64_t n) {
  if (n < 0 || n > shape.shard() * shape.world) {
    throw std::invalid_argument("n must be in [0, block * blocks_per_shard * world], got " +
                                std::to_string(n));
  }
}

void check_addresses_given(int64_t n, std::initializer_list<uintptr_t> addresses) {
  for (uintptr_t address : addresses) {
    if (n > 0 && address == 0) throw std::invalid_argument("a null address");
  }
}

void check_threads(int num_threads) {
  if (num_threads < 1) {
    throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(num_threads));
  }
}

// The passes cost about 1 to 8 ns per value on one core (int8 to fp8,
// benchmarks/bench_cpu_ops.py), 15 to 100 times a copy's, so a thread pays
// for its start (tens of microseconds) from fewer values than a copy does.
constexpr int64_t kMinLowBitValuesPerThread = int64_t{1} << 15;

// Runs shape's blocks of `args` on up to num_threads threads.
template <typename Args>
void run_blocks(const Args& args, int num_threads) {
  check_threads(num_threads);
  const int64_t count = block_count(args);
  const int threads = threads_for(count * args.shape.block, num_threads, kMinLowBitValuesPerThread);
  parallel_for_pieces(count, threads, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) run_block(args, b);
  });
}

}  // namespace

LowBitShape low_bit_shape(int32_t format, int64_t block, int64_t blocks_per_shard, int64_t world) {
  const LowBitFormat f = checked_format(format);
  if (block < 2 || block % 2 != 0 || block > kMaxLowBitBlock) {
    throw std::invalid_argument("block must be even and in [2, " + std::to_string(kMaxLowBitBlock) +
                                "], got " + std::to_string(block));
  }
  if (blocks_per_shard < 1 || world < 1) {
    throw std::invalid_argument("blocks_per_shard and world must be >= 1, got " +
                                std::to_string(blocks_per_shard) + " and " + std::to_string(world));
  }
  // The padded payload's floats (4 bytes each) must index in int64.
  const int64_t limit = std::numeric_limits<int64_t>::max() / 4;
  if (block > limit / blocks_per_shard || block * blocks_per_shard > limit / world) {
    throw std::invalid_argument("block * blocks_per_shard * world overflows int64");
  }
  return LowBitShape{f, block, blocks_per_shard, world};
}

EncodeArgs encode_args(const LowBitShape& shape, uintptr_t values, uintptr_t residual,
                       uintptr_t next_residual, int64_t n, uintptr_t messages) {
  check_payload(shape, n);
  if ((residual == 0) != (next_residual == 0)) {
    throw std::invalid_argument("residual and next_residual go together (both or neither)");
  }
  check_addresses_given(n, {values});
  check_addresses_given(1, {messages});
  return EncodeArgs{shape,
                    reinterpret_cast<const float*>(values),
                    reinterpret_cast<const float*>(residual),
                    reinterpret_cast<float*>(next_residual),
                    n,
                    reinterpret_cast<uint8_t*>(messages)};
}

SumArgs sum_args(const LowBitShape& shape, uintptr_t received, uintptr_t summed) {
  check_addresses_given(1, {received, summed});
  return SumArgs{shape, reinterpret_cast<const uint8_t*>(received),
                 reinterpret_cast<uint8_t*>(summed)};
}

DecodeArgs decode_args(const LowBitShape& shape, uintptr_t gathered, int64_t n, uintptr_t values) {
  check_payload(shape, n);
  check_addresses_given(n, {values});
  check_addresses_given(1, {gathered});
  return DecodeArgs{shape, reinterpret_cast<const uint8_t*>(gathered), n,
                    reinterpret_cast<float*>(values)};
}

void low_bit_encode_cpu(const LowBitShape& shape, uintptr_t values, uintptr_t residual,
                        uintptr_t next_residual, int64_t n, uintptr_t messages, int num_threads) {
  run_blocks(encode_args(shape, values, residual, next_residual, n, messages), num_threads);
}

void low_bit_sum_cpu(const LowBitShape& shape, uintptr_t received, uintptr_t summed,
                     int num_threads) {
  run_blocks(sum_args(shape, received, summed), num_threads);
}

void low_bit_decode_cpu(const LowBitShape& shape, uintptr_t gathered, int64_t n, uintptr_t values,
                        int num_threads) {
  run_blocks(decode_args(shape, gathered, n, values), num_threads);
}

void quantize_blocks_cpu(int32_t format, uintptr_t values, int64_t n, int64_t block,
                         uintptr_t codes, uintptr_t scales) {
  const LowBitFormat f = checked_codec(format, n, block);
  check_addresses_given(n, {values, codes, scales});
  const float* in = reinterpret_cast<const float*>(values);
  uint8_t* out = reinterpret_cast<uint8_t*>(codes);
  float* scale = reinterpret_cast<float*>(scales);
  for (int64_t first = 0, b = 0; first < n; first += block, ++b) {
    const int64_t size = n - first < block ? n - first : block;
    scale[b] = quantize_block(f, in + first, size, out + first);
  }
}

void dequantize_blocks_cpu(int32_t format, uintptr_t codes, uintptr_t scales, int64_t n,
                           int64_t block, uintptr_t out) {
  const LowBitFormat f = checked_codec(format, n, block);
  check_addresses_given(n, {codes, scales, out});
  const uint8_t* in = reinterpret_cast<const uint8_t*>(codes);
  const float* scale = reinterpret_cast<const float*>(scales);
  float* values = reinterpret_cast<float*>(out);
  for (int64_t i = 0; i < n; ++i) values[i] = dequantize_code(f, in[i], scale[i / block]);
}

}  // namespace distlearn
