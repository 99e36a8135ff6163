// The multi-tensor engine of the CUDA flavor, as plain C++: the launch
// parameters, the planning of launches, and the body every thread of a
// launch runs. kernels/multi_tensor_cuda.cuh wraps the body in a __global__
// kernel; tests/host_kernels/ runs the same body for every (block, thread)
// of the same grid on the CPU, under sanitizers. No CUDA header is needed.
//
// NOTE [Kernel parameters]. A launch carries its tensors in its kernel
// parameters, by value (as PyTorch's multi_tensor_apply does): no table in
// device memory, nothing to allocate, copy, cache or free, and a CUDA graph
// captures a launch whole. Every tensor is cut into chunks of kChunkElements; the launch's
// chunks are numbered 0 .. num_chunks - 1 in tensor order, chunk_end holding
// the running total per tensor. Block b takes chunks b, b + blocks, ...
// (grid-stride) and finds each chunk's tensor by binary search in
// chunk_end; its threads stride through the chunk. Every element is visited
// by exactly one thread, so ops need no synchronization: no shared memory,
// no barrier, no thread reads what another writes (the non-finite flag is
// only ever set to the same value by every writer).
//
// One launch runs one storage type T: a list with several dtypes is planned
// as one group of launches per dtype, each a uniform kernel (no dtype switch
// inside a kernel, so its register use is that of one type pair). A group
// with more tensors than fit one launch's parameters splits into as few
// launches as that takes; tensors with no elements take no room.
//
// Memory access: where the chunk's tensor, secondary and buffer addresses
// are 16-byte aligned (the buffer always is, see layout.h; a tensor is
// unless it is a view at an odd offset), each thread moves 16-byte vectors
// (8-byte ones for a 16-bit stream beside an fp64 one, see run_chunk),
// several in flight, then a scalar tail; otherwise the whole chunk takes the
// scalar path. Chunks start at multiples of kChunkElements, so a chunk's
// alignment is its tensor's.
//
// An Op declares which streams it touches and combines one element of each
// in registers (element math comes from element_ops.h):
//   static constexpr bool kReadsPrimary, kWritesPrimary, kReadsSecondary,
//                         kWritesSecondary, kReadsBuffer, kWritesBuffer;
//   template <typename B> void prepare();  // once per thread, on its own copy
//   template <typename T, typename B>
//   void operator()(T& primary, T& secondary, B& buffer) const;
// all __host__ __device__ (DL_HOST_DEVICE). An op of three tensor streams
// (the DiLoCo outer step: local params, global params, outer momentum) also
// declares kReadsTertiary and kWritesTertiary and takes
//   void operator()(T& primary, T& secondary, T& tertiary, B& buffer) const;
#pragma once

#include <array>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "element_ops.h"
#include "layout.h"
#include "scalar_types.h"
#include "vector_io.h"

