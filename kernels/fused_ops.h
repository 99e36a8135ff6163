// The fused ops as Ops of the multi-tensor engine (multi_tensor_engine.h):
// which streams each touches, and the element operation of element_ops.h it
// applies. __host__ __device__, so the host harness runs them as the device
// does. An op's fields are launch parameters; prepare() sets per-thread
// state on the thread's own copy.
#pragma once

#include <cstdint>

#include "element_ops.h"
#include "scalar_types.h"

namespace distlearn {

// Whether the (allreduced) non-finite flag at `flag` is set.
template <typename B>
DL_INLINE bool flag_raised(const void* flag) {
  return to_acc<double>(*static_cast<const B*>(flag)) != 0.0;
}

struct PackOp {
  static constexpr bool kReadsPrimary = true, kWritesPrimary = false, kReadsSecondary = false,
                        kWritesSecondary = false, kReadsBuffer = false, kWritesBuffer = true;
  template <typename B>
  DL_HOST_DEVICE void prepare() {}
  template <typename T, typename B>
  DL_HOST_DEVICE void operator()(T& tensor, T&, B& buffer) const {
    pack_element(tensor, buffer);
  }
};

// The count slots of the step's agreement (see codes_agree): `slots`
// (nullptr: none, unpack as asked), and this rank's code's slots.
struct Agreement {
  const void* slots;
  int64_t first;
  int64_t count;
};

constexpr Agreement kNoAgreement{nullptr, 0, 0};

// Reads the contributor count (and, when skipping, the non-finite flag;
// with an agreement, its count slots) from the buffer on the device, once
// per thread: the host never waits for the allreduce to learn them.
struct UnpackOp {
  static constexpr bool kReadsPrimary = false, kWritesPrimary = true, kReadsSecondary = false,
                        kWritesSecondary = false, kReadsBuffer = true, kWritesBuffer = false;
  const void* count_slots;
  int64_t num_slots;
  const void* flag;
  bool normalize;
  bool skip_nonfinite;
  Agreement agreement;
  double scale = 1.0;  // set by prepare
  bool zeros = false;  // set by prepare: a rank packed a non-finite value, or the ranks disagree

  template <typename B>
  DL_HOST_DEVICE void prepare() {
    if (normalize) {
      scale = normalization_scale(contributor_count(static_cast<const B*>(count_slots), num_slots));
    }
    zeros = skip_nonfinite && flag_raised<B>(flag);
    if (agreement.slots != nullptr) {
      zeros = zeros || !codes_agree(static_cast<const B*>(agreement.slots), num_slots,
                                    agreement.first, agreement.count);
    }
  }
  template <typename T, typename B>
  DL_HOST_DEVICE void operator()(T& tensor, T&, B& buffer) const {
    using Acc = typename AccumulateType<T, B>::type;
    if (zeros) {
      tensor = from_acc<T>(Acc(0));
    } else {
      unpack_scale_element(buffer, static_cast<Acc>(scale), tensor);
    }
  }
};

struct EaBlendOp {
  static constexpr bool kReadsPrimary = true, kWritesPrimary = true, kReadsSecondary = true,
                        kWritesSecondary = false, kReadsBuffer = false, kWritesBuffer = true;
  double alpha;
  template <typename B>
  DL_HOST_DEVICE void prepare() {}
  template <typename T, typename B>
  DL_HOST_DEVICE void operator()(T& x, T& center, B& delta) const {
    using Acc = typename AccumulateType<T, B>::type;
    ea_blend_element(x, center, static_cast<Acc>(alpha), delta);
  }
};

// The blend with the previous round's center update folded in (asynchronous
// rounds): reads x, the center and the previous sum, writes all three.
struct EaCatchUpBlendOp {
  static constexpr bool kReadsPrimary = true, kWritesPrimary = true, kReadsSecondary = true,
                        kWritesSecondary = true, kReadsBuffer = true, kWritesBuffer = true;
  double alpha;
  template <typename B>
  DL_HOST_DEVICE void prepare() {}
  template <typename T, typename B>
  DL_HOST_DEVICE void operator()(T& x, T& center, B& sum_then_delta) const {
    using Acc = typename AccumulateType<T, B>::type;
    ea_catch_up_blend_element(x, center, static_cast<Acc>(alpha), sum_then_delta);
  }
};

struct CenterUpdateOp {
  static constexpr bool kReadsPrimary = true, kWritesPrimary = true, kReadsSecondary = false,
                        kWritesSecondary = false, kReadsBuffer = true, kWritesBuffer = false;
  const void* flag;
  bool skip_nonfinite;
  bool skip = false;  // set by prepare: leave every center as it is

  template <typename B>
  DL_HOST_DEVICE void prepare() {
    skip = skip_nonfinite && flag_raised<B>(flag);
  }
  template <typename T, typename B>
  DL_HOST_DEVICE void operator()(T& center, T&, B& delta_sum) const {
    if (!skip) center_update_element(center, delta_sum);
  }
};

// DiLoCo's outer gradient into the buffer: reads the local params (primary)
// and the global params (secondary), writes global - local; count slots
// and the non-finite flag as pack.
struct OuterGradientOp {
  static constexpr bool kReadsPrimary = true, kWritesPrimary = false, kReadsSecondary = true,
                        kWritesSecondary = false, kReadsBuffer = false, kWritesBuffer = true;
  template <typename B>
  DL_HOST_DEVICE void prepare() {}
  template <typename T, typename B>
  DL_HOST_DEVICE void operator()(T& local, T& global, B& grad) const {
    outer_gradient_element(local, global, grad);
  }
};

// DiLoCo's outer step from the allreduced outer gradients: reads the sum
// and the count slots (the mean over the contributors), the global params
// (secondary) and the momenta (tertiary), writes both and the local params
// (primary), which it reads only to merge (kReadsLocal: mix != 0). On the
// device, once per thread: no contributor (every rank was waiting) or, when
// skipping, a raised flag leave the global params and the momenta as they
// are; the local params then take the global ones (skip) or keep their own
// (no contributor: nothing moved since the fragment's last step).
template <bool kReadsLocal>
struct OuterStepOp {
  static constexpr bool kReadsPrimary = kReadsLocal, kWritesPrimary = true, kReadsSecondary = true,
                        kWritesSecondary = true, kReadsTertiary = true, kWritesTertiary = true,
                        kReadsBuffer = true, kWritesBuffer = false;
  const void* count_slots;
  int64_t num_slots;
  const void* flag;
  bool skip_nonfinite;
  OuterSettings settings;
  double scale = 1.0;  // set by prepare
  bool step = true;    // set by prepare: take the outer step
  bool reset = false;  // set by prepare: no step, local = global

  template <typename B>
  DL_HOST_DEVICE void prepare() {
    const double count = contributor_count(static_cast<const B*>(count_slots), num_slots);
    scale = normalization_scale(count);
    reset = skip_nonfinite && count > 0.0 && flag_raised<B>(flag);
    step = count > 0.0 && !reset;
  }
  template <typename T, typename B>
  DL_HOST_DEVICE void operator()(T& local, T& global, T& momentum, B& sum) const {
    using Acc = typename AccumulateType<T, B>::type;
    if (step) {
      outer_step_element(local, global, momentum, sum, static_cast<Acc>(scale), settings);
    } else if (reset || !kReadsLocal) {
      // With mix 0, local == global already when nobody contributed.
      local = global;
    }
  }
};

}  // namespace distlearn
