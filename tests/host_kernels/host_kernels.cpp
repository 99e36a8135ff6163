// Runs the CUDA flavor's kernels on the CPU: the real launch planning
// (csrc/multi_tensor_ops.h, kernels/multi_tensor_engine.h) and the real
// kernel body, for every (block, thread) of every planned launch's grid,
// one at a time, in a random order (the launcher: host_launcher.h, whose
// instantiations of the ops are compiled apart, in launch_*.cpp). Built by
// tests/test_host_kernels.py with the host compiler under AddressSanitizer
// and UndefinedBehaviorSanitizer.
//
// Each op's results are compared with an independent reference (plain loops
// in double, rounding only where the op stores) within a dtype tolerance,
// and bit for bit with the CPU flavor (csrc/ops_cpu.cpp, linked in). Every
// output starts poisoned (all bits set: a NaN in every dtype), so an element
// the kernels skip shows; each op also counts its element-operation calls,
// which must equal the number of elements: together, every element is
// visited exactly once. Each tensor is a heap block of exactly its size, so
// a read or write past its end trips AddressSanitizer.
//
// What the sequential model covers: the kernels use no shared memory, no
// barrier and no atomics, and no thread reads what another writes in the
// same launch (the non-finite flag is only ever set to the same value), so
// running the threads one after another, in any order, computes what the
// device computes. It cannot see what is device-only: the vector
// instructions themselves (here memcpy), the kernel-parameter copy, and
// floating-point contraction (the device build disables FMA contraction;
// this build uses -ffp-contract=off).
//
// Usage: host_kernels SEED [SHARD SHARDS]
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <set>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <unordered_map>
#include <utility>
#include <vector>

#include "../../csrc/multi_tensor_ops.h"
#include "../../csrc/ops.h"
#include "../host_common/check.h"
#include "host_launcher.h"

namespace dl = distlearn;
using dl::DType;
using host_kernels::HostLauncher;
using host_kernels::LaunchRecord;

namespace {

// ---------------------------------------------------------------------------
// Dtypes, decoded and rounded independently of scalar_types.h

const DType kDtypes[] = {DType::kFloat32, DType::kFloat64, DType::kFloat16, DType::kBFloat16};

const char* dtype_name(DType d) {
  switch (d) {
    case DType::kFloat32:
      return "f32";
    case DType::kFloat64:
      return "f64";
    case DType::kFloat16:
      return "f16";
    case DType::kBFloat16:
      return "bf16";
  }
  return "?";
}

size_t dtype_bytes(DType d) { return static_cast<size_t>(dl::dtype_size(d)); }

// The value of the element at p, as a double.
double decode(DType d, const unsigned char* p) {
  switch (d) {
    case DType::kFloat32: {
      float f;
      std::memcpy(&f, p, 4);
      return f;
    }
    case DType::kFloat64: {
      double v;
      std::memcpy(&v, p, 8);
      return v;
    }
    case DType::kFloat16: {
      uint16_t h;
      std::memcpy(&h, p, 2);
      const double sign = (h & 0x8000u) ? -1.0 : 1.0;
      const int exponent = (h >> 10) & 0x1f;
      const int mantissa = h & 0x3ff;
      if (exponent == 0x1f) return mantissa ? std::nan("") : sign * INFINITY;
      if (exponent == 0) return sign * std::ldexp(mantissa, -24);
      return sign * std::ldexp(1024 + mantissa, exponent - 25);
    }
    case DType::kBFloat16: {
      uint16_t b;
      std::memcpy(&b, p, 2);
      const uint32_t bits = static_cast<uint32_t>(b) << 16;
      float f;
      std::memcpy(&f, &bits, 4);
      return f;
    }
  }
  return std::nan("");
}

// v rounded to the nearest value of dtype d (ties to even), infinity past
// its range: frexp/ldexp arithmetic, not the library's bit manipulation.
double round_to(DType d, double v) {
  if (d == DType::kFloat64 || !std::isfinite(v) || v == 0.0) return v;
  int precision = 24, min_exponent = -126, max_exponent = 127;
  if (d == DType::kFloat16) precision = 11, min_exponent = -14, max_exponent = 15;
  if (d == DType::kBFloat16) precision = 8;
  int e = 0;
  std::frexp(v, &e);  // |v| in [2^(e-1), 2^e)
  const int lead = std::max(e - 1, min_exponent);
  const double q =
      std::ldexp(std::nearbyint(std::ldexp(v, precision - 1 - lead)), lead - (precision - 1));
  const double largest = std::ldexp(2.0 - std::ldexp(1.0, 1 - precision), max_exponent);
  return std::fabs(q) > largest ? std::copysign(INFINITY, v) : q;
}

// Stores v (already a value of d) at p, through the library's conversion:
// inputs only, never the reference.
void encode(DType d, double v, unsigned char* p) {
  dl::visit_dtype(d, [&](auto tag) {
    using S = typename decltype(tag)::type;
    const S s = dl::from_acc<S>(v);
    std::memcpy(p, &s, sizeof(S));
  });
}

// Tolerance (relative and absolute) for values of order 1 that went through
// these dtypes: about one rounding of the narrowest (tests/tensor_cases.py).
double tolerance(DType a, DType b) {
  auto one = [](DType d) {
    switch (d) {
      case DType::kFloat64:
        return 1e-12;
      case DType::kFloat32:
        return 2e-6;
      case DType::kFloat16:
        return 2e-3;
      case DType::kBFloat16:
        return 1.6e-2;
    }
    return 0.0;
  };
  return std::max(one(a), one(b));
}

bool close(double got, double want, double tol) {
  if (std::isnan(want)) return std::isnan(got);
  if (std::isinf(want)) return got == want;
  return std::fabs(got - want) <= tol + tol * std::fabs(want);
}

// ---------------------------------------------------------------------------
// Memory: each tensor its own heap block ending exactly at its last byte.

constexpr unsigned char kPoison = 0xff;    // all bits set: a NaN in every dtype
constexpr unsigned char kSentinel = 0xa5;  // bytes before a misaligned view

class HostTensor {
 public:
  HostTensor(DType dtype, int64_t numel, bool misaligned)
      : dtype_(dtype), numel_(numel), shift_(misaligned ? dtype_bytes(dtype) : 0) {
    if (numel == 0) return;
    void* block = nullptr;
    // 16-byte aligned start (malloc under ASan promises only 8); the view
    // starts shift_ bytes in, so a misaligned one is not 16-byte aligned.
    CHECK(posix_memalign(&block, 16, shift_ + bytes()) == 0, "out of memory");
    block_ = static_cast<unsigned char*>(block);
    std::memset(block_, kSentinel, shift_);
  }
  ~HostTensor() { std::free(block_); }
  HostTensor(const HostTensor&) = delete;
  HostTensor& operator=(const HostTensor&) = delete;