namespace distlearn {

// ---------------------------------------------------------------------------
// Tuned constants, all in one place. The chunk size was measured against
// another on an H100 (below); the others are the design's starting point.

// Elements per chunk, the unit of work a block takes at a time: 16K
// elements (64 KB of fp32). Larger chunks amortize a block's per-chunk cost
// (the chunk-to-tensor search, the alignment test, the scalar tail) and
// keep every group of run_chunk in flight; smaller ones shorten the last
// wave. Measured on an H100 (2026-11-26, benchmarks/RESULTS.md): at 16K,
// ResNet-50's fp32 pack is 2.53 waves of resident blocks (ncu) and reaches
// 87% of the copy bandwidth, GPT-2 small's 96% (11.5 waves); at 4K, ResNet-50's
// fp32 ops reach 90-97% but GPT-2's bf16 pack falls from 95% to 71%, since
// a 4K chunk of 16-bit elements gives each thread two of its four groups.
// A chunk of one full pass of the block per dtype pair would serve both;
// it is not measured yet.
constexpr int64_t kChunkElements = int64_t{1} << 14;

// Threads per block. 256 gives 8 warps per block and, at 64 registers per
// thread, 4 resident blocks (half of the 2048 threads) per SM on sm_80 and
// sm_90: more threads per block strides a chunk in fewer steps; fewer
// threads leave more room to keep blocks resident when a chunk's end idles
// part of a block.
constexpr int kThreadsPerBlock = 256;

// Most blocks a launch starts; beyond, blocks loop over chunks
// (grid-stride). 2^16 blocks of 16K-element chunks cover 2^30 elements per
// pass, so a launch rarely loops. Fewer blocks amortize each block's setup
// (the op's prepare, which may read the count slots) over more chunks; more
// blocks spread the last chunks over more SMs.
constexpr int64_t kMaxBlocks = int64_t{1} << 16;

// Bytes each thread keeps in flight per step, summed over the streams it
// reads: 64 bytes is four 16-byte fp32 vectors of a single-stream op.
// More bytes in flight hide more DRAM latency per thread; fewer leave
// registers for occupancy. An estimate, not a measurement: by Little's law
// an H100 (about 3.35 TB/s, several hundred ns of latency, 132 SMs) needs
// some 15 KB in flight per SM, and 1024 resident threads at 64 bytes each
// keep 64 KB.
constexpr int kBytesInFlight = 64;
// ... in at most this many groups (a group: kN elements of every stream,
// see run_chunk). Each group in flight costs its own address and bounds
// test besides its data, so a narrow read stream (16-bit tensors packed
// into an fp64 buffer) would otherwise spill past 64 registers on sm_80.
constexpr int kMaxGroupsInFlight = 4;

// ---------------------------------------------------------------------------
// Registers: every kernel is compiled for at most this many registers per
// thread (via __launch_bounds__ min blocks, below), and tests/test_build.py
// checks the built _C keeps to it with no stack or local memory.
constexpr int kMaxRegistersPerThread = 64;
// sm_80 and sm_90 have 65,536 32-bit registers per SM.
constexpr int kRegistersPerSm = 65536;
constexpr int kMinBlocksPerSm = kRegistersPerSm / (kThreadsPerBlock * kMaxRegistersPerThread);
static_assert(kMinBlocksPerSm >= 1, "a block of kThreadsPerBlock threads must fit one SM");

// ---------------------------------------------------------------------------
// Kernel parameter space. CUDA 12.1 raised the size of a kernel's parameters
// from 4,096 to 32,764 bytes on Volta (sm_70) and newer (CUDA C++
// Programming Guide, "Function Parameters"; PyTorch's multi_tensor_apply uses
// it the same way). _C is built with CUDA 13 for sm_80 and sm_90, with the
// runtime linked statically, and a CUDA 13 runtime runs only on drivers that
// accept the larger space.
constexpr int64_t kMaxKernelParamBytes = 32764;
// Room kept in the parameters for what is not per tensor: the list's two
// counts, the count-slot write and the op (each op is asserted to fit).
constexpr int64_t kParamHeaderBytes = 256;

// Count slots a launch writes: all zero, then 1 in `slot` when slot >= 0
// (slots == nullptr: none). flag: where a thread stores 1 when a value it
// wrote to the buffer is a NaN or an infinity (zeroed before the launches);
// nullptr: no check.
struct CountSlotWrite {
  void* slots;
  int64_t num_slots;
  int64_t slot;
  void* flag;
};

// The tensors of one launch. kDepth is the number of tensor streams: 1 (the
// tensors), 2 (the EA blend's params and centers) or 3 (the DiLoCo outer
// step's local params, global params and momenta). Structure of arrays: a
// search over chunk_end touches only chunk_end.
template <int kDepth>
struct TensorList {
  static constexpr int64_t kBytesPerTensor = (kDepth + 3) * 8;
  static constexpr int kCapacity =
      static_cast<int>((kMaxKernelParamBytes - kParamHeaderBytes - 16) / kBytesPerTensor);

