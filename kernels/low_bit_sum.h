// The low-bit sum's three compute passes (issue 24), one quantization block
// at a time; distlearn_cuda/_comm/low_bit.py says how they make the
// collective:
//   encode: a rank's values, plus its error-feedback residual, into the
//           world's messages, and what the quantization lost (one pass);
//   sum:    every rank's message of one shard into that shard's summed
//           message, in float32 in rank order (one pass);
//   decode: the summed messages into the values (one pass).
// The CPU flavor runs blocks on its threads (csrc/low_bit_cpu.cpp), the
// CUDA flavor one block per device thread (csrc/low_bit_cuda.cu); both call
// the functions below, so they agree bit for bit (tests/host_kernels).
//
// A message is one shard: blocks_per_shard blocks of `block` values of the
// payload, zero-padded to world shards. Its codes come first (4-bit codes
// two a byte, the first in the low nibble), then its scales: MXFP4's as
// E8M0 bytes (OCP MX v1.0), the others' as float32 (4 bytes, host order).
//
// Each pass reads each input once: a block's values go into a thread's
// local array (kMaxLowBitBlock floats), which the amax and the codes read.
// The format is a template argument inside a pass, so its loops are the
// format's own.
#pragma once

#include <cstdint>
#include <cstring>

#include "low_bit.h"

namespace distlearn {

struct LowBitShape {
  LowBitFormat format;
  int64_t block;             // values per scale: even (two 4-bit codes a byte), <= 256
  int64_t blocks_per_shard;  // a message's blocks
  int64_t world;             // messages (shards) in the payload