  DType dtype() const { return dtype_; }
  int64_t numel() const { return numel_; }
  size_t bytes() const { return static_cast<size_t>(numel_) * dtype_bytes(dtype_); }
  // Empty tensors pass a null address, which the engine must never touch.
  unsigned char* data() const { return block_ == nullptr ? nullptr : block_ + shift_; }
  uintptr_t address() const { return reinterpret_cast<uintptr_t>(data()); }
  double get(int64_t i) const { return decode(dtype_, data() + i * dtype_bytes(dtype_)); }
  void set(int64_t i, double v) { encode(dtype_, v, data() + i * dtype_bytes(dtype_)); }
  void poison() {
    if (numel_ > 0) std::memset(data(), kPoison, bytes());
  }
  void copy_from(const HostTensor& other) {
    if (numel_ > 0) std::memcpy(data(), other.data(), bytes());
  }
  bool same_bits(const HostTensor& other) const {
    return numel_ == 0 || std::memcmp(data(), other.data(), bytes()) == 0;
  }
  bool sentinel_intact() const {
    if (block_ == nullptr) return true;
    for (size_t b = 0; b < shift_; ++b) {
      if (block_[b] != kSentinel) return false;
    }
    return true;
  }

 private:
  DType dtype_;
  int64_t numel_;
  size_t shift_;
  unsigned char* block_ = nullptr;
};

using Tensors = std::vector<std::unique_ptr<HostTensor>>;

// ---------------------------------------------------------------------------
// Cases

struct Case {
  std::string name;
  std::vector<int64_t> numels;
  std::vector<DType> dtypes;
  std::vector<bool> misaligned;
  DType buffer_dtype;
  int64_t max_blocks = dl::kMaxBlocks;
  int bad_tensor = -1;  // a tensor that gets one non-finite value, or -1
  double bad_value = 0.0;
  int64_t count_slot = 1;
  // The EA centers misaligned exactly where the params are aligned: every
  // blend then has one misaligned stream per tensor (the scalar path).
  bool centers_complement = false;
};

struct Totals {
  int cases = 0;
  int64_t launches = 0;
  int64_t thread_runs = 0;
};

class Runner {
 public:
  Runner(const Case& c, std::mt19937_64& rng, Totals& totals)
      : c_(c),
        rng_(rng),
        totals_(totals),
        layout_(
            dl::make_layout(c.numels, codes(c.dtypes), static_cast<int32_t>(c.buffer_dtype), 2)),
        b_(c.buffer_dtype) {}

  void run_all() {
    pack();
    unpack();
    unpack_skipped();
    unpack_with_agreement(true);
    unpack_with_agreement(false);
    ea_blend(false);
    ea_blend(true);
    center_update(false);
    center_update(true);
    outer_gradient();
    // DiLoCo's outer step: Nesterov, plain momentum and none; the merge and
    // the reset; a skipped step and a step nobody contributed to.
    outer_step({"outer_step (nesterov, reset)", {0.7, 0.9, true, 0.0}, OuterInput::kStep});
    outer_step({"outer_step (momentum, mix)", {0.5, 0.8, false, 0.4}, OuterInput::kStep});
    outer_step({"outer_step (no momentum, mix)", {1.0, 0.0, true, 0.25}, OuterInput::kStep});
    outer_step({"outer_step (flag raised, skip)", {0.7, 0.9, true, 0.4}, OuterInput::kSkipped});
    outer_step({"outer_step (no contributor, mix)", {0.7, 0.9, true, 0.4}, OuterInput::kNobody});
    outer_step({"outer_step (no contributor, reset)", {0.7, 0.9, true, 0.0}, OuterInput::kNobody});
    ++totals_.cases;
  }

