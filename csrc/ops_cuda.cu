// CUDA launchers of the fused ops: validate, then map the element
// operations of kernels/element_ops.h over every tensor with the CUDA
// multi-tensor engine, in one launch per op. No math lives here.
#include <cuda_runtime.h>

#include <stdexcept>
#include <string>

#include "../kernels/element_ops.h"
#include "../kernels/multi_tensor_cuda.cuh"
#include "cuda_check.h"
#include "ops.h"

namespace distlearn {
namespace {

void check_table(const Layout& layout, const DeviceTable& table) {
  if (static_cast<int64_t>(table.primary().size()) != layout.num_tensors()) {
    throw std::invalid_argument("table: built for " + std::to_string(table.primary().size()) +
                                " tensors, the layout has " + std::to_string(layout.num_tensors()));
  }
  int device = 0;
  DL_CUDA_CHECK(cudaGetDevice(&device));
  if (device != table.device()) {
    throw std::invalid_argument("table: built on device " + std::to_string(table.device()) +
                                ", the current device is " + std::to_string(device));
  }
}

void check_buffer(uintptr_t buffer) {
  if (buffer == 0) throw std::invalid_argument("buffer is a null address");
}

void check_count_slot(const Layout& layout, int64_t count_slot) {
  if (count_slot >= layout.count_slots) {
    throw std::invalid_argument("count_slot " + std::to_string(count_slot) +
                                " is out of range: the layout has " +
                                std::to_string(layout.count_slots) + " count slots");
  }
}

cudaStream_t as_stream(uintptr_t stream) { return reinterpret_cast<cudaStream_t>(stream); }

// The count slots and the non-finite flag that pack and the EA blend write
// in their launch.
CountSlotWrite count_slot_write(const Layout& layout, uintptr_t buffer, int64_t count_slot) {
  const int64_t element = dtype_size(layout.buffer_dtype);
  char* base = reinterpret_cast<char*>(buffer);
  void* slots = layout.count_slots > 0 ? base + layout.count_offset * element : nullptr;
  return CountSlotWrite{slots, layout.count_slots, count_slot, base + layout.flag_offset * element};
}

constexpr CountSlotWrite kNoCountSlots{nullptr, 0, -1, nullptr};

// Ops without per-thread state.
struct Stateless {
  template <typename B>
  __device__ void prepare(const B*) {}
};

struct PackOp : Stateless {
  static constexpr bool kReadsPrimary = true, kWritesPrimary = false, kReadsSecondary = false,
                        kWritesSecondary = false, kReadsBuffer = false, kWritesBuffer = true;
  template <typename T, typename B>
  __device__ void operator()(T& tensor, T&, B& buffer) const {
    pack_element(tensor, buffer);
  }
};

// Whether the allreduced non-finite flag is set (read on the device).
template <typename B>
__device__ bool flag_raised(const B* buffer, int64_t flag_offset) {
  return to_acc<double>(buffer[flag_offset]) != 0.0;
}

// Reads the contributor count (and, when skipping, the non-finite flag)
// from the buffer on the device, once per thread: the host never waits for
// the allreduce to learn them.
struct UnpackOp {
  static constexpr bool kReadsPrimary = false, kWritesPrimary = true, kReadsSecondary = false,
                        kWritesSecondary = false, kReadsBuffer = true, kWritesBuffer = false;
  int64_t count_offset;
  int64_t num_slots;
  int64_t flag_offset;
  bool normalize;
  bool skip_nonfinite;
  double scale = 1.0;  // set by prepare
  bool zeros = false;  // set by prepare: a rank packed a non-finite value

  template <typename B>
  __device__ void prepare(const B* buffer) {
    if (normalize) scale = normalization_scale(contributor_count(buffer + count_offset, num_slots));
    zeros = skip_nonfinite && flag_raised(buffer, flag_offset);
  }
  template <typename T, typename B>
  __device__ void operator()(T& tensor, T&, B& buffer) const {
    using Acc = typename AccumulateType<T, B>::type;
    if (zeros) {
      tensor = from_acc<T>(Acc(0));
    } else {
      unpack_scale_element(buffer, static_cast<Acc>(scale), tensor);
    }
  }
};

struct EaBlendOp : Stateless {
  static constexpr bool kReadsPrimary = true, kWritesPrimary = true, kReadsSecondary = true,
                        kWritesSecondary = false, kReadsBuffer = false, kWritesBuffer = true;
  double alpha;
  template <typename T, typename B>
  __device__ void operator()(T& x, T& center, B& delta) const {
    using Acc = typename AccumulateType<T, B>::type;
    ea_blend_element(x, center, static_cast<Acc>(alpha), delta);
  }
};

// The blend with the previous round's center update folded in (asynchronous
// rounds): reads x, the center and the previous sum, writes all three.
struct EaCatchUpBlendOp : Stateless {
  static constexpr bool kReadsPrimary = true, kWritesPrimary = true, kReadsSecondary = true,
                        kWritesSecondary = true, kReadsBuffer = true, kWritesBuffer = true;
  double alpha;
  template <typename T, typename B>
  __device__ void operator()(T& x, T& center, B& sum_then_delta) const {
    using Acc = typename AccumulateType<T, B>::type;
    ea_catch_up_blend_element(x, center, static_cast<Acc>(alpha), sum_then_delta);
  }
};

struct CenterUpdateOp {
  static constexpr bool kReadsPrimary = true, kWritesPrimary = true, kReadsSecondary = false,
                        kWritesSecondary = false, kReadsBuffer = true, kWritesBuffer = false;
  int64_t flag_offset;
  bool skip_nonfinite;
  bool skip = false;  // set by prepare: leave every center as it is

