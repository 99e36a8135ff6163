// Argument checks shared by the CPU and CUDA launchers of the fused ops:
// an invalid argument throws std::invalid_argument (ValueError in Python)
// before anything runs.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kernels/fused_ops.h"
#include "../kernels/layout.h"

namespace distlearn {

// One address per tensor of the layout, none null unless its tensor is empty.
inline void check_addresses(const Layout& layout, const std::vector<uintptr_t>& addresses,
                            const char* name) {
  if (static_cast<int64_t>(addresses.size()) != layout.num_tensors()) {
    throw std::invalid_argument(std::string(name) + ": expected " +
                                std::to_string(layout.num_tensors()) + " tensors, got " +
                                std::to_string(addresses.size()));
  }
  for (int64_t i = 0; i < layout.num_tensors(); ++i) {
    if (addresses[i] == 0 && layout.numels[i] > 0) {
      throw std::invalid_argument(std::string(name) + "[" + std::to_string(i) +
                                  "] is a null address");
    }
  }
}

inline void check_buffer(uintptr_t buffer) {
  if (buffer == 0) throw std::invalid_argument("buffer is a null address");
}

// An agreement's code slots lie within the layout's count slots (its slots
// pointer is a buffer of the same layout: checked by the caller).
inline void check_agreement(const Layout& layout, const Agreement& agreement) {
  if (agreement.slots == nullptr) return;
  if (agreement.first < 0 || agreement.count < 1 ||
      agreement.first + agreement.count > layout.count_slots) {
    throw std::invalid_argument("agreement: code slots [" + std::to_string(agreement.first) + ", " +
                                std::to_string(agreement.first + agreement.count) +
                                ") are out of range: the layout has " +
                                std::to_string(layout.count_slots) + " count slots");
  }
}

inline void check_count_slot(const Layout& layout, int64_t count_slot) {
  if (count_slot >= layout.count_slots) {
    throw std::invalid_argument("count_slot " + std::to_string(count_slot) +
                                " is out of range: the layout has " +
                                std::to_string(layout.count_slots) + " count slots");
  }
}

// The outer optimizer's settings: finite, lr >= 0, momentum and mix in [0, 1).
inline void check_outer_settings(const OuterSettings& s) {
  const auto finite = [](double v) { return v - v == 0.0; };
  if (!finite(s.lr) || s.lr < 0.0) {
    throw std::invalid_argument("lr must be finite and >= 0, got " + std::to_string(s.lr));
  }
  if (!finite(s.momentum) || s.momentum < 0.0 || s.momentum >= 1.0) {
    throw std::invalid_argument("momentum must be in [0, 1), got " + std::to_string(s.momentum));
  }
  if (!finite(s.mix) || s.mix < 0.0 || s.mix >= 1.0) {
    throw std::invalid_argument("mix must be in [0, 1), got " + std::to_string(s.mix));
  }
}

}  // namespace distlearn