 private:
  static std::vector<int32_t> codes(const std::vector<DType>& dtypes) {
    std::vector<int32_t> out;
    for (DType d : dtypes) out.push_back(static_cast<int32_t>(d));
    return out;
  }

  std::string where(const std::string& op) const {
    return c_.name + " [buffer " + dtype_name(b_) + "] " + op;
  }

  int64_t n() const { return layout_.num_tensors(); }

  // centers: the EA centers, misaligned where the params are not when the
  // case says so.
  Tensors make_tensors(bool centers = false) const {
    Tensors out;
    for (int64_t i = 0; i < n(); ++i) {
      const bool misaligned = c_.misaligned[i] != (centers && c_.centers_complement);
      out.push_back(std::make_unique<HostTensor>(c_.dtypes[i], c_.numels[i], misaligned));
    }
    return out;
  }

  Tensors random_tensors(bool with_bad, bool centers = false) {
    Tensors out = make_tensors(centers);
    std::normal_distribution<double> normal;
    for (int64_t i = 0; i < n(); ++i) {
      for (int64_t e = 0; e < out[i]->numel(); ++e) out[i]->set(e, normal(rng_));
    }
    if (with_bad && c_.bad_tensor >= 0) {
      HostTensor& t = *out[c_.bad_tensor];
      t.set(t.numel() / 2, c_.bad_value);
    }
    return out;
  }

  static Tensors clone(const Tensors& from) {
    Tensors out;
    for (const auto& t : from) {
      out.push_back(std::make_unique<HostTensor>(t->dtype(), t->numel(), false));
      out.back()->copy_from(*t);
    }
    return out;
  }

  static std::vector<uintptr_t> addresses(const Tensors& tensors) {
    std::vector<uintptr_t> out;
    for (const auto& t : tensors) out.push_back(t->address());
    return out;
  }

  int64_t total_elements() const {
    int64_t total = 0;
    for (int64_t v : c_.numels) total += v;
    return total;
  }

  // The flat buffer, poisoned; a 16-byte aligned heap block of exactly its size.
  struct Buffer {
    Buffer(DType dtype, int64_t numel) : dtype(dtype), bytes(numel * dtype_bytes(dtype)) {
      void* block = nullptr;
      CHECK(posix_memalign(&block, 16, bytes) == 0, "out of memory");
      data = static_cast<unsigned char*>(block);
      std::memset(data, kPoison, bytes);
    }
    ~Buffer() { std::free(data); }
    Buffer(const Buffer&) = delete;
    Buffer& operator=(const Buffer&) = delete;
    uintptr_t address() const { return reinterpret_cast<uintptr_t>(data); }
    double get(int64_t i) const { return decode(dtype, data + i * dtype_bytes(dtype)); }
    void set(int64_t i, double v) { encode(dtype, v, data + i * dtype_bytes(dtype)); }
    void copy_from(const Buffer& other) { std::memcpy(data, other.data, bytes); }
    bool same_bits(const Buffer& other) const { return std::memcmp(data, other.data, bytes) == 0; }
    DType dtype;
    size_t bytes;
    unsigned char* data;
  };

  std::unique_ptr<Buffer> new_buffer() const {
    return std::make_unique<Buffer>(b_, layout_.buffer_numel);
  }

  // Padding (between segments and after the flag) is never written.
  void check_padding(const Buffer& buffer, const std::string& op) const {
    std::vector<bool> used(layout_.buffer_numel, false);
    for (int64_t i = 0; i < n(); ++i) {
      for (int64_t e = 0; e < layout_.numels[i]; ++e) used[layout_.offsets[i] + e] = true;
    }
    for (int64_t s = 0; s <= layout_.count_slots; ++s) used[layout_.count_offset + s] = true;
    for (int64_t k = 0; k < layout_.buffer_numel; ++k) {
      if (used[k]) continue;
      for (size_t b = 0; b < dtype_bytes(b_); ++b) {
        CHECK(buffer.data[k * dtype_bytes(b_) + b] == kPoison,
              where(op) + ": padding element " + std::to_string(k) + " was written");
      }
    }
  }

  void check_sentinels(const Tensors& tensors, const std::string& op) const {
    for (int64_t i = 0; i < n(); ++i) {
      CHECK(tensors[i]->sentinel_intact(),
            where(op) + ": bytes before misaligned tensor " + std::to_string(i) + " written");
    }
  }

  void check_same_bits(const Tensors& got, const Tensors& cpu, const std::string& what) const {
    for (int64_t i = 0; i < n(); ++i) {
      CHECK(got[i]->same_bits(*cpu[i]),
            where(what) + ": tensor " + std::to_string(i) + " differs from the CPU flavor");
    }
  }

