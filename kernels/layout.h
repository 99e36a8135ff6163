// Layout of a list of tensors in one flat buffer, planned once per list.
//
//   buffer = [seg 0][pad][seg 1][pad] ... [seg n-1][pad][count slots][flag][pad]
//
// The flag is the non-finite guard's: each rank packs 1 there when a value it
// packed is a NaN or an infinity, 0 otherwise, so after the allreduce it holds
// the number of such ranks, the same on every rank.
//
// Every segment and the count slots start at a multiple of kSegmentAlign
// elements, so vectorized kernels see aligned buffer addresses. Padding is
// zero when the buffer is allocated and never written, so it stays zero
// through every allreduce.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "scalar_types.h"

namespace distlearn {

// 16 elements: 64 bytes (one cache line, four 16-byte vectors) of fp32.
constexpr int64_t kSegmentAlign = 16;

struct Layout {
  std::vector<int64_t> numels;   // elements of each tensor
  std::vector<int64_t> offsets;  // first buffer element of each tensor
  std::vector<DType> dtypes;     // storage type of each tensor
  DType buffer_dtype;
  int64_t count_offset;  // first count slot
  int64_t count_slots;   // number of count slots (0: none)
  int64_t flag_offset;   // the non-finite flag, right after the count slots
  int64_t buffer_numel;  // total buffer length, padding included

  int64_t num_tensors() const { return static_cast<int64_t>(numels.size()); }
  int64_t data_numel() const { return count_offset; }
};

inline int64_t align_up(int64_t n, int64_t alignment) {
  return (n + alignment - 1) / alignment * alignment;
}

inline Layout make_layout(const std::vector<int64_t>& numels, const std::vector<int32_t>& dtypes,
                          int32_t buffer_dtype, int64_t count_slots) {
  if (numels.size() != dtypes.size()) {
    throw std::invalid_argument("numels and dtypes must have the same length, got " +
                                std::to_string(numels.size()) + " and " +
                                std::to_string(dtypes.size()));
  }
  if (!is_valid_dtype(buffer_dtype)) {
    throw std::invalid_argument("buffer_dtype: unknown dtype code " + std::to_string(buffer_dtype));
  }
  if (count_slots < 0) {
    throw std::invalid_argument("count_slots must be >= 0, got " + std::to_string(count_slots));
  }
  Layout layout;
  layout.buffer_dtype = static_cast<DType>(buffer_dtype);
  layout.count_slots = count_slots;
  int64_t offset = 0;
  for (size_t i = 0; i < numels.size(); ++i) {
    if (numels[i] < 0) {
      throw std::invalid_argument("numels[" + std::to_string(i) + "] must be >= 0, got " +
                                  std::to_string(numels[i]));
    }
    if (!is_valid_dtype(dtypes[i])) {
      throw std::invalid_argument("dtypes[" + std::to_string(i) + "]: unknown dtype code " +
                                  std::to_string(dtypes[i]));
    }
    layout.numels.push_back(numels[i]);
    layout.offsets.push_back(offset);
    layout.dtypes.push_back(static_cast<DType>(dtypes[i]));
    offset = align_up(offset + numels[i], kSegmentAlign);
  }
  layout.count_offset = offset;
  layout.flag_offset = offset + count_slots;
  layout.buffer_numel = align_up(layout.flag_offset + 1, kSegmentAlign);
  return layout;
}

}  // namespace distlearn