  template <typename B>
  __device__ void prepare(const B* buffer) {
    skip = skip_nonfinite && flag_raised(buffer, flag_offset);
  }
  template <typename T, typename B>
  __device__ void operator()(T& center, T&, B& delta_sum) const {
    if (!skip) center_update_element(center, delta_sum);
  }
};

}  // namespace

int cuda_build_version() { return CUDART_VERSION; }

DeviceTable::DeviceTable(const Layout& layout, const std::vector<uintptr_t>& primary,
                         const std::vector<uintptr_t>& secondary)
    : primary_(primary), secondary_(secondary) {
  const int64_t n = layout.num_tensors();
  if (static_cast<int64_t>(primary.size()) != n) {
    throw std::invalid_argument("tensors: expected " + std::to_string(n) + " addresses, got " +
                                std::to_string(primary.size()));
  }
  if (!secondary.empty() && static_cast<int64_t>(secondary.size()) != n) {
    throw std::invalid_argument("others: expected 0 or " + std::to_string(n) + " addresses, got " +
                                std::to_string(secondary.size()));
  }
  std::vector<DeviceTensor> tensors(n);
  std::vector<DeviceChunk> chunks;
  for (int64_t t = 0; t < n; ++t) {
    if (primary[t] == 0 && layout.numels[t] > 0) {
      throw std::invalid_argument("tensors[" + std::to_string(t) + "] is a null address");
    }
    tensors[t] = DeviceTensor{primary[t], secondary.empty() ? 0 : secondary[t], layout.offsets[t],
                              layout.numels[t], static_cast<int32_t>(layout.dtypes[t])};
    for (int64_t begin = 0; begin < layout.numels[t]; begin += kChunkElements) {
      chunks.push_back(DeviceChunk{t, begin});
    }
  }
  num_chunks_ = static_cast<int64_t>(chunks.size());
  for (int64_t t = 0; t < n; ++t) {
    const auto code = static_cast<int32_t>(layout.dtypes[t]);
    if (t == 0) {
      uniform_dtype_ = code;
    } else if (code != uniform_dtype_) {
      uniform_dtype_ = -1;
      break;
    }
  }
  DL_CUDA_CHECK(cudaGetDevice(&device_));
  if (n == 0) return;
  DL_CUDA_CHECK(cudaMalloc(&tensors_, sizeof(DeviceTensor) * n));
  try {
    DL_CUDA_CHECK(
        cudaMemcpy(tensors_, tensors.data(), sizeof(DeviceTensor) * n, cudaMemcpyHostToDevice));
    if (num_chunks_ > 0) {
      DL_CUDA_CHECK(cudaMalloc(&chunks_, sizeof(DeviceChunk) * num_chunks_));
      DL_CUDA_CHECK(cudaMemcpy(chunks_, chunks.data(), sizeof(DeviceChunk) * num_chunks_,
                               cudaMemcpyHostToDevice));
    }
  } catch (...) {
    cudaFree(tensors_);
    cudaFree(chunks_);
    throw;
  }
}

DeviceTable::~DeviceTable() {
  // Errors here cannot be reported (a destructor must not throw); a failed
  // free leaks the small table and nothing else.
  cudaFree(tensors_);
  cudaFree(chunks_);
}

void pack_cuda(const Layout& layout, const DeviceTable& table, uintptr_t buffer, int64_t count_slot,
               uintptr_t stream) {
  check_table(layout, table);
  check_buffer(buffer);
  check_count_slot(layout, count_slot);
  launch_multi_tensor(table, layout, reinterpret_cast<void*>(buffer),
                      count_slot_write(layout, buffer, count_slot), as_stream(stream), PackOp{});
}

void unpack_cuda(const Layout& layout, const DeviceTable& table, uintptr_t buffer, bool normalize,
                 uintptr_t stream, bool skip_nonfinite) {
  check_table(layout, table);
  check_buffer(buffer);
  const UnpackOp op{layout.count_offset, layout.count_slots, layout.flag_offset, normalize,
                    skip_nonfinite};
  launch_multi_tensor(table, layout, reinterpret_cast<void*>(buffer), kNoCountSlots,
                      as_stream(stream), op);
}

void ea_blend_cuda(const Layout& layout, const DeviceTable& table, uintptr_t buffer, double alpha,
                   int64_t count_slot, uintptr_t stream, bool catch_up) {
  check_table(layout, table);
  check_buffer(buffer);
  check_count_slot(layout, count_slot);
  if (table.secondary().empty()) {
    throw std::invalid_argument("table: the EA blend needs a table built with the centers");
  }
  const CountSlotWrite count = count_slot_write(layout, buffer, count_slot);
  void* data = reinterpret_cast<void*>(buffer);
  if (catch_up) {
    EaCatchUpBlendOp op;
    op.alpha = alpha;
    launch_multi_tensor(table, layout, data, count, as_stream(stream), op);
  } else {
    EaBlendOp op;
    op.alpha = alpha;
    launch_multi_tensor(table, layout, data, count, as_stream(stream), op);
  }
}

void center_update_cuda(const Layout& layout, const DeviceTable& table, uintptr_t buffer,
                        uintptr_t stream, bool skip_nonfinite) {
  check_table(layout, table);
  check_buffer(buffer);
  const CenterUpdateOp op{layout.flag_offset, skip_nonfinite};
  launch_multi_tensor(table, layout, reinterpret_cast<void*>(buffer), kNoCountSlots,
                      as_stream(stream), op);
}

}  // namespace distlearn