  // The launches the op took: the planning the device would get.
  void check_launches(const HostLauncher& launcher, bool writes_slots, int depth,
                      const std::vector<uintptr_t>& primary, const std::string& op) const {
    const int64_t capacity = depth == 1   ? dl::TensorList<1>::kCapacity
                             : depth == 2 ? dl::TensorList<2>::kCapacity
                                          : dl::TensorList<3>::kCapacity;
    int64_t expected = 0;
    for (DType d : kDtypes) {
      int64_t count = 0;
      for (int64_t i = 0; i < n(); ++i) count += c_.dtypes[i] == d && c_.numels[i] > 0;
      expected += (count + capacity - 1) / capacity;
    }
    if (expected == 0 && writes_slots) expected = 1;  // the count slots alone
    const auto& launches = launcher.launches;
    CHECK(static_cast<int64_t>(launches.size()) == expected,
          where(op) + ": " + std::to_string(launches.size()) + " launches, expected " +
              std::to_string(expected));
    std::unordered_map<uintptr_t, int64_t> index;  // tensors with elements, by address
    for (int64_t i = 0; i < n(); ++i) {
      if (c_.numels[i] > 0) index[primary[i]] = i;
    }
    std::multiset<uintptr_t> seen;
    for (size_t l = 0; l < launches.size(); ++l) {
      const LaunchRecord& r = launches[l];
      const std::string at = where(op) + ": launch " + std::to_string(l);
      CHECK(r.writes_count_slots == (writes_slots && l == 0),
            at + ": count slots written by a launch other than the first");
      CHECK(static_cast<int64_t>(r.primary.size()) <= capacity, at + ": over capacity");
      CHECK(r.blocks == std::max<int64_t>(1, std::min(r.num_chunks, c_.max_blocks)),
            at + ": grid of " + std::to_string(r.blocks) + " blocks");
      int64_t chunks = 0;
      for (size_t k = 0; k < r.primary.size(); ++k) {
        const auto it = index.find(r.primary[k]);
        CHECK(it != index.end(), at + ": an address not in the list");
        const int64_t i = it->second;
        CHECK(c_.dtypes[i] == r.dtype, at + ": a tensor of another dtype");
        CHECK(c_.numels[i] > 0 && r.numel[k] == c_.numels[i], at + ": wrong or empty tensor");
        chunks += (c_.numels[i] + dl::kChunkElements - 1) / dl::kChunkElements;
        CHECK(r.chunk_end[k] == chunks, at + ": chunk_end");
        seen.insert(r.primary[k]);
      }
      CHECK(r.num_chunks == chunks, at + ": num_chunks");
    }
    for (int64_t i = 0; i < n(); ++i) {
      if (c_.numels[i] == 0) continue;
      CHECK(seen.count(primary[i]) == 1,
            where(op) + ": tensor " + std::to_string(i) + " not in exactly one launch");
    }
    CHECK(launcher.calls == total_elements(), where(op) + ": " + std::to_string(launcher.calls) +
                                                  " element operations for " +
                                                  std::to_string(total_elements()) + " elements");
  }

  void record(const HostLauncher& launcher) {
    totals_.launches += static_cast<int64_t>(launcher.launches.size());
    for (const auto& r : launcher.launches) totals_.thread_runs += r.blocks * dl::kThreadsPerBlock;
  }

  bool has_bad() const { return c_.bad_tensor >= 0 && c_.numels[c_.bad_tensor] > 0; }

  void check_count_slots(const Buffer& buffer, int64_t slot, const std::string& op) const {
    for (int64_t s = 0; s < layout_.count_slots; ++s) {
      CHECK(buffer.get(layout_.count_offset + s) == (s == slot ? 1.0 : 0.0),
            where(op) + ": count slot " + std::to_string(s));
    }
  }

  void check_flag(const Buffer& buffer, bool raised, const std::string& op) const {
    CHECK(buffer.get(layout_.flag_offset) == (raised ? 1.0 : 0.0),
          where(op) + ": non-finite flag " + std::to_string(buffer.get(layout_.flag_offset)));
  }

  // pack: buffer = tensors (rounded to B); count slots; the flag.
  void pack() {
    const std::string op = "pack";
    Tensors x = random_tensors(true);
    Tensors x_cpu = clone(x);
    auto buffer = new_buffer();
    auto buffer_cpu = new_buffer();
    HostLauncher launcher(c_.max_blocks, rng_);
    const auto xa = addresses(x);
    dl::pack_multi_tensor(launcher, layout_, xa, buffer->address(), c_.count_slot);
    dl::pack_cpu(layout_, addresses(x_cpu), buffer_cpu->address(), c_.count_slot, 1);
    check_launches(launcher, true, 1, xa, op);
    CHECK(launcher.zeroed == 1, where(op) + ": the flag is zeroed once, before the launches");
    record(launcher);
    CHECK(buffer->same_bits(*buffer_cpu), where(op) + ": buffer differs from the CPU flavor");
    for (int64_t i = 0; i < n(); ++i) {
      const double tol = tolerance(c_.dtypes[i], b_);
      for (int64_t e = 0; e < layout_.numels[i]; ++e) {
        const double want = round_to(b_, x[i]->get(e));
        CHECK(close(buffer->get(layout_.offsets[i] + e), want, tol),
              where(op) + ": tensor " + std::to_string(i) + " element " + std::to_string(e));
      }
    }
    check_count_slots(*buffer, c_.count_slot, op);
    check_flag(*buffer, has_bad(), op);
    check_padding(*buffer, op);
    check_sentinels(x, op);
    packed_ = std::move(buffer);
  }

  // unpack: tensors = buffer / contributor count (3 here).
  void unpack() { check_unpack("unpack", dl::kNoAgreement, false); }

