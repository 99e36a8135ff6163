// Tables that let one CUDA launch find every tensor of a Layout. Plain C++
// (no CUDA headers), so the bindings can hold a DeviceTable; the constructor
// and destructor live in csrc/ops_cuda.cu.
#pragma once

#include <cstdint>
#include <vector>

#include "layout.h"

namespace distlearn {

struct DeviceTensor {
  uintptr_t primary;    // the tensor an op reads or writes (x for the EA blend)
  uintptr_t secondary;  // the EA blend's center; 0 for the other ops
  int64_t offset;       // first buffer element of this tensor
  int64_t numel;
  int32_t dtype;  // DType code
};

struct DeviceChunk {
  int64_t tensor;
  int64_t begin;  // first element of the chunk in its tensor
};

// Tensor and chunk tables in device memory for one layout and one set of
// tensor addresses. Building it copies to the device (a synchronization):
// done once per list, never on the hot path.
class DeviceTable {
 public:
  DeviceTable(const Layout& layout, const std::vector<uintptr_t>& primary,
              const std::vector<uintptr_t>& secondary);
  ~DeviceTable();  // frees the device memory; never throws
  DeviceTable(const DeviceTable&) = delete;
  DeviceTable& operator=(const DeviceTable&) = delete;

  const DeviceTensor* tensors() const { return tensors_; }
  const DeviceChunk* chunks() const { return chunks_; }
  int64_t num_chunks() const { return num_chunks_; }
  int device() const { return device_; }
  // The DType code every tensor shares, or -1 when they differ (or there are none).
  int32_t uniform_dtype() const { return uniform_dtype_; }
  const std::vector<uintptr_t>& primary() const { return primary_; }
  const std::vector<uintptr_t>& secondary() const { return secondary_; }

 private:
  DeviceTensor* tensors_ = nullptr;
  DeviceChunk* chunks_ = nullptr;
  int64_t num_chunks_ = 0;
  int device_ = 0;
  int32_t uniform_dtype_ = -1;
  std::vector<uintptr_t> primary_;
  std::vector<uintptr_t> secondary_;
};

}  // namespace distlearn
