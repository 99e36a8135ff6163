// The fused ops on the multi-tensor engine, for any launcher: validate the
// arguments, fill the op's parameters, run it. csrc/ops_cuda.cu calls these
// with the CUDA launcher; the host harness (tests/host_kernels/) with one
// that runs every (block, thread) of each launch's grid on the CPU, so the
// harness tests this code as it runs on the device. No math lives here.
#pragma once

#include <cstdint>
#include <vector>

#include "../kernels/fused_ops.h"
#include "../kernels/layout.h"
#include "../kernels/multi_tensor_engine.h"
#include "op_checks.h"

namespace distlearn {

// The count slots and the non-finite flag that pack and the EA blend write.
inline CountSlotWrite count_slot_write(const Layout& layout, uintptr_t buffer, int64_t count_slot) {
  const int64_t element = dtype_size(layout.buffer_dtype);
  char* base = reinterpret_cast<char*>(buffer);
  void* slots = layout.count_slots > 0 ? base + layout.count_offset * element : nullptr;
  return CountSlotWrite{slots, layout.count_slots, count_slot, base + layout.flag_offset * element};
}

constexpr CountSlotWrite kNoCountSlots{nullptr, 0, -1, nullptr};

inline const void* buffer_element(const Layout& layout, uintptr_t buffer, int64_t index) {
  return reinterpret_cast<const char*>(buffer) + index * dtype_size(layout.buffer_dtype);
}

template <typename Launcher>
void pack_multi_tensor(Launcher& launcher, const Layout& layout,
                       const std::vector<uintptr_t>& tensors, uintptr_t buffer,
                       int64_t count_slot) {
  check_addresses(layout, tensors, "tensors");
  check_buffer(buffer);
  check_count_slot(layout, count_slot);
  run_multi_tensor(launcher, layout, {&tensors}, buffer,
                   count_slot_write(layout, buffer, count_slot), PackOp{});
}

template <typename Launcher>
void unpack_multi_tensor(Launcher& launcher, const Layout& layout,
                         const std::vector<uintptr_t>& tensors, uintptr_t buffer, bool normalize,
                         bool skip_nonfinite, const Agreement& agreement = kNoAgreement) {
  check_addresses(layout, tensors, "tensors");
  check_buffer(buffer);
  check_agreement(layout, agreement);
  const UnpackOp op{buffer_element(layout, buffer, layout.count_offset),
                    layout.count_slots,
                    buffer_element(layout, buffer, layout.flag_offset),
                    normalize,
                    skip_nonfinite,
                    agreement};
  run_multi_tensor(launcher, layout, {&tensors}, buffer, kNoCountSlots, op);
}

template <typename Launcher>
void ea_blend_multi_tensor(Launcher& launcher, const Layout& layout,
                           const std::vector<uintptr_t>& params,
                           const std::vector<uintptr_t>& centers, uintptr_t buffer, double alpha,
                           int64_t count_slot, bool catch_up) {
  check_addresses(layout, params, "params");
  check_addresses(layout, centers, "centers");
  check_buffer(buffer);
  check_count_slot(layout, count_slot);
  const CountSlotWrite count = count_slot_write(layout, buffer, count_slot);
  if (catch_up) {
    run_multi_tensor(launcher, layout, {&params, &centers}, buffer, count, EaCatchUpBlendOp{alpha});
  } else {
    run_multi_tensor(launcher, layout, {&params, &centers}, buffer, count, EaBlendOp{alpha});
  }
}

template <typename Launcher>
void center_update_multi_tensor(Launcher& launcher, const Layout& layout,
                                const std::vector<uintptr_t>& centers, uintptr_t buffer,
                                bool skip_nonfinite) {
  check_addresses(layout, centers, "centers");
  check_buffer(buffer);
  const CenterUpdateOp op{buffer_element(layout, buffer, layout.flag_offset), skip_nonfinite};
  run_multi_tensor(launcher, layout, {&centers}, buffer, kNoCountSlots, op);
}

template <typename Launcher>
void outer_gradient_multi_tensor(Launcher& launcher, const Layout& layout,
                                 const std::vector<uintptr_t>& locals,
                                 const std::vector<uintptr_t>& globals, uintptr_t buffer,
                                 int64_t count_slot) {
  check_addresses(layout, locals, "locals");
  check_addresses(layout, globals, "globals");
  check_buffer(buffer);
  check_count_slot(layout, count_slot);
  run_multi_tensor(launcher, layout, {&locals, &globals}, buffer,
                   count_slot_write(layout, buffer, count_slot), OuterGradientOp{});
}

template <typename Launcher>
void outer_step_multi_tensor(Launcher& launcher, const Layout& layout,
                             const std::vector<uintptr_t>& locals,
                             const std::vector<uintptr_t>& globals,
                             const std::vector<uintptr_t>& momenta, uintptr_t buffer,
                             const OuterSettings& settings, bool skip_nonfinite) {
  check_addresses(layout, locals, "locals");
  check_addresses(layout, globals, "globals");
  check_addresses(layout, momenta, "momenta");
  check_buffer(buffer);
  check_outer_settings(settings);
  const void* slots = buffer_element(layout, buffer, layout.count_offset);
  const void* flag = buffer_element(layout, buffer, layout.flag_offset);
  if (settings.mix == 0.0) {
    const OuterStepOp<false> op{slots, layout.count_slots, flag, skip_nonfinite, settings};
    run_multi_tensor(launcher, layout, {&locals, &globals, &momenta}, buffer, kNoCountSlots, op);
  } else {
    const OuterStepOp<true> op{slots, layout.count_slots, flag, skip_nonfinite, settings};
    run_multi_tensor(launcher, layout, {&locals, &globals, &momenta}, buffer, kNoCountSlots, op);
  }
}

}  // namespace distlearn