  // unpack of a buffer whose two count slots hold 2 and 1 contributors,
  // with `agreement`: tensors = buffer / 3, or zeros when `zeros`.
  void check_unpack(const std::string& op, const dl::Agreement& agreement, bool zeros) {
    auto buffer = new_buffer();
    buffer->copy_from(*packed_);
    buffer->set(layout_.count_offset, 2.0);
    buffer->set(layout_.count_offset + 1, 1.0);
    buffer->set(layout_.flag_offset, 0.0);
    Tensors out = make_tensors();
    Tensors out_cpu = make_tensors();
    for (int64_t i = 0; i < n(); ++i) {
      out[i]->poison();
      out_cpu[i]->poison();
    }
    HostLauncher launcher(c_.max_blocks, rng_);
    const auto oa = addresses(out);
    dl::unpack_multi_tensor(launcher, layout_, oa, buffer->address(), true, false, agreement);
    dl::unpack_cpu(layout_, addresses(out_cpu), buffer->address(), true, 1, false, agreement);
    check_launches(launcher, false, 1, oa, op);
    CHECK(launcher.zeroed == 0, where(op) + ": zeroed a flag it does not write");
    record(launcher);
    check_same_bits(out, out_cpu, op);
    for (int64_t i = 0; i < n(); ++i) {
      const double tol = tolerance(c_.dtypes[i], b_);
      for (int64_t e = 0; e < layout_.numels[i]; ++e) {
        const double want =
            zeros ? 0.0 : round_to(c_.dtypes[i], buffer->get(layout_.offsets[i] + e) / 3.0);
        CHECK(close(out[i]->get(e), want, tol),
              where(op) + ": tensor " + std::to_string(i) + " element " + std::to_string(e));
      }
    }
    check_sentinels(out, op);
  }

  // unpack with skip_nonfinite and the flag raised: zeros everywhere.
  void unpack_skipped() {
    const std::string op = "unpack (flag raised, skip)";
    auto buffer = new_buffer();
    buffer->copy_from(*packed_);
    buffer->set(layout_.flag_offset, 2.0);
    Tensors out = make_tensors();
    Tensors out_cpu = make_tensors();
    for (int64_t i = 0; i < n(); ++i) {
      out[i]->poison();
      out_cpu[i]->poison();
    }
    HostLauncher launcher(c_.max_blocks, rng_);
    const auto oa = addresses(out);
    dl::unpack_multi_tensor(launcher, layout_, oa, buffer->address(), true, true);
    dl::unpack_cpu(layout_, addresses(out_cpu), buffer->address(), true, 1, true, dl::kNoAgreement);
    check_launches(launcher, false, 1, oa, op);
    record(launcher);
    check_same_bits(out, out_cpu, op);
    for (int64_t i = 0; i < n(); ++i) {
      for (int64_t e = 0; e < layout_.numels[i]; ++e) {
        CHECK(out[i]->get(e) == 0.0, where(op) + ": tensor " + std::to_string(i) + " not zero");
      }
    }
  }

  // unpack with an agreement read from another buffer of the layout (the
  // step's decision bucket), whose two count slots are two codes of one
  // slot each: when this rank's code (slot 0) holds the 3 contributors, as
  // unpack; when a rank wrote the other code, zeros everywhere.
  void unpack_with_agreement(bool holds) {
    auto decision = new_buffer();
    decision->set(layout_.count_offset, holds ? 3.0 : 2.0);
    decision->set(layout_.count_offset + 1, holds ? 0.0 : 1.0);
    const dl::Agreement agreement{decision->data + layout_.count_offset * dtype_bytes(b_), 0, 1};
    check_unpack(holds ? "unpack (agreed)" : "unpack (ranks disagree)", agreement, !holds);
  }

  // The EA blend: delta = alpha * (x - center) into the buffer, x -= delta;
  // with catch_up, first center += buffer (the previous sum).
  void ea_blend(bool catch_up) {
    const std::string op = catch_up ? "ea_blend (catch-up)" : "ea_blend";
    const double alpha = 0.3;
    Tensors x = random_tensors(true);
    Tensors center = random_tensors(false, true);
    Tensors x0 = clone(x), center0 = clone(center);
    Tensors x_cpu = clone(x), center_cpu = clone(center);
    auto buffer = new_buffer();
    auto buffer_cpu = new_buffer();
    if (catch_up) {  // the previous round's sum: the packed values
      buffer->copy_from(*packed_);
      buffer_cpu->copy_from(*packed_);
    }
    auto previous = new_buffer();
    previous->copy_from(*buffer);
    HostLauncher launcher(c_.max_blocks, rng_);
    const auto xa = addresses(x);
    dl::ea_blend_multi_tensor(launcher, layout_, xa, addresses(center), buffer->address(), alpha, 0,
                              catch_up);
    dl::ea_blend_cpu(layout_, addresses(x_cpu), addresses(center_cpu), buffer_cpu->address(), alpha,
                     0, 1, catch_up);
    check_launches(launcher, true, 2, xa, op);
    record(launcher);
    CHECK(buffer->same_bits(*buffer_cpu), where(op) + ": buffer differs from the CPU flavor");
    check_same_bits(x, x_cpu, op + " (params)");
    check_same_bits(center, center_cpu, op + " (centers)");
    for (int64_t i = 0; i < n(); ++i) {
      const DType t = c_.dtypes[i];
      const double tol = tolerance(t, b_);
      for (int64_t e = 0; e < layout_.numels[i]; ++e) {
        const int64_t k = layout_.offsets[i] + e;
        double c = center0[i]->get(e);
        if (catch_up) c = round_to(t, c + previous->get(k));
        const double delta = round_to(b_, alpha * (x0[i]->get(e) - c));
        const double x_new = round_to(t, x0[i]->get(e) - delta);
        const std::string at = ": tensor " + std::to_string(i) + " element " + std::to_string(e);
        CHECK(close(buffer->get(k), delta, tol), where(op) + at + " (delta)");
        CHECK(close(x[i]->get(e), x_new, tol), where(op) + at + " (param)");
        CHECK(close(center[i]->get(e), c, tol), where(op) + at + " (center)");
      }
    }
    check_count_slots(*buffer, 0, op);
    check_flag(*buffer, has_bad(), op);
    check_padding(*buffer, op);
    check_sentinels(x, op);
    check_sentinels(center, op);
    if (!catch_up) deltas_ = std::move(buffer);
  }

