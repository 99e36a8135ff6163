// The host launcher of the kernel harness (host_kernels.cpp): runs every
// (block, thread) of each launch's grid on the CPU, one at a time, in a
// random order. The fused ops' instantiations for it, which hold every
// kernel body for every dtype pair and are most of the harness's compile
// time, are compiled apart (launch_*.cpp, explicit instantiations), in
// parallel with the harness, which declares them extern here.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <random>
#include <type_traits>
#include <utility>
#include <vector>

#include "../../csrc/multi_tensor_ops.h"

namespace host_kernels {

namespace dl = distlearn;
using dl::DType;
using Addresses = std::vector<uintptr_t>;

// An op that counts its element operations (one call per element) and
// otherwise is the op: same flags, so the same vector width and groups in
// flight, and the same planning.
template <typename Op>
struct CountingOp : Op {
  int64_t* calls;
  template <typename T, typename B>
  void operator()(T& primary, T& secondary, B& buffer) const {
    ++*calls;
    Op::operator()(primary, secondary, buffer);
  }
  template <typename T, typename B>
  void operator()(T& primary, T& secondary, T& tertiary, B& buffer) const {
    ++*calls;
    Op::operator()(primary, secondary, tertiary, buffer);
  }
};

struct LaunchRecord {
  DType dtype;
  bool writes_count_slots;
  int64_t blocks;
  int64_t num_chunks;
  std::vector<uintptr_t> primary;
  std::vector<int64_t> numel;
  std::vector<int64_t> chunk_end;
};

class HostLauncher {
 public:
  HostLauncher(int64_t max_blocks, std::mt19937_64& rng) : max_blocks_(max_blocks), rng_(rng) {}

  int64_t max_blocks() const { return max_blocks_; }

  void zero(void* address, int64_t bytes) {
    std::memset(address, 0, static_cast<size_t>(bytes));
    ++zeroed;
  }

  template <typename T, typename B, typename Op>
  void launch(const dl::KernelParams<Op>& params, int64_t blocks) {
    const auto& list = params.list;
    LaunchRecord record;
    record.dtype = dtype_of<T>();
    record.writes_count_slots = params.count.slots != nullptr;
    record.blocks = blocks;
    record.num_chunks = list.num_chunks;
    for (int64_t i = 0; i < list.num_tensors; ++i) {
      record.primary.push_back(list.tensor[0][i]);
      record.numel.push_back(list.numel[i]);
      record.chunk_end.push_back(list.chunk_end[i]);
    }
    launches.push_back(std::move(record));
    // The device gets the parameters by value: so does this grid.
    auto counted = std::make_unique<dl::KernelParams<CountingOp<Op>>>();
    counted->list = params.list;
    counted->count = params.count;
    counted->op = CountingOp<Op>{params.op, &calls};
    std::vector<std::pair<int64_t, int64_t>> order;
    order.reserve(static_cast<size_t>(blocks) * dl::kThreadsPerBlock);
    for (int64_t b = 0; b < blocks; ++b) {
      for (int64_t t = 0; t < dl::kThreadsPerBlock; ++t) order.emplace_back(b, t);
    }
    std::shuffle(order.begin(), order.end(), rng_);
    for (const auto& [b, t] : order) {
      dl::multi_tensor_thread<T, B>(*counted, dl::GridPosition{b, blocks, t, dl::kThreadsPerBlock});
    }
  }

  std::vector<LaunchRecord> launches;
  int64_t calls = 0;
  int zeroed = 0;

 private:
  template <typename T>
  static DType dtype_of() {
    if (std::is_same_v<T, double>) return DType::kFloat64;
    if (std::is_same_v<T, dl::Half>) return DType::kFloat16;
    if (std::is_same_v<T, dl::BFloat16>) return DType::kBFloat16;
    return DType::kFloat32;
  }

  int64_t max_blocks_;
  std::mt19937_64& rng_;
};

}  // namespace host_kernels

// The ops' instantiations for the host launcher: defined in launch_*.cpp.
namespace distlearn {

// launch_pack_unpack.cpp
extern template void pack_multi_tensor(host_kernels::HostLauncher&, const Layout&,
                                       const host_kernels::Addresses&, uintptr_t, int64_t);
extern template void unpack_multi_tensor(host_kernels::HostLauncher&, const Layout&,
                                         const host_kernels::Addresses&, uintptr_t, bool, bool,
                                         const Agreement&);
extern template void center_update_multi_tensor(host_kernels::HostLauncher&, const Layout&,
                                                const host_kernels::Addresses&, uintptr_t, bool);
extern template void outer_gradient_multi_tensor(host_kernels::HostLauncher&, const Layout&,
                                                 const host_kernels::Addresses&,
                                                 const host_kernels::Addresses&, uintptr_t,
                                                 int64_t);
// launch_blend_step.cpp
extern template void ea_blend_multi_tensor(host_kernels::HostLauncher&, const Layout&,
                                           const host_kernels::Addresses&,
                                           const host_kernels::Addresses&, uintptr_t, double,
                                           int64_t, bool);
extern template void outer_step_multi_tensor(host_kernels::HostLauncher&, const Layout&,
                                             const host_kernels::Addresses&,
                                             const host_kernels::Addresses&,
                                             const host_kernels::Addresses&, uintptr_t,
                                             const OuterSettings&, bool);

}  // namespace distlearn