  DL_INLINE int64_t bits() const {
    return format == LowBitFormat::kInt4 || format == LowBitFormat::kMxFp4 ? 4 : 8;
  }
  DL_INLINE int64_t shard() const { return block * blocks_per_shard; }
  DL_INLINE int64_t blocks() const { return world * blocks_per_shard; }
  DL_INLINE int64_t code_bytes() const { return shard() * bits() / 8; }
  DL_INLINE int64_t scale_bytes() const { return format == LowBitFormat::kMxFp4 ? 1 : 4; }
  DL_INLINE int64_t message_bytes() const {
    return code_bytes() + scale_bytes() * blocks_per_shard;
  }
};

// OCP MX v1.0's E8M0: 2^(byte - 127), byte 255 NaN. block_scale's MXFP4
// scales are powers of two in [2^-126, 2^126], or 0 for a block of zeros,
// which travels as byte 0 and reads back as 0 (power_of_two(-127) is 0:
// 2^-127 is no normal float, and the block's codes are 0 either way), or
// NaN (NOTE [Non-finite blocks] in low_bit.h), whose exponent field is all
// ones: byte 255.
DL_INLINE uint8_t encode_e8m0(float scale) {
  return scale == 0.0f ? 0 : static_cast<uint8_t>(exponent_of(scale) + 127);
}
DL_INLINE float decode_e8m0(uint8_t byte) {
  return byte == 255 ? bits_float(0x7FC00000u) : power_of_two(static_cast<int>(byte) - 127);
}

// The largest block. On the device a pass's local array is local memory,
// laid out so that a warp's accesses to one index coalesce.
constexpr int64_t kMaxLowBitBlock = 256;

template <LowBitFormat F>
constexpr int64_t kBitsOf = F == LowBitFormat::kInt4 || F == LowBitFormat::kMxFp4 ? 4 : 8;

// Code i of a message's code bytes, as dequantize_code reads it (int4:
// the two's complement nibble sign-extended to a byte).
template <LowBitFormat F>
DL_INLINE uint8_t read_code(const uint8_t* codes, int64_t i) {
  if (kBitsOf<F> == 8) return codes[i];
  const uint8_t nibble = static_cast<uint8_t>((codes[i / 2] >> ((i & 1) * 4)) & 0xF);
  if (F != LowBitFormat::kInt4) return nibble;
  return static_cast<uint8_t>(static_cast<int8_t>(static_cast<uint8_t>(nibble << 4)) >> 4);
}

template <LowBitFormat F>
DL_INLINE float read_scale(const uint8_t* scales, int64_t k) {
  if (F == LowBitFormat::kMxFp4) return decode_e8m0(scales[k]);
  float scale;
  memcpy(&scale, scales + 4 * k, sizeof(scale));
  return scale;
}

template <LowBitFormat F>
DL_INLINE void write_scale(uint8_t* scales, int64_t k, float scale) {
  if (F == LowBitFormat::kMxFp4) {
    scales[k] = encode_e8m0(scale);
  } else {
    memcpy(scales + 4 * k, &scale, sizeof(scale));
  }
}

// Quantizes values[0, s.block) into block k of a message; lost[i] <-
// values[i] minus its dequantized code, for i < lost_count.
template <LowBitFormat F>
DL_INLINE void encode_into_message(const LowBitShape& s, const float* values, uint8_t* message,
                                   int64_t k, float* lost, int64_t lost_count) {
  const BlockScale scale = block_scale(F, block_amax(values, s.block));
  // Three plain loops (codes, losses, packing) rather than one: each
  // vectorizes on the host.
  uint8_t codes[kMaxLowBitBlock];
  for (int64_t i = 0; i < s.block; ++i) codes[i] = encode_code(F, values[i], scale);
  for (int64_t i = 0; i < lost_count; ++i) {
    lost[i] = values[i] - dequantize_code(F, codes[i], scale.scale);
  }
  uint8_t* out = message + k * (s.block * kBitsOf<F> / 8);
  if (kBitsOf<F> == 8) {
    for (int64_t i = 0; i < s.block; ++i) out[i] = codes[i];
  } else {
    for (int64_t i = 0; i < s.block / 2; ++i) {
      out[i] = static_cast<uint8_t>((codes[2 * i] & 0xF) | ((codes[2 * i + 1] & 0xF) << 4));
    }
  }
  write_scale<F>(message + s.code_bytes(), k, scale.scale);
}

// Block k of a message, dequantized: visit(i, value) for i < count.
template <LowBitFormat F, typename Visit>
DL_INLINE void decode_from_message(const LowBitShape& s, const uint8_t* message, int64_t k,
                                   int64_t count, const Visit& visit) {
  const float scale = read_scale<F>(message + s.code_bytes(), k);
  const int64_t first = k * s.block;
  for (int64_t i = 0; i < count; ++i) {
    visit(i, dequantize_code(F, read_code<F>(message, first + i), scale));
  }
}

// ---------------------------------------------------------------------------
// The passes' arguments and their work per block.

// values and residual: n floats (residual may be null: no error feedback);
// next_residual: n floats written with what the quantization lost (null
// unless residual is given); messages: s.world messages.
struct EncodeArgs {
  LowBitShape shape;
  const float* values;
  const float* residual;
  float* next_residual;
  int64_t n;
  uint8_t* messages;
};

// received: s.world messages of this rank's shard, one per rank, in rank
// order; summed: one message.
struct SumArgs {
  LowBitShape shape;
  const uint8_t* received;
  uint8_t* summed;
};

// gathered: s.world summed messages; values: n floats.
struct DecodeArgs {
  LowBitShape shape;
  const uint8_t* gathered;
  int64_t n;
  float* values;
};

DL_INLINE int64_t block_count(const EncodeArgs& a) { return a.shape.blocks(); }
DL_INLINE int64_t block_count(const SumArgs& a) { return a.shape.blocks_per_shard; }
DL_INLINE int64_t block_count(const DecodeArgs& a) { return a.shape.blocks(); }

// Of block b of a payload of n values: how many are below n.
DL_INLINE int64_t values_in_block(const LowBitShape& s, int64_t n, int64_t b) {
  const int64_t left = n - b * s.block;
  return left < 0 ? 0 : (left < s.block ? left : s.block);
}

// Block b of the padded payload: value i is values[i] (+ residual[i]) below
// n, 0 beyond.
template <LowBitFormat F>
DL_INLINE void run_block_as(const EncodeArgs& a, int64_t b) {
  const LowBitShape& s = a.shape;
  const int64_t first = b * s.block;
  const int64_t count = values_in_block(s, a.n, b);
  float values[kMaxLowBitBlock];
  if (a.residual != nullptr) {
    for (int64_t i = 0; i < count; ++i) values[i] = a.values[first + i] + a.residual[first + i];
  } else {
    for (int64_t i = 0; i < count; ++i) values[i] = a.values[first + i];
  }
  for (int64_t i = count; i < s.block; ++i) values[i] = 0.0f;
  uint8_t* message = a.messages + (b / s.blocks_per_shard) * s.message_bytes();
  float* lost = a.next_residual != nullptr ? a.next_residual + first : nullptr;
  encode_into_message<F>(s, values, message, b % s.blocks_per_shard, lost,
                         lost != nullptr ? count : 0);
}

// Block k of the shard: the sum over the ranks, from 0.0f up in rank order.
template <LowBitFormat F>
DL_INLINE void run_block_as(const SumArgs& a, int64_t k) {
  const LowBitShape& s = a.shape;
  float sums[kMaxLowBitBlock];
  for (int64_t i = 0; i < s.block; ++i) sums[i] = 0.0f;
  for (int64_t r = 0; r < s.world; ++r) {
    decode_from_message<F>(s, a.received + r * s.message_bytes(), k, s.block,
                           [&](int64_t i, float v) { sums[i] += v; });
  }
  encode_into_message<F>(s, sums, a.summed, k, nullptr, 0);
}

template <LowBitFormat F>
DL_INLINE void run_block_as(const DecodeArgs& a, int64_t b) {
  const LowBitShape& s = a.shape;
  float* out = a.values + b * s.block;
  decode_from_message<F>(s, a.gathered + (b / s.blocks_per_shard) * s.message_bytes(),
                         b % s.blocks_per_shard, values_in_block(s, a.n, b),
                         [&](int64_t i, float v) { out[i] = v; });
}

template <typename Args>
DL_INLINE void run_block(const Args& a, int64_t b) {
  switch (a.shape.format) {
    case LowBitFormat::kInt8:
      return run_block_as<LowBitFormat::kInt8>(a, b);
    case LowBitFormat::kInt4:
      return run_block_as<LowBitFormat::kInt4>(a, b);
    case LowBitFormat::kFp8E4M3:
      return run_block_as<LowBitFormat::kFp8E4M3>(a, b);
    case LowBitFormat::kMxFp4:
      return run_block_as<LowBitFormat::kMxFp4>(a, b);
  }
}

// ---------------------------------------------------------------------------
// The CUDA flavor's grid: one quantization block per thread, grid-strided.
// Threads share nothing and write disjoint bytes, so the host harness may
// run them one at a time in any order (tests/host_kernels).

constexpr int kLowBitThreadsPerBlock = 128;
constexpr int64_t kLowBitMaxBlocks = int64_t{1} << 16;

DL_INLINE int64_t low_bit_grid_blocks(int64_t count) {
  const int64_t needed = (count + kLowBitThreadsPerBlock - 1) / kLowBitThreadsPerBlock;
  return needed < 1 ? 1 : (needed < kLowBitMaxBlocks ? needed : kLowBitMaxBlocks);
}

struct LowBitThread {
  int64_t block;
  int64_t blocks;
  int64_t thread;
};

template <typename Args>
DL_INLINE void low_bit_thread(const Args& args, const LowBitThread& at) {
  const int64_t stride = at.blocks * kLowBitThreadsPerBlock;
  for (int64_t b = at.block * kLowBitThreadsPerBlock + at.thread; b < block_count(args);
       b += stride) {
    run_block(args, b);
  }
}

}  // namespace distlearn
