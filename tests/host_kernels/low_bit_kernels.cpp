// Runs the CUDA flavor of the low-bit sum's passes on the CPU: every
// (block, thread) of the launch grid (kernels/low_bit_sum.h's
// low_bit_grid_blocks, and a grid of one or two blocks, which makes each
// thread stride), one at a time in a random order, and compares every byte
// written with the CPU flavor (csrc/low_bit_cpu.cpp, linked in). The CPU
// flavor's values are checked against the float64 oracle in
// tests/test_low_bit_passes.py; this harness shows the CUDA flavor is the
// same function. Outputs start poisoned, the two flavors' with different
// bytes, so a byte either leaves unwritten shows;
// every array is a heap block of exactly its size, so a read or write past
// its end trips AddressSanitizer. Built by tests/test_host_kernels.py.
//
// The sequential model holds for these kernels: a thread reads only its
// inputs and writes only its own block's bytes (codes, scale, residual).
//
// Usage: low_bit_kernels SEED
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <utility>
#include <vector>

#include "../../csrc/low_bit_ops.h"
#include "../host_common/check.h"

namespace dl = distlearn;

namespace {

// The CPU flavor's outputs start as kPoison bytes, the grid's as kOtherPoison.
constexpr uint8_t kPoison = 0xAB;
constexpr uint8_t kOtherPoison = 0x5A;

// A heap array of exactly n elements (AddressSanitizer guards its ends),
// every byte `poison`.
template <typename T>
std::unique_ptr<T[]> poisoned(int64_t n, uint8_t poison = kPoison) {
  std::unique_ptr<T[]> array(new T[static_cast<size_t>(n)]);
  std::memset(static_cast<void*>(array.get()), poison, sizeof(T) * static_cast<size_t>(n));
  return array;
}

template <typename T>
uintptr_t address(const std::unique_ptr<T[]>& array) {
  return reinterpret_cast<uintptr_t>(array.get());
}

// Every (block, thread) of a grid of `blocks` blocks, in a random order.
template <typename Args>
void run_grid(const Args& args, int64_t blocks, std::mt19937_64& rng) {
  std::vector<dl::LowBitThread> threads;
  for (int64_t b = 0; b < blocks; ++b) {
    for (int64_t t = 0; t < dl::kLowBitThreadsPerBlock; ++t) threads.push_back({b, blocks, t});
  }
  std::shuffle(threads.begin(), threads.end(), rng);
  for (const dl::LowBitThread& at : threads) dl::low_bit_thread(args, at);
}

template <typename T>
void check_same_bytes(const T* got, const T* want, int64_t n, const std::string& what) {
  const auto* a = reinterpret_cast<const uint8_t*>(got);
  const auto* b = reinterpret_cast<const uint8_t*>(want);
  for (int64_t i = 0; i < static_cast<int64_t>(sizeof(T)) * n; ++i) {
    CHECK(a[i] == b[i], what + ": byte " + std::to_string(i) + " differs from the CPU flavor's");
  }
}

// Values whose magnitudes spread over many binades, some blocks all zero,
// and (rarely) a non-finite value.
std::unique_ptr<float[]> random_values(int64_t n, std::mt19937_64& rng, bool nonfinite) {
  std::normal_distribution<float> normal;
  std::uniform_int_distribution<int> exponent(-30, 30);
  auto values = poisoned<float>(n);
  const bool zero_run = rng() % 3 == 0;
  for (int64_t i = 0; i < n; ++i) values[i] = std::ldexp(normal(rng), exponent(rng));
  if (zero_run && n > 0) {
    const int64_t first = static_cast<int64_t>(rng() % static_cast<uint64_t>(n));
    for (int64_t i = first; i < n && i < first + 300; ++i) values[i] = 0.0f;
  }
  if (nonfinite && n > 0) {
    const float specials[] = {NAN, INFINITY, -INFINITY};
    values[rng() % static_cast<uint64_t>(n)] = specials[rng() % 3];
  }
  return values;
}

// One case: the three passes, each run by both flavors, on one shape.
void run_case(std::mt19937_64& rng, int index) {
  const int32_t format = static_cast<int32_t>(rng() % 4);
  const int64_t blocks[] = {2, 8, 32, 128, 130, 256};
  const int64_t block = blocks[rng() % 6];
  const int64_t world = 1 + static_cast<int64_t>(rng() % 4);
  const int64_t blocks_per_shard = 1 + static_cast<int64_t>(rng() % 5);
  const dl::LowBitShape s = dl::low_bit_shape(format, block, blocks_per_shard, world);
  const int64_t padded = s.shard() * world;
  const int64_t n = padded - static_cast<int64_t>(rng() % static_cast<uint64_t>(s.shard() + 1));
  const bool feedback = rng() % 2 == 0;
  const std::string where = "case " + std::to_string(index) + " (format " + std::to_string(format) +
                            ", block " + std::to_string(block) + ", world " +
                            std::to_string(world) + ", blocks per shard " +
                            std::to_string(blocks_per_shard) + ", n " + std::to_string(n) +
                            (feedback ? ", error feedback" : "") + ")";
  const int64_t message = s.message_bytes();
  const int64_t grids[] = {dl::low_bit_grid_blocks(s.blocks()),
                           1 + static_cast<int64_t>(rng() % 2)};

  // Encode.
  auto values = random_values(n, rng, rng() % 4 == 0);
  auto residual = random_values(feedback ? n : 0, rng, false);
  auto want_messages = poisoned<uint8_t>(world * message);
  auto want_residual = poisoned<float>(feedback ? n : 0);
  dl::low_bit_encode_cpu(s, address(values), feedback ? address(residual) : 0,
                         feedback ? address(want_residual) : 0, n, address(want_messages), 2);
  for (const int64_t grid : grids) {
    auto messages = poisoned<uint8_t>(world * message, kOtherPoison);
    auto next_residual = poisoned<float>(feedback ? n : 0, kOtherPoison);
    run_grid(dl::EncodeArgs{s, values.get(), feedback ? residual.get() : nullptr,
                            feedback ? next_residual.get() : nullptr, n, messages.get()},
             grid, rng);
    check_same_bytes(messages.get(), want_messages.get(), world * message, where + ", encode");
    check_same_bytes(next_residual.get(), want_residual.get(), feedback ? n : 0,
                     where + ", residual");
  }

  // Sum: the received messages are every rank's encoding of its values.
  auto received = poisoned<uint8_t>(world * message);
  for (int64_t r = 0; r < world; ++r) {
    auto rank_values = random_values(n, rng, false);
    auto rank_messages = poisoned<uint8_t>(world * message);
    dl::low_bit_encode_cpu(s, address(rank_values), 0, 0, n, address(rank_messages), 1);
    std::memcpy(received.get() + r * message, rank_messages.get() + (world - 1) * message,
                static_cast<size_t>(message));
  }
  auto want_summed = poisoned<uint8_t>(message);
  dl::low_bit_sum_cpu(s, address(received), address(want_summed), 2);
  for (const int64_t grid : {dl::low_bit_grid_blocks(blocks_per_shard), int64_t{1}}) {
    auto summed = poisoned<uint8_t>(message, kOtherPoison);
    run_grid(dl::SumArgs{s, received.get(), summed.get()}, grid, rng);
    check_same_bytes(summed.get(), want_summed.get(), message, where + ", sum");
  }

  // Decode: the gathered messages are the encoded values'.
  auto want_values = poisoned<float>(n);
  dl::low_bit_decode_cpu(s, address(want_messages), n, address(want_values), 2);
  for (const int64_t grid : grids) {
    auto decoded = poisoned<float>(n, kOtherPoison);
    run_grid(dl::DecodeArgs{s, want_messages.get(), n, decoded.get()}, grid, rng);
    check_same_bytes(decoded.get(), want_values.get(), n, where + ", decode");
  }
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2) {
    std::fprintf(stderr, "usage: low_bit_kernels SEED\n");
    return 2;
  }
  const uint64_t seed = std::strtoull(argv[1], nullptr, 10);
  std::mt19937_64 rng(seed);
  constexpr int kCases = 60;
  try {
    for (int i = 0; i < kCases; ++i) run_case(rng, i);
  } catch (const std::exception& error) {
    std::printf("seed %llu: %s\n", static_cast<unsigned long long>(seed), error.what());
    return 1;
  }
  std::printf("low-bit kernels: %d cases: ok\n", kCases);
  return 0;
}