  // center += buffer (the summed deltas); with skip and the flag raised, nothing.
  void center_update(bool skipped) {
    const std::string op = skipped ? "center_update (flag raised, skip)" : "center_update";
    auto buffer = new_buffer();
    buffer->copy_from(*deltas_);
    buffer->set(layout_.flag_offset, skipped ? 1.0 : 0.0);
    Tensors center = random_tensors(false, true);
    Tensors center0 = clone(center), center_cpu = clone(center);
    HostLauncher launcher(c_.max_blocks, rng_);
    const auto ca = addresses(center);
    dl::center_update_multi_tensor(launcher, layout_, ca, buffer->address(), true);
    dl::center_update_cpu(layout_, addresses(center_cpu), buffer->address(), 1, true);
    check_launches(launcher, false, 1, ca, op);
    record(launcher);
    check_same_bits(center, center_cpu, op);
    for (int64_t i = 0; i < n(); ++i) {
      const double tol = tolerance(c_.dtypes[i], b_);
      for (int64_t e = 0; e < layout_.numels[i]; ++e) {
        const double before = center0[i]->get(e);
        const double want =
            skipped ? before : round_to(c_.dtypes[i], before + buffer->get(layout_.offsets[i] + e));
        CHECK(close(center[i]->get(e), want, tol),
              where(op) + ": tensor " + std::to_string(i) + " element " + std::to_string(e));
      }
    }
    check_sentinels(center, op);
  }

  // DiLoCo's outer gradient: buffer = global - local (rounded to B); count
  // slots and flag as pack.
  void outer_gradient() {
    const std::string op = "outer_gradient";
    Tensors local = random_tensors(true);
    Tensors global = random_tensors(false, true);
    Tensors local0 = clone(local), global0 = clone(global);
    auto buffer = new_buffer();
    auto buffer_cpu = new_buffer();
    HostLauncher launcher(c_.max_blocks, rng_);
    const auto la = addresses(local);
    dl::outer_gradient_multi_tensor(launcher, layout_, la, addresses(global), buffer->address(),
                                    c_.count_slot);
    dl::outer_gradient_cpu(layout_, la, addresses(global), buffer_cpu->address(), c_.count_slot, 1);
    check_launches(launcher, true, 2, la, op);
    CHECK(launcher.zeroed == 1, where(op) + ": the flag is zeroed once, before the launches");
    record(launcher);
    CHECK(buffer->same_bits(*buffer_cpu), where(op) + ": buffer differs from the CPU flavor");
    check_same_bits(local, local0, op + " (locals are only read)");
    check_same_bits(global, global0, op + " (globals are only read)");
    for (int64_t i = 0; i < n(); ++i) {
      const double tol = tolerance(c_.dtypes[i], b_);
      for (int64_t e = 0; e < layout_.numels[i]; ++e) {
        const double want = round_to(b_, global0[i]->get(e) - local0[i]->get(e));
        CHECK(close(buffer->get(layout_.offsets[i] + e), want, tol),
              where(op) + ": tensor " + std::to_string(i) + " element " + std::to_string(e));
      }
    }
    check_count_slots(*buffer, c_.count_slot, op);
    check_flag(*buffer, has_bad(), op);
    check_padding(*buffer, op);
    check_sentinels(local, op);
  }

  // What an outer step's buffer holds: a sum over 3 contributors, the same
  // with the flag raised (skip), or no contributor.
  enum class OuterInput { kStep, kSkipped, kNobody };
  struct OuterCase {
    std::string op;
    dl::OuterSettings settings;
    OuterInput input;
  };

