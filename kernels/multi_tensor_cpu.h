// The CPU multi-tensor engine: runs a range function over every tensor of a
// Layout, in parallel, in one call.
//
// The buffer's index space [0, data_numel) is cut into equal contiguous
// pieces, one per thread; each thread visits the (tensor, begin, end) ranges
// that overlap its piece, in buffer order. Every element is visited exactly
// once, by one thread, so ops need no synchronization.
#pragma once

#include <algorithm>
#include <cstdint>
#include <exception>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>
#include <vector>

#include "layout.h"

namespace distlearn {

// Below this many elements per thread, starting a thread (tens of
// microseconds) costs more than the copy it would take over.
constexpr int64_t kMinElementsPerThread = int64_t{1} << 18;

// Calls fn(tensor_index, begin, end) for the ranges of layout's tensors that
// fall in buffer positions [lo, hi).
template <typename Fn>
void visit_ranges(const Layout& layout, int64_t lo, int64_t hi, Fn& fn) {
  const auto first = std::upper_bound(layout.offsets.begin(), layout.offsets.end(), lo);
  int64_t t = std::max<int64_t>(0, (first - layout.offsets.begin()) - 1);
  for (; t < layout.num_tensors() && layout.offsets[t] < hi; ++t) {
    const int64_t begin = std::max<int64_t>(lo - layout.offsets[t], 0);
    const int64_t end = std::min<int64_t>(hi - layout.offsets[t], layout.numels[t]);
    if (begin < end) fn(t, begin, end);
  }
}

// Threads worth starting for `elements` elements: at most max_threads, at
// least 1, and none for fewer than min_per_thread elements each.
inline int threads_for(int64_t elements, int max_threads,
                       int64_t min_per_thread = kMinElementsPerThread) {
  const int64_t by_size = std::max<int64_t>(1, elements / min_per_thread);
  return static_cast<int>(std::min<int64_t>(std::max(max_threads, 1), by_size));
}

// Cuts [0, total) into num_threads equal contiguous pieces and calls
// fn(lo, hi) for each, on its own thread (the first on the calling thread).
// An exception thrown by fn on any thread is rethrown here after all joined.
template <typename Fn>
void parallel_for_pieces(int64_t total, int num_threads, Fn fn) {
  if (num_threads <= 1) {
    fn(int64_t{0}, total);
    return;
  }
  const int64_t piece = (total + num_threads - 1) / num_threads;
  std::vector<std::exception_ptr> errors(num_threads);
  auto work = [&](int i) {
    try {
      fn(std::min(total, i * piece), std::min(total, (i + 1) * piece));
    } catch (...) {
      errors[i] = std::current_exception();
    }
  };
  // Pieces whose thread could not be started (std::system_error, e.g. when
  // the process hits its thread limit) run on the calling thread instead:
  // an exception escaping here would destroy joinable threads, which
  // std::terminate()s the process.
  std::vector<std::thread> helpers;
  helpers.reserve(num_threads - 1);
  int started = 1;
  try {
    for (; started < num_threads; ++started) helpers.emplace_back(work, started);
  } catch (const std::system_error&) {
  }
  work(0);
  for (int i = started; i < num_threads; ++i) work(i);
  for (auto& helper : helpers) helper.join();
  for (auto& error : errors) {
    if (error) std::rethrow_exception(error);
  }
}

// Runs fn over all of layout's tensors with up to max_threads threads.
template <typename Fn>
void parallel_for_ranges(const Layout& layout, int max_threads, Fn fn) {
  const int64_t total = layout.data_numel();
  parallel_for_pieces(total, threads_for(total, max_threads),
                      [&](int64_t lo, int64_t hi) { visit_ranges(layout, lo, hi, fn); });
}

// Calls fn(TypeTag<T>{}) for the storage type T of dtype.
template <typename Fn>
void dispatch_dtype(DType dtype, Fn&& fn) {
  if (!visit_dtype(dtype, fn)) {
    throw std::invalid_argument("unknown dtype code " + std::to_string(static_cast<int>(dtype)));
  }
}

// Runs fn(TypeTag<T>{}, TypeTag<B>{}, tensor_index, begin, end) over all of
// layout's tensors, T being the tensor's storage type and B the buffer's.
template <typename Fn>
void parallel_for_typed_ranges(const Layout& layout, int max_threads, Fn fn) {
  parallel_for_ranges(layout, max_threads, [&](int64_t t, int64_t begin, int64_t end) {
    dispatch_dtype(layout.dtypes[t], [&](auto tensor_tag) {
      dispatch_dtype(layout.buffer_dtype,
                     [&](auto buffer_tag) { fn(tensor_tag, buffer_tag, t, begin, end); });
    });
  });
}

}  // namespace distlearn
