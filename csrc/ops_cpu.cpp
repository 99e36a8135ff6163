// CPU launchers of the fused ops: validate the addresses, then map the
// element operations of kernels/element_ops.h over every tensor with the
// CPU multi-tensor engine. No math lives here.
#include <atomic>
#include <stdexcept>
#include <string>

#include "../kernels/element_ops.h"
#include "../kernels/multi_tensor_cpu.h"
#include "op_checks.h"
#include "ops.h"

namespace distlearn {
namespace {

void check_threads(int num_threads) {
  if (num_threads < 1) {
    throw std::invalid_argument("num_threads must be >= 1, got " + std::to_string(num_threads));
  }
}

// Count slots: all zero, then 1 in count_slot (when count_slot >= 0).
void write_count_slots(const Layout& layout, uintptr_t buffer, int64_t count_slot) {
  dispatch_dtype(layout.buffer_dtype, [&](auto buffer_tag) {
    using B = typename decltype(buffer_tag)::type;
    B* slots = reinterpret_cast<B*>(buffer) + layout.count_offset;
    for (int64_t i = 0; i < layout.count_slots; ++i) {
      slots[i] = from_acc<B>(i == count_slot ? 1.0f : 0.0f);
    }
  });
}

void write_flag(const Layout& layout, uintptr_t buffer, bool raised) {
  dispatch_dtype(layout.buffer_dtype, [&](auto buffer_tag) {
    using B = typename decltype(buffer_tag)::type;
    reinterpret_cast<B*>(buffer)[layout.flag_offset] = from_acc<B>(raised ? 1.0f : 0.0f);
  });
}

// Whether the (allreduced) flag says some rank packed a non-finite value.
bool flag_raised(const Layout& layout, uintptr_t buffer) {
  bool raised = false;
  dispatch_dtype(layout.buffer_dtype, [&](auto buffer_tag) {
    using B = typename decltype(buffer_tag)::type;
    raised = to_acc<double>(reinterpret_cast<const B*>(buffer)[layout.flag_offset]) != 0.0;
  });
  return raised;
}

template <typename T>
T* tensor_at(const Addresses& addresses, int64_t i) {
  return reinterpret_cast<T*>(addresses[i]);
}

template <typename B>
B* segment_at(const Layout& layout, uintptr_t buffer, int64_t i) {
  return reinterpret_cast<B*>(buffer) + layout.offsets[i];
}

}  // namespace

void pack_cpu(const Layout& layout, const Addresses& tensors, uintptr_t buffer, int64_t count_slot,
              int num_threads) {
  check_addresses(layout, tensors, "tensors");
  check_buffer(buffer);
  check_threads(num_threads);
  check_count_slot(layout, count_slot);
  std::atomic<bool> nonfinite{false};
  parallel_for_typed_ranges(
      layout, num_threads,
      [&](auto tensor_tag, auto buffer_tag, int64_t t, int64_t begin, int64_t end) {
        using T = typename decltype(tensor_tag)::type;
        using B = typename decltype(buffer_tag)::type;
        using Acc = typename AccumulateType<T, B>::type;
        const T* __restrict__ src = tensor_at<T>(tensors, t);
        B* __restrict__ dst = segment_at<B>(layout, buffer, t);
        // The probe tests the packed value in a register, OR-ed into an int:
        // an integer reduction vectorizes, a float sum (not associative)
        // does not, and reading dst back was measured 2x slower (GCC 12).
        int found = 0;
        for (int64_t i = begin; i < end; ++i) {
          B packed;
          pack_element(src[i], packed);
          dst[i] = packed;
          found |= nonfinite_probe(to_acc<Acc>(packed)) != Acc(0);  // NaN != 0
        }
        if (found != 0) nonfinite.store(true, std::memory_order_relaxed);
      });
  write_count_slots(layout, buffer, count_slot);
  write_flag(layout, buffer, nonfinite.load());
}

// Whether an agreement's code slots hold every contributor (none: true).
bool agreed(const Layout& layout, const Agreement& agreement) {
  if (agreement.slots == nullptr) return true;
  bool result = true;
  dispatch_dtype(layout.buffer_dtype, [&](auto buffer_tag) {
    using B = typename decltype(buffer_tag)::type;
    result = codes_agree(static_cast<const B*>(agreement.slots), layout.count_slots,
                         agreement.first, agreement.count);
  });
  return result;
}

void unpack_cpu(const Layout& layout, const Addresses& tensors, uintptr_t buffer, bool normalize,
                int num_threads, bool skip_nonfinite, const Agreement& agreement) {
  check_addresses(layout, tensors, "tensors");
  check_buffer(buffer);
  check_threads(num_threads);
  check_agreement(layout, agreement);
  if ((skip_nonfinite && flag_raised(layout, buffer)) || !agreed(layout, agreement)) {
    parallel_for_typed_ranges(layout, num_threads,
                              [&](auto tensor_tag, auto, int64_t t, int64_t begin, int64_t end) {
                                using T = typename decltype(tensor_tag)::type;
                                T* __restrict__ dst = tensor_at<T>(tensors, t);
                                for (int64_t i = begin; i < end; ++i) dst[i] = from_acc<T>(0.0f);
                              });
    return;
  }
  double scale = 1.0;
  if (normalize) {
    dispatch_dtype(layout.buffer_dtype, [&](auto buffer_tag) {
      using B = typename decltype(buffer_tag)::type;
      const B* slots = reinterpret_cast<const B*>(buffer) + layout.count_offset;
      scale = normalization_scale(contributor_count(slots, layout.count_slots));
    });
  }
  parallel_for_typed_ranges(
      layout, num_threads,
      [&](auto tensor_tag, auto buffer_tag, int64_t t, int64_t begin, int64_t end) {
        using T = typename decltype(tensor_tag)::type;
        using B = typename decltype(buffer_tag)::type;
        using Acc = typename AccumulateType<T, B>::type;
        const Acc scale_acc = static_cast<Acc>(scale);
        const B* __restrict__ src = segment_at<B>(layout, buffer, t);
        T* __restrict__ dst = tensor_at<T>(tensors, t);
        for (int64_t i = begin; i < end; ++i) unpack_scale_element(src[i], scale_acc, dst[i]);
      });
}

void ea_blend_cpu(const Layout& layout, const Addresses& params, const Addresses& centers,
                  uintptr_t buffer, double alpha, int64_t count_slot, int num_threads,
                  bool catch_up) {
  check_addresses(layout, params, "params");
  check_addresses(layout, centers, "centers");
  check_buffer(buffer);
  check_threads(num_threads);
  check_count_slot(layout, count_slot);
  std::atomic<bool> nonfinite{false};
  parallel_for_typed_ranges(
      layout, num_threads,
      [&](auto tensor_tag, auto buffer_tag, int64_t t, int64_t begin, int64_t end) {
        using T = typename decltype(tensor_tag)::type;
        using B = typename decltype(buffer_tag)::type;
        using Acc = typename AccumulateType<T, B>::type;
        const Acc alpha_acc = static_cast<Acc>(alpha);
        T* __restrict__ x = tensor_at<T>(params, t);
        T* __restrict__ center = tensor_at<T>(centers, t);
        B* __restrict__ delta = segment_at<B>(layout, buffer, t);
        int found = 0;  // the probe as in pack_cpu
        if (catch_up) {
          for (int64_t i = begin; i < end; ++i) {
            B d = delta[i];
            ea_catch_up_blend_element(x[i], center[i], alpha_acc, d);
            delta[i] = d;
            found |= nonfinite_probe(to_acc<Acc>(d)) != Acc(0);  // NaN != 0
          }
        } else {
          for (int64_t i = begin; i < end; ++i) {
            B d;
            ea_blend_element(x[i], center[i], alpha_acc, d);
            delta[i] = d;
            found |= nonfinite_probe(to_acc<Acc>(d)) != Acc(0);  // NaN != 0
          }
        }
        if (found != 0) nonfinite.store(true, std::memory_order_relaxed);
      });
  write_count_slots(layout, buffer, count_slot);
  write_flag(layout, buffer, nonfinite.load());
}

void center_update_cpu(const Layout& layout, const Addresses& centers, uintptr_t buffer,
                       int num_threads, bool skip_nonfinite) {
  check_addresses(layout, centers, "centers");
  check_buffer(buffer);
  check_threads(num_threads);
  if (skip_nonfinite && flag_raised(layout, buffer)) return;
  parallel_for_typed_ranges(
      layout, num_threads,
      [&](auto tensor_tag, auto buffer_tag, int64_t t, int64_t begin, int64_t end) {
        using T = typename decltype(tensor_tag)::type;
        using B = typename decltype(buffer_tag)::type;
        T* __restrict__ center = tensor_at<T>(centers, t);
        const B* __restrict__ delta_sum = segment_at<B>(layout, buffer, t);
        for (int64_t i = begin; i < end; ++i) center_update_element(center[i], delta_sum[i]);
      });
}

void outer_gradient_cpu(const Layout& layout, const Addresses& locals, const Addresses& globals,
                        uintptr_t buffer, int64_t count_slot, int num_threads) {
  check_addresses(layout, locals, "locals");
  check_addresses(layout, globals, "globals");
  check_buffer(buffer);
  check_threads(num_threads);
  check_count_slot(layout, count_slot);
  std::atomic<bool> nonfinite{false};
  parallel_for_typed_ranges(
      layout, num_threads,
      [&](auto tensor_tag, auto buffer_tag, int64_t t, int64_t begin, int64_t end) {
        using T = typename decltype(tensor_tag)::type;
        using B = typename decltype(buffer_tag)::type;
        using Acc = typename AccumulateType<T, B>::type;
        const T* __restrict__ local = tensor_at<T>(locals, t);
        const T* __restrict__ global = tensor_at<T>(globals, t);
        B* __restrict__ grad = segment_at<B>(layout, buffer, t);
        int found = 0;  // the probe as in pack_cpu
        for (int64_t i = begin; i < end; ++i) {
          B g;
          outer_gradient_element(local[i], global[i], g);
          grad[i] = g;
          found |= nonfinite_probe(to_acc<Acc>(g)) != Acc(0);  // NaN != 0
        }
        if (found != 0) nonfinite.store(true, std::memory_order_relaxed);
      });
  write_count_slots(layout, buffer, count_slot);
  write_flag(layout, buffer, nonfinite.load());
}

void outer_step_cpu(const Layout& layout, const Addresses& locals, const Addresses& globals,
                    const Addresses& momenta, uintptr_t buffer, const OuterSettings& settings,
                    int num_threads, bool skip_nonfinite) {
  check_addresses(layout, locals, "locals");
  check_addresses(layout, globals, "globals");
  check_addresses(layout, momenta, "momenta");
  check_buffer(buffer);
  check_threads(num_threads);
  check_outer_settings(settings);
  double count = 0.0;
  dispatch_dtype(layout.buffer_dtype, [&](auto buffer_tag) {
    using B = typename decltype(buffer_tag)::type;
    count = contributor_count(reinterpret_cast<const B*>(buffer) + layout.count_offset,
                              layout.count_slots);
  });
  // No contributor: nothing moved since the fragment's last step. As
  // OuterStepOp: with mix 0 the locals take the globals (which they equal),
  // otherwise they keep their values.
  if (count == 0.0 && settings.mix != 0.0) return;
  const bool reset = count == 0.0 || (skip_nonfinite && flag_raised(layout, buffer));
  const double scale = normalization_scale(count);
  parallel_for_typed_ranges(
      layout, num_threads,
      [&](auto tensor_tag, auto buffer_tag, int64_t t, int64_t begin, int64_t end) {
        using T = typename decltype(tensor_tag)::type;
        using B = typename decltype(buffer_tag)::type;
        using Acc = typename AccumulateType<T, B>::type;
        T* __restrict__ local = tensor_at<T>(locals, t);
        T* __restrict__ global = tensor_at<T>(globals, t);
        T* __restrict__ momentum = tensor_at<T>(momenta, t);
        const B* __restrict__ sum = segment_at<B>(layout, buffer, t);
        if (reset) {
          for (int64_t i = begin; i < end; ++i) local[i] = global[i];
          return;
        }
        const Acc scale_acc = static_cast<Acc>(scale);
        // A local copy: the loop's stores cannot alias it, so its branches
        // are hoisted out of the loop and the loop vectorizes.
        const OuterSettings s = settings;
        if (s.mix == 0.0 && s.momentum != 0.0 && s.nesterov) {  // the paper's: one loop of its own
          const OuterSettings paper{s.lr, s.momentum, true, 0.0};
          for (int64_t i = begin; i < end; ++i) {
            outer_step_element(local[i], global[i], momentum[i], sum[i], scale_acc, paper);
          }
          return;
        }
        for (int64_t i = begin; i < end; ++i) {
          outer_step_element(local[i], global[i], momentum[i], sum[i], scale_acc, s);
        }
      });
}

}  // namespace distlearn