  // The outer step, against torch.optim.SGD's update written out in double
  // (rounding where the op stores: the momentum, the global, the local).
  void outer_step(const OuterCase& oc) {
    const std::string& op = oc.op;
    const dl::OuterSettings& s = oc.settings;
    auto buffer = new_buffer();
    buffer->copy_from(*packed_);  // finite or not as the case's values are
    const bool nobody = oc.input == OuterInput::kNobody;
    buffer->set(layout_.count_offset, nobody ? 0.0 : 2.0);
    buffer->set(layout_.count_offset + 1, nobody ? 0.0 : 1.0);
    buffer->set(layout_.flag_offset, oc.input == OuterInput::kSkipped ? 1.0 : 0.0);
    Tensors local = random_tensors(false);
    Tensors global = random_tensors(false, true);
    Tensors momentum = random_tensors(false);
    if (nobody && s.mix == 0.0) {  // the state such a step meets: locals equal the globals
      for (int64_t i = 0; i < n(); ++i) local[i]->copy_from(*global[i]);
    }
    Tensors local0 = clone(local), global0 = clone(global), momentum0 = clone(momentum);
    Tensors local_cpu = clone(local), global_cpu = clone(global), momentum_cpu = clone(momentum);
    auto buffer0 = new_buffer();
    buffer0->copy_from(*buffer);
    HostLauncher launcher(c_.max_blocks, rng_);
    const auto la = addresses(local);
    dl::outer_step_multi_tensor(launcher, layout_, la, addresses(global), addresses(momentum),
                                buffer->address(), s, true);
    dl::outer_step_cpu(layout_, addresses(local_cpu), addresses(global_cpu),
                       addresses(momentum_cpu), buffer->address(), s, 1, true);
    check_launches(launcher, false, 3, la, op);
    CHECK(launcher.zeroed == 0, where(op) + ": zeroed a flag it does not write");
    record(launcher);
    CHECK(buffer->same_bits(*buffer0), where(op) + ": the buffer is only read");
    check_same_bits(local, local_cpu, op + " (locals)");
    check_same_bits(global, global_cpu, op + " (globals)");
    check_same_bits(momentum, momentum_cpu, op + " (momenta)");
    for (int64_t i = 0; i < n(); ++i) {
      const DType t = c_.dtypes[i];
      const double tol = tolerance(t, b_);
      for (int64_t e = 0; e < layout_.numels[i]; ++e) {
        double l = local0[i]->get(e), g = global0[i]->get(e), m = momentum0[i]->get(e);
        if (oc.input == OuterInput::kSkipped) {
          l = g;
        } else if (oc.input == OuterInput::kStep) {
          const double grad = buffer0->get(layout_.offsets[i] + e) / 3.0;
          double direction = grad;
          if (s.momentum != 0.0) {
            m = round_to(t, s.momentum * m + grad);
            direction = s.nesterov ? grad + s.momentum * m : m;
          }
          g = round_to(t, g - s.lr * direction);
          l = s.mix == 0.0 ? g : round_to(t, s.mix * l + (1.0 - s.mix) * g);
        }
        const std::string at = ": tensor " + std::to_string(i) + " element " + std::to_string(e);
        // Momentum and the step amplify the rounding of the sum: 4 ulps' room.
        CHECK(close(momentum[i]->get(e), m, 4 * tol), where(op) + at + " (momentum)");
        CHECK(close(global[i]->get(e), g, 4 * tol), where(op) + at + " (global)");
        CHECK(close(local[i]->get(e), l, 4 * tol), where(op) + at + " (local)");
      }
    }
    check_sentinels(local, op);
    check_sentinels(global, op);
    check_sentinels(momentum, op);
  }