  int64_t num_tensors;                  // 0 .. kCapacity, none of them empty
  int64_t num_chunks;                   // chunk_end[num_tensors - 1], or 0
  uintptr_t tensor[kDepth][kCapacity];  // [0]: primary, [1]: secondary, [2]: tertiary
  uintptr_t segment[kCapacity];         // the tensor's first buffer element
  int64_t numel[kCapacity];             // >= 1
  int64_t chunk_end[kCapacity];         // chunks of tensors 0 .. i, summed
};
// 1,015 tensors per launch for one stream, 812 for two, 676 for three (the 16 bytes: the list's two
// counts).
static_assert(TensorList<1>::kCapacity == 1015 && TensorList<2>::kCapacity == 812 &&
                  TensorList<3>::kCapacity == 676,
              "capacity");
static_assert(sizeof(TensorList<1>) == 16 + 1015 * 32, "no padding in the list");
static_assert(sizeof(TensorList<2>) == 16 + 812 * 40, "no padding in the list");
static_assert(sizeof(TensorList<3>) == 16 + 676 * 48, "no padding in the list");
static_assert(sizeof(TensorList<1>) + kParamHeaderBytes <= kMaxKernelParamBytes, "fits");
static_assert(sizeof(TensorList<2>) + kParamHeaderBytes <= kMaxKernelParamBytes, "fits");
static_assert(sizeof(TensorList<3>) + kParamHeaderBytes <= kMaxKernelParamBytes, "fits");

// Whether an op touches a third tensor stream (declares kReadsTertiary and
// kWritesTertiary; ops of one or two streams declare neither).
template <typename Op, typename = void>
struct Tertiary {
  static constexpr bool kReads = false, kWrites = false;
};
template <typename Op>
struct Tertiary<Op, std::void_t<decltype(Op::kReadsTertiary)>> {
  static constexpr bool kReads = Op::kReadsTertiary, kWrites = Op::kWritesTertiary;
};

// Tensor streams of an op: 3 with the tertiary tensors, 2 with the
// secondary ones, else 1.
template <typename Op>
constexpr int kDepthOf = Tertiary<Op>::kReads || Tertiary<Op>::kWrites ? 3
                         : Op::kReadsSecondary || Op::kWritesSecondary ? 2
                                                                       : 1;

// One element of every stream the op has, combined.
template <typename Op, typename T, typename B>
DL_INLINE void apply_op(const Op& op, T& primary, T& secondary, T& tertiary, B& buffer) {
  if constexpr (kDepthOf<Op> == 3) {
    op(primary, secondary, tertiary, buffer);
  } else {
    op(primary, secondary, buffer);
  }
}

// Everything a launch needs, passed by value as its one kernel parameter.
template <typename Op>
struct KernelParams {
  TensorList<kDepthOf<Op>> list;
  CountSlotWrite count;
  Op op;
};

// Where a thread is in its launch's grid.
struct GridPosition {
  int64_t block;
  int64_t blocks;
  int64_t thread;
  int64_t threads;
};

// ---------------------------------------------------------------------------
// The body of a thread.

template <typename B>
DL_HOST_DEVICE void write_count_slots(const CountSlotWrite& count, int64_t thread,
                                      int64_t threads) {
  if (count.slots == nullptr) return;
  B* slots = static_cast<B*>(count.slots);
  for (int64_t i = thread; i < count.num_slots; i += threads) {
    slots[i] = from_acc<B>(i == count.slot ? 1.0f : 0.0f);
  }
}

// The chunk's streams, each at the chunk's first element (nullptr for a
// stream the op has not).
template <typename T, typename B>
struct ChunkStreams {
  T* primary;
  T* secondary;
  T* tertiary;
  B* segment;
};

template <typename T, typename B, typename Op>
DL_HOST_DEVICE void apply_scalar(const Op& op, const ChunkStreams<T, B>& at, int i) {
  T p{};
  T s{};
  T u{};
  B b{};
  if constexpr (Op::kReadsPrimary) p = at.primary[i];
  if constexpr (Op::kReadsSecondary) s = at.secondary[i];
  if constexpr (Tertiary<Op>::kReads) u = at.tertiary[i];
  if constexpr (Op::kReadsBuffer) b = at.segment[i];
  apply_op(op, p, s, u, b);
  if constexpr (Op::kWritesPrimary) at.primary[i] = p;
  if constexpr (Op::kWritesSecondary) at.secondary[i] = s;
  if constexpr (Tertiary<Op>::kWrites) at.tertiary[i] = u;
  if constexpr (Op::kWritesBuffer) at.segment[i] = b;
}

// Chunk-relative indices are 32-bit (fewer registers than 64-bit ones);
// sizes and positions in a tensor stay 64-bit.
static_assert(kChunkElements <= (int64_t{1} << 30), "a chunk is indexed with int");

// The n elements of one chunk at `at`, by thread `thread` of `threads`.
// With check_buffer, sets nonfinite when a value written to the buffer is
// not finite.
template <typename T, typename B, typename Op>
DL_HOST_DEVICE void run_chunk(const Op& op, const ChunkStreams<T, B>& at, int n, int thread,
                              int threads, bool check_buffer, bool& nonfinite) {
  using Acc = typename AccumulateType<T, B>::type;
  const bool probe = Op::kWritesBuffer && check_buffer;
  // A group of kN elements fills one 16-byte vector of the narrower type and
  // one or two of the wider; when four times narrower (double beside a
  // 16-bit type), two vectors of the wider and 8 bytes of the narrower, which
  // keeps those kernels within 64 registers.
  constexpr int kNarrow = static_cast<int>(sizeof(T) < sizeof(B) ? sizeof(T) : sizeof(B));
  constexpr int kWide = static_cast<int>(sizeof(T) < sizeof(B) ? sizeof(B) : sizeof(T));
  constexpr int kN = kVectorBytes / kNarrow < 2 * kVectorBytes / kWide ? kVectorBytes / kNarrow
                                                                       : 2 * kVectorBytes / kWide;
  constexpr int kReadBytes =
      kN * static_cast<int>(sizeof(T) * (int{Op::kReadsPrimary} + int{Op::kReadsSecondary} +
                                         int{Tertiary<Op>::kReads}) +
                            sizeof(B) * int{Op::kReadsBuffer});
  // Groups each thread has in flight: kBytesInFlight of reads, at most kMaxGroupsInFlight.
  constexpr int kByBytes = kBytesInFlight / kReadBytes > 1 ? kBytesInFlight / kReadBytes : 1;
  constexpr int kIlp = kByBytes < kMaxGroupsInFlight ? kByBytes : kMaxGroupsInFlight;
  bool vectorized = is_vector_aligned(at.primary) && is_vector_aligned(at.segment);
  if constexpr (kDepthOf<Op> >= 2) vectorized = vectorized && is_vector_aligned(at.secondary);
  if constexpr (kDepthOf<Op> == 3) vectorized = vectorized && is_vector_aligned(at.tertiary);
  int scalar_begin = 0;
  if (vectorized) {
    const int groups = n / kN;
    for (int first = thread; first < groups; first += threads * kIlp) {
      VectorRegisters<T, kN> p[kIlp];
      VectorRegisters<T, kN> s[kIlp];
      VectorRegisters<T, kN> u[kIlp];
      VectorRegisters<B, kN> b[kIlp];
      DL_PRAGMA_UNROLL
      for (int k = 0; k < kIlp; ++k) {
        const int i = (first + k * threads) * kN;
        if (first + k * threads < groups) {
          if constexpr (Op::kReadsPrimary) p[k].load(at.primary + i);
          if constexpr (Op::kReadsSecondary) s[k].load(at.secondary + i);
          if constexpr (Tertiary<Op>::kReads) u[k].load(at.tertiary + i);
          if constexpr (Op::kReadsBuffer) b[k].load(at.segment + i);
        }
      }
      DL_PRAGMA_UNROLL
      for (int k = 0; k < kIlp; ++k) {
        const int i = (first + k * threads) * kN;
        if (first + k * threads < groups) {
          DL_PRAGMA_UNROLL
          for (int e = 0; e < kN; ++e) {
            apply_op(op, p[k].element[e], s[k].element[e], u[k].element[e], b[k].element[e]);
            if (probe) nonfinite |= nonfinite_probe(to_acc<Acc>(b[k].element[e])) != Acc(0);
          }
          if constexpr (Op::kWritesPrimary) p[k].store(at.primary + i);
          if constexpr (Op::kWritesSecondary) s[k].store(at.secondary + i);
          if constexpr (Tertiary<Op>::kWrites) u[k].store(at.tertiary + i);
          if constexpr (Op::kWritesBuffer) b[k].store(at.segment + i);
        }
      }
    }
    scalar_begin = groups * kN;
  }
  for (int i = scalar_begin + thread; i < n; i += threads) {
    apply_scalar(op, at, i);
    if (probe) nonfinite |= nonfinite_probe(to_acc<Acc>(at.segment[i])) != Acc(0);
  }
}

// The tensor that holds chunk c: the first i >= lo with chunk_end[i] > c.
// Chunks only move forward in a block, so lo is the previous chunk's tensor.
template <int kDepth>
DL_HOST_DEVICE int64_t find_tensor(const TensorList<kDepth>& list, int64_t c, int64_t lo) {
  int64_t hi = list.num_tensors - 1;  // chunk_end[hi] = num_chunks > c
  while (lo < hi) {
    const int64_t mid = lo + (hi - lo) / 2;
    if (list.chunk_end[mid] > c) {
      hi = mid;
    } else {
      lo = mid + 1;
    }
  }
  return lo;
}

// What thread `at` of a launch does: block 0 writes the count slots, every
// thread its share of every chunk of its block, then raises the flag if it
// saw a non-finite value. A plain function of the parameters and the
// position, so the host harness runs it exactly as the device does.
template <typename T, typename B, typename Op>
DL_HOST_DEVICE void multi_tensor_thread(const KernelParams<Op>& params, const GridPosition& at) {
  const TensorList<kDepthOf<Op>>& list = params.list;
  const int thread = static_cast<int>(at.thread);
  const int threads = static_cast<int>(at.threads);
  if (at.block == 0) write_count_slots<B>(params.count, thread, threads);
  Op op = params.op;
  op.template prepare<B>();
  const bool check_buffer = params.count.flag != nullptr;
  bool nonfinite = false;
  int64_t t = 0;
  for (int64_t c = at.block; c < list.num_chunks; c += at.blocks) {
    t = find_tensor(list, c, t);
    const int64_t first_chunk = t == 0 ? 0 : list.chunk_end[t - 1];
    const int64_t begin = (c - first_chunk) * kChunkElements;
    const int64_t left = list.numel[t] - begin;
    const int n = static_cast<int>(left < kChunkElements ? left : kChunkElements);
    ChunkStreams<T, B> streams{reinterpret_cast<T*>(list.tensor[0][t]) + begin, nullptr, nullptr,
                               reinterpret_cast<B*>(list.segment[t]) + begin};
    if constexpr (kDepthOf<Op> >= 2) {
      streams.secondary = reinterpret_cast<T*>(list.tensor[1][t]) + begin;
    }
    if constexpr (kDepthOf<Op> == 3) {
      streams.tertiary = reinterpret_cast<T*>(list.tensor[2][t]) + begin;
    }
    run_chunk(op, streams, n, thread, threads, check_buffer, nonfinite);
  }
  // Every thread that saw a non-finite value stores 1 (the same value, so
  // racing stores agree); the flag was zeroed before the launches.
  if (nonfinite) *static_cast<B*>(params.count.flag) = from_acc<B>(1.0f);
}

// ---------------------------------------------------------------------------
// Planning, on the host.

// Calls launch(dtype, params, blocks) for each launch that op over layout's
// tensors takes: one group per storage dtype present (in DType code order),
// each split into as few launches as TensorList's capacity allows. lists
// holds one address per tensor of the layout for each stream (checked by the
// caller, as is the buffer). The first launch writes the count slots; when
// no tensor has elements and there are count slots, one launch of no
// tensors writes them. Each launch has min(its chunks, max_blocks) blocks.
// params is built in place and reused: launch must copy what it keeps.
template <typename Op, typename Launch>
void plan_launches(const Layout& layout,
                   const std::array<const std::vector<uintptr_t>*, kDepthOf<Op>>& lists,
                   uintptr_t buffer, const CountSlotWrite& count, const Op& op, int64_t max_blocks,
                   Launch&& launch) {
  constexpr int kDepth = kDepthOf<Op>;
  constexpr int64_t kCapacity = TensorList<kDepth>::kCapacity;
  static_assert(sizeof(KernelParams<Op>) <= kMaxKernelParamBytes,
                "an op's parameters must fit the header room of the kernel parameters");
  static_assert(sizeof(CountSlotWrite) + sizeof(Op) <= kParamHeaderBytes - 16, "header room");
  if (max_blocks < 1) {
    throw std::invalid_argument("max_blocks must be >= 1, got " + std::to_string(max_blocks));
  }
  const int64_t element_bytes = dtype_size(layout.buffer_dtype);
  KernelParams<Op> params;
  params.count = count;
  params.op = op;
  bool launched = false;
  auto flush = [&](DType dtype) {
    TensorList<kDepth>& list = params.list;
    list.num_chunks = list.num_tensors == 0 ? 0 : list.chunk_end[list.num_tensors - 1];
    const int64_t blocks = list.num_chunks < max_blocks ? list.num_chunks : max_blocks;
    launch(dtype, static_cast<const KernelParams<Op>&>(params), blocks > 0 ? blocks : 1);
    launched = true;
    params.count.slots = nullptr;  // written once, by the first launch
    list.num_tensors = 0;
  };
  params.list.num_tensors = 0;
  for (int32_t code = 0; is_valid_dtype(code); ++code) {
    const auto dtype = static_cast<DType>(code);
    for (int64_t i = 0; i < layout.num_tensors(); ++i) {
      if (layout.dtypes[i] != dtype || layout.numels[i] == 0) continue;
      TensorList<kDepth>& list = params.list;
      const int64_t n = list.num_tensors;
      for (int d = 0; d < kDepth; ++d) list.tensor[d][n] = (*lists[d])[i];
      list.segment[n] = buffer + static_cast<uintptr_t>(layout.offsets[i] * element_bytes);
      list.numel[n] = layout.numels[i];
      const int64_t chunks = (layout.numels[i] + kChunkElements - 1) / kChunkElements;
      list.chunk_end[n] = (n == 0 ? 0 : list.chunk_end[n - 1]) + chunks;
      list.num_tensors = n + 1;
      if (list.num_tensors == kCapacity) flush(dtype);
    }
    if (params.list.num_tensors > 0) flush(dtype);
  }
  if (!launched && count.slots != nullptr) flush(layout.buffer_dtype);
}

// Runs op over layout's tensors with a launcher, which provides
//   int64_t max_blocks() const;
//   void zero(void* address, int64_t bytes);  // in order with the launches
//   template <typename T, typename B, typename Op>
//   void launch(const KernelParams<Op>& params, int64_t blocks);
// The CUDA launcher enqueues on a stream; the host harness runs the grid.
template <typename Launcher, typename Op>
void run_multi_tensor(Launcher& launcher, const Layout& layout,
                      const std::array<const std::vector<uintptr_t>*, kDepthOf<Op>>& lists,
                      uintptr_t buffer, const CountSlotWrite& count, const Op& op) {
  // All-zero bits are 0 in every buffer type.
  if (count.flag != nullptr) launcher.zero(count.flag, dtype_size(layout.buffer_dtype));
  visit_dtype(layout.buffer_dtype, [&](auto buffer_tag) {
    using B = typename decltype(buffer_tag)::type;
    plan_launches(layout, lists, buffer, count, op, launcher.max_blocks(),
                  [&](DType dtype, const KernelParams<Op>& params, int64_t blocks) {
                    visit_dtype(dtype, [&](auto tensor_tag) {
                      using T = typename decltype(tensor_tag)::type;
                      launcher.template launch<T, B>(params, blocks);
                    });
                  });
  });
}

}  // namespace distlearn
