// The element operations of the fused ops, written once. The CPU launchers
// (csrc/ops_cpu.cpp) and the CUDA kernels call these same functions, so both
// flavors compute bit-identical results for the same inputs.
//
// T is a tensor's storage type, B the flat buffer's, Acc the accumulation
// type (AccumulateType<T, B>): every value is widened to Acc, combined, and
// rounded once on the way out.
#pragma once

#include <cstdint>

#include "scalar_types.h"

namespace distlearn {

// pack: buffer element = tensor element (a cast when B differs from T).
template <typename T, typename B>
DL_INLINE void pack_element(const T& src, B& buf) {
  using Acc = typename AccumulateType<T, B>::type;
  buf = from_acc<B>(to_acc<Acc>(src));
}

// unpack-and-scale: tensor element = buffer element * scale. scale is
// 1 / contributor count for a normalized gradient and exactly 1 otherwise
// (x * 1 == x for every x, NaN and -0 included, so unscaled unpacking is a
// plain copy).
template <typename T, typename B, typename Acc>
DL_INLINE void unpack_scale_element(const B& buf, Acc scale, T& dst) {
  dst = from_acc<T>(to_acc<Acc>(buf) * scale);
}

// EA blend (arXiv 1412.6651): delta = alpha * (x - center), x -= delta.
// The delta is rounded to the buffer type before x is moved by it, so x
// moves by exactly the amount the center receives: sum(x) + center is
// conserved up to the rounding of the two additions.
template <typename T, typename B, typename Acc>
DL_INLINE void ea_blend_element(T& x, const T& center, Acc alpha, B& delta) {
  const Acc x_acc = to_acc<Acc>(x);
  const B delta_buf = from_acc<B>(alpha * (x_acc - to_acc<Acc>(center)));
  delta = delta_buf;
  x = from_acc<T>(x_acc - to_acc<Acc>(delta_buf));
}

// Center update: center += allreduced sum of the deltas.
template <typename T, typename B>
DL_INLINE void center_update_element(T& center, const B& delta_sum) {
  using Acc = typename AccumulateType<T, B>::type;
  center = from_acc<T>(to_acc<Acc>(center) + to_acc<Acc>(delta_sum));
}

// The previous round's center update folded into this round's blend: the
// cell holds the previous allreduced sum on entry and this round's delta on
// exit. The same two element operations in the same order as the separate
// passes (the center is rounded to T in between), so the result is bitwise
// theirs, with one pass over x, center and the buffer instead of two.
template <typename T, typename B, typename Acc>
DL_INLINE void ea_catch_up_blend_element(T& x, T& center, Acc alpha, B& sum_then_delta) {
  center_update_element(center, sum_then_delta);
  ea_blend_element(x, center, alpha, sum_then_delta);
}

// DiLoCo's outer gradient (Douillard et al., arXiv 2311.08105, Algorithm 1):
// global - local, rounded once to the buffer type.
template <typename T, typename B>
DL_INLINE void outer_gradient_element(const T& local, const T& global, B& grad) {
  using Acc = typename AccumulateType<T, B>::type;
  grad = from_acc<B>(to_acc<Acc>(global) - to_acc<Acc>(local));
}

// The outer optimizer's settings: PyTorch's SGD (dampening 0, no weight
// decay), the paper's and torchft's outer optimizer, and the merge of
// Streaming DiLoCo (arXiv 2501.18512): local = mix * local + (1 - mix) * global.
struct OuterSettings {
  double lr;
  double momentum;
  bool nesterov;
  double mix;
};

// One element of the outer step. g = sum * scale (scale: 1 / contributors,
// the mean outer gradient); as torch.optim.SGD: the momentum buffer
// m = momentum * m + g is stored (rounded to T) and read back, the step
// direction is g + momentum * m with Nesterov and m without (g when
// momentum is 0, m untouched); global -= lr * direction, rounded to T; then
// the merge from the rounded global (mix 0: local = global exactly, whatever
// local held, NaN included).
template <typename T, typename B, typename Acc>
DL_INLINE void outer_step_element(T& local, T& global, T& momentum, const B& sum, Acc scale,
                                  const OuterSettings& s) {
  const Acc g = to_acc<Acc>(sum) * scale;
  const Acc mu = static_cast<Acc>(s.momentum);
  Acc direction = g;
  if (s.momentum != 0.0) {
    const T m = from_acc<T>(mu * to_acc<Acc>(momentum) + g);
    momentum = m;
    direction = s.nesterov ? g + mu * to_acc<Acc>(m) : to_acc<Acc>(m);
  }
  const T updated = from_acc<T>(to_acc<Acc>(global) - static_cast<Acc>(s.lr) * direction);
  global = updated;
  if (s.mix == 0.0) {
    local = updated;
  } else {
    const Acc mix = static_cast<Acc>(s.mix);
    local = from_acc<T>(mix * to_acc<Acc>(local) + (Acc(1) - mix) * to_acc<Acc>(updated));
  }
}

// Non-finite probe: v - v is exactly 0 for every finite v and NaN for an
// infinity or a NaN, so `probe != 0` flags exactly the non-finite values
// (NaN compares unequal to everything) with one subtract and one compare.
template <typename Acc>
DL_INLINE Acc nonfinite_probe(Acc v) {
  return v - v;
}

// Number of ranks that contributed to an allreduce: the sum of the count
// slots after the reduction. Each slot holds small integers only (see
// Layout::count_slots), so the sum is exact in every buffer type.
template <typename B>
DL_INLINE double contributor_count(const B* count_slots, int64_t num_slots) {
  double count = 0.0;
  for (int64_t i = 0; i < num_slots; ++i) count += to_acc<double>(count_slots[i]);
  return count;
}

// Whether every contributor of a step wrote the code whose count slots are
// [first, first + count) (see distlearn_cuda/_tensors/agreement.py, "Call codes"):
// the slots of that code hold the whole contributor count. Each slot holds
// a small integer, so both sums are exact (see contributor_count).
template <typename B>
DL_INLINE bool codes_agree(const B* count_slots, int64_t num_slots, int64_t first, int64_t count) {
  double mine = 0.0;
  for (int64_t i = first; i < first + count; ++i) mine += to_acc<double>(count_slots[i]);
  return mine == contributor_count(count_slots, num_slots);
}

// Scale that normalizes a summed gradient. A count of zero happens only when
// no rank contributed, the buffer then holds zeros, and 1 keeps them zero.
DL_INLINE double normalization_scale(double count) { return count > 0.0 ? 1.0 / count : 1.0; }

}  // namespace distlearn