  const Case& c_;
  std::mt19937_64& rng_;
  Totals& totals_;
  dl::Layout layout_;
  DType b_;
  std::unique_ptr<Buffer> packed_;
  std::unique_ptr<Buffer> deltas_;
};

// Odd sizes: one element, short tails for every vector width, empty
// tensors, one chunk exactly and one element more (two chunks).
const std::vector<int64_t> kOddSizes = {
    1, 3, 1023, 0, 35, 33, 221, 16, 0, dl::kChunkElements, dl::kChunkElements + 1, 7, 2, 100};
constexpr int kTwoChunkTensor = 10;  // kChunkElements + 1 elements

Case uniform_case(const std::string& name, DType t, DType b, bool misaligned) {
  Case c{name, kOddSizes, {}, {}, b};
  for (size_t i = 0; i < c.numels.size(); ++i) {
    c.dtypes.push_back(t);
    // Misaligned views on every other tensor: both paths in one list.
    c.misaligned.push_back(misaligned && i % 2 == 0);
  }
  return c;
}

std::vector<Case> cases_for(DType t, DType b) {
  const std::string pair = std::string(dtype_name(t)) + "/" + dtype_name(b);
  // Aligned views, the vector path; a NaN in the two-chunk tensor.
  Case aligned = uniform_case("aligned " + pair, t, b, false);
  aligned.bad_tensor = kTwoChunkTensor;
  aligned.bad_value = NAN;
  // Misaligned views (the scalar path) among aligned ones, the EA centers
  // misaligned where the params are not, an infinity in a misaligned
  // tensor, no count slot set, and a grid of 3 blocks for 13 chunks: each
  // block loops (grid-stride).
  Case mixed = uniform_case("misaligned, grid-stride " + pair, t, b, true);
  mixed.bad_tensor = kTwoChunkTensor;
  mixed.bad_value = -INFINITY;
  mixed.count_slot = -1;
  mixed.max_blocks = 3;
  mixed.centers_complement = true;
  return {aligned, mixed};
}

// Every dtype taking turns, some views misaligned (the EA centers where the
// params are not), and a three-chunk tensor: one group of launches per
// dtype, each with a grid of at most 5 blocks.
Case mixed_case(DType b) {
  Case c{std::string("mixed dtypes [") + dtype_name(b) + "]", {}, {}, {}, b};
  std::vector<int64_t> sizes = kOddSizes;
  sizes.push_back(2 * dl::kChunkElements + 232);
  for (size_t i = 0; i < sizes.size(); ++i) {
    c.numels.push_back(sizes[i]);
    c.dtypes.push_back(kDtypes[i % 4]);
    c.misaligned.push_back(i % 3 == 0);
  }
  c.bad_tensor = 6;  // an infinity in a misaligned f16 tensor
  c.bad_value = INFINITY;
  c.max_blocks = 5;
  c.centers_complement = true;
  return c;
}

// More tensors than one launch holds (1,015 for one stream, 812 for two):
// two launches for the main dtype, the count slots from the first; some
// two-chunk tensors, zero-size ones taking no room, and a second dtype.
Case many_case(DType t, DType b) {
  Case c{std::string("many tensors ") + dtype_name(t) + "/" + dtype_name(b), {}, {}, {}, b};
  const int64_t count = dl::TensorList<1>::kCapacity + 85;
  for (int64_t i = 0; i < count; ++i) {
    c.numels.push_back(i % 97 == 0 ? 0 : (i % 400 == 1 ? dl::kChunkElements + 6 : i % 37 + 1));
    c.dtypes.push_back(i % 300 == 7 ? DType::kFloat64 : t);
    c.misaligned.push_back(i % 5 == 0);
  }
  c.bad_tensor = static_cast<int>(count - 3);  // in the last launch
  c.bad_value = NAN;
  return c;
}

// Only empty tensors: pack still writes its count slots, in one launch of
// no tensors; unpack launches nothing.
Case empty_case(DType b) {
  return Case{std::string("empty tensors [") + dtype_name(b) + "]",
              {0, 0, 0},
              {DType::kFloat32, DType::kBFloat16, DType::kFloat32},
              {false, false, true},
              b};
}

// Planning alone (nothing runs) for sizes past 32 bits: a 2^33-element
// tensor is 2^33 / kChunkElements chunks in one launch of kMaxBlocks blocks.
void check_large_planning() {
  const int64_t big = int64_t{1} << 33;
  const dl::Layout layout = dl::make_layout({big, 5, big + 1}, {0, 0, 0}, 0, 1);
  const std::vector<uintptr_t> tensors = {4096, 8192, 12288};
  int launches = 0;
  dl::plan_launches(layout, {&tensors}, 1 << 20, dl::kNoCountSlots, dl::PackOp{}, dl::kMaxBlocks,
                    [&](DType, const dl::KernelParams<dl::PackOp>& params, int64_t blocks) {
                      ++launches;
                      const auto& list = params.list;
                      CHECK(list.num_tensors == 3, "large: tensors");
                      const int64_t chunks = big / dl::kChunkElements;
                      CHECK(list.chunk_end[0] == chunks, "large: chunks of 2^33");
                      CHECK(list.chunk_end[2] == 2 * chunks + 2, "large: chunks");
                      CHECK(list.numel[2] == big + 1, "large: numel");
                      CHECK(blocks == dl::kMaxBlocks, "large: grid");
                      const auto segment =
                          static_cast<uintptr_t>((1 << 20) + layout.offsets[2] * 4);
                      CHECK(list.segment[2] == segment, "large: segment address");
                    });
  CHECK(launches == 1, "large: one launch");
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 2 && argc != 4) {
    std::fprintf(stderr, "usage: %s SEED [SHARD SHARDS]\n", argv[0]);
    return 2;
  }
  const uint64_t seed = std::strtoull(argv[1], nullptr, 10);
  // Shard SHARD of SHARDS runs every SHARDS-th case (processes in parallel).
  const int shard = argc == 4 ? std::atoi(argv[2]) : 0;
  const int shards = argc == 4 ? std::atoi(argv[3]) : 1;
  if (shards < 1 || shard < 0 || shard >= shards) {
    std::fprintf(stderr, "SHARD must be in [0, SHARDS)\n");
    return 2;
  }
  std::printf("seed %llu, shard %d of %d\n", static_cast<unsigned long long>(seed), shard, shards);
  Totals totals;
  std::string current;
  try {
    std::vector<Case> cases;
    for (DType t : kDtypes) {
      for (DType b : kDtypes) {
        for (Case& c : cases_for(t, b)) cases.push_back(std::move(c));
      }
    }
    for (DType b : kDtypes) cases.push_back(mixed_case(b));
    cases.push_back(many_case(DType::kBFloat16, DType::kFloat32));
    cases.push_back(empty_case(DType::kFloat32));
    cases.push_back(empty_case(DType::kBFloat16));
    for (std::size_t i = shard; i < cases.size(); i += shards) {
      current = cases[i].name;
      // Each case's data from (seed, case): the same whatever the sharding.
      std::seed_seq case_seed{seed, static_cast<uint64_t>(i)};
      std::mt19937_64 rng(case_seed);
      Runner(cases[i], rng, totals).run_all();
    }
    if (shard == 0) {
      current = "large planning";
      check_large_planning();
    }
  } catch (const std::exception& e) {
    std::fprintf(stderr, "FAILED (%s): %s\n", current.c_str(), e.what());
    return 1;
  }
  std::printf("host kernels: %d cases x 7 ops, %lld launches, %lld (block, thread) runs: ok\n",
              totals.cases, static_cast<long long>(totals.launches),
              static_cast<long long>(totals.thread_runs));
  return 0;
}
