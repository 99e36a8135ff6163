// pybind11 bindings of distlearn_cuda._C. Invalid arguments raise
// ValueError (std::invalid_argument), CUDA failures RuntimeError; the GIL is
// released while an op runs. The CUDA ops exist when setup.py built the
// CUDA flavor (DISTLEARN_WITH_CUDA).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>
#include <pybind11/stl_bind.h>

#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kernels/layout.h"
#include "../kernels/multi_tensor_engine.h"
#include "low_bit_ops.h"
#include "ops.h"

#ifdef DISTLEARN_WITH_NCCL
#include "nccl_comm.h"
#endif

#ifndef DISTLEARN_CUDA_ARCHS
#define DISTLEARN_CUDA_ARCHS ""
#endif

// Address lists cross into C++ as they are: converting a Python list of 161
// ints costs microseconds per call, so the hot paths keep an Addresses made
// once and pass it (a list still converts implicitly).
PYBIND11_MAKE_OPAQUE(distlearn::Addresses)

namespace py = pybind11;
using distlearn::Addresses;
using distlearn::Layout;

namespace {

// An unpack's agreement from its Python arguments (slots 0: none).
distlearn::Agreement agreement(uintptr_t slots, int64_t first, int64_t count) {
  return {reinterpret_cast<const void*>(slots), first, count};
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "Fused multi-tensor ops of distlearn_cuda.";
  m.attr("kSegmentAlign") = distlearn::kSegmentAlign;
  // The CUDA engine's limits (kernels/multi_tensor_engine.h), for tests and
  // benchmarks: tensors one launch carries for one stream and for two (the
  // EA blends'), and elements per chunk.
  m.attr("kLaunchCapacity") = distlearn::TensorList<1>::kCapacity;
  m.attr("kLaunchCapacityPaired") = distlearn::TensorList<2>::kCapacity;
  m.attr("kChunkElements") = distlearn::kChunkElements;
#ifdef DISTLEARN_WITH_CUDA
  m.attr("has_cuda") = true;
#else
  m.attr("has_cuda") = false;
#endif
#ifdef DISTLEARN_WITH_NCCL
  m.attr("has_nccl") = true;
  // NCCL_VERSION_CODE of the NCCL ABI declared in nccl_api.h (not a header's).
  m.attr("nccl_abi_version") = distlearn::kNcclAbiVersion;
#else
  m.attr("has_nccl") = false;
  m.attr("nccl_abi_version") = py::none();
#endif
  // The GPU architectures compiled in, as nvcc's -gencode targets ("" without CUDA).
  m.attr("cuda_archs") = DISTLEARN_CUDA_ARCHS;

  py::class_<Layout>(m, "Layout",
                     "Placement of a list of tensors in one flat buffer, plus count slots.")
      .def(py::init(&distlearn::make_layout), py::arg("numels"), py::arg("dtypes"),
           py::arg("buffer_dtype"), py::arg("count_slots"))
      .def_property_readonly("num_tensors", &Layout::num_tensors)
      .def_property_readonly("offsets", [](const Layout& l) { return l.offsets; })
      .def_property_readonly("numels", [](const Layout& l) { return l.numels; })
      .def_readonly("count_offset", &Layout::count_offset)
      .def_readonly("count_slots", &Layout::count_slots)
      .def_readonly("flag_offset", &Layout::flag_offset)
      .def_readonly("buffer_numel", &Layout::buffer_numel);

  py::bind_vector<Addresses>(m, "Addresses",
                             "Tensor addresses, made once from a list and passed to the ops.");
  py::implicitly_convertible<py::list, Addresses>();

  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("pack", &distlearn::pack_cpu, py::arg("layout"), py::arg("tensors"), py::arg("buffer"),
        py::arg("count_slot"), py::arg("num_threads"), release,
        "buffer <- tensors (cast to the buffer type); count slot `count_slot` <- 1, others 0; "
        "flag <- 1 if a packed value is a NaN or an infinity, else 0.");
  m.def(
      "unpack",
      [](const Layout& layout, const Addresses& tensors, uintptr_t buffer, bool normalize,
         int num_threads, bool skip_nonfinite, uintptr_t agree_slots, int64_t agree_first,
         int64_t agree_count) {
        distlearn::unpack_cpu(layout, tensors, buffer, normalize, num_threads, skip_nonfinite,
                              agreement(agree_slots, agree_first, agree_count));
      },
      py::arg("layout"), py::arg("tensors"), py::arg("buffer"), py::arg("normalize"),
      py::arg("num_threads"), py::arg("skip_nonfinite") = false, py::arg("agree_slots") = 0,
      py::arg("agree_first") = 0, py::arg("agree_count") = 0, release,
      "tensors <- buffer * (1 / sum of count slots if normalize else 1); zeros instead when "
      "skip_nonfinite and the flag is set, or when agree_slots (the count slots of a buffer of "
      "the same layout; 0: none) do not hold every contributor in slots "
      "[agree_first, agree_first + agree_count).");
  m.def("ea_blend", &distlearn::ea_blend_cpu, py::arg("layout"), py::arg("params"),
        py::arg("centers"), py::arg("buffer"), py::arg("alpha"), py::arg("count_slot"),
        py::arg("num_threads"), py::arg("catch_up") = false, release,
        "buffer <- delta = alpha * (params - centers); params -= delta; count slots and flag "
        "as pack. catch_up: first centers += buffer (the previous round's sum), same pass.");
  m.def("center_update", &distlearn::center_update_cpu, py::arg("layout"), py::arg("centers"),
        py::arg("buffer"), py::arg("num_threads"), py::arg("skip_nonfinite") = false, release,
        "centers += buffer; nothing when skip_nonfinite and the flag is set.");
  m.def("outer_gradient", &distlearn::outer_gradient_cpu, py::arg("layout"), py::arg("locals"),
        py::arg("globals"), py::arg("buffer"), py::arg("count_slot"), py::arg("num_threads"),
        release,
        "buffer <- globals - locals (DiLoCo's outer gradient); count slots and flag as pack.");
  m.def(
      "outer_step",
      [](const Layout& layout, const Addresses& locals, const Addresses& globals,
         const Addresses& momenta, uintptr_t buffer, double lr, double momentum, bool nesterov,
         double mix, int num_threads, bool skip_nonfinite) {
        distlearn::outer_step_cpu(layout, locals, globals, momenta, buffer,
                                  distlearn::OuterSettings{lr, momentum, nesterov, mix},
                                  num_threads, skip_nonfinite);
      },
      py::arg("layout"), py::arg("locals"), py::arg("globals"), py::arg("momenta"),
      py::arg("buffer"), py::arg("lr"), py::arg("momentum"), py::arg("nesterov"), py::arg("mix"),
      py::arg("num_threads"), py::arg("skip_nonfinite") = false, release,
      "DiLoCo's outer step: the mean outer gradient (buffer / contributors) moves globals by "
      "torch.optim.SGD(lr, momentum, nesterov) with momenta as its buffers; locals <- mix * "
      "locals + (1 - mix) * globals. No contributor: nothing changes; skip_nonfinite and the "
      "flag set: locals <- globals, nothing else.");

  m.def("quantize_blocks", &distlearn::quantize_blocks_cpu, py::arg("format"), py::arg("values"),
        py::arg("n"), py::arg("block"), py::arg("codes"), py::arg("scales"), release,
        "float32 values -> a byte code each and a float32 scale per block (format: 0 int8, "
        "1 int4, 2 fp8 e4m3, 3 mxfp4; issue 24's codecs, kernels/low_bit.h).");
  m.def("dequantize_blocks", &distlearn::dequantize_blocks_cpu, py::arg("format"), py::arg("codes"),
        py::arg("scales"), py::arg("n"), py::arg("block"), py::arg("out"), release,
        "codes and block scales -> float32 values (quantize_blocks' inverse).");

  using distlearn::LowBitShape;
  py::class_<LowBitShape>(m, "LowBitShape",
                          "The shape of a low-bit sum (kernels/low_bit_sum.h): world messages "
                          "of blocks_per_shard blocks of block values each, in format (0 int8, "
                          "1 int4, 2 fp8 e4m3, 3 mxfp4).")
      .def(py::init(&distlearn::low_bit_shape), py::arg("format"), py::arg("block"),
           py::arg("blocks_per_shard"), py::arg("world"))
      .def_property_readonly("shard", &LowBitShape::shard, "Values per message.")
      .def_property_readonly("message_bytes", &LowBitShape::message_bytes,
                             "Bytes of one message: its codes, then its scales.");
  m.def("low_bit_encode", &distlearn::low_bit_encode_cpu, py::arg("shape"), py::arg("values"),
        py::arg("residual"), py::arg("next_residual"), py::arg("n"), py::arg("messages"),
        py::arg("num_threads"), release,
        "n float32 values (+ residual, unless it is 0) -> shape.world messages, one pass; "
        "next_residual (0 with residual) <- what the quantization lost.");
  m.def("low_bit_sum", &distlearn::low_bit_sum_cpu, py::arg("shape"), py::arg("received"),
        py::arg("summed"), py::arg("num_threads"), release,
        "shape.world messages of one shard -> its sum (float32, in rank order) as one message.");
  m.def("low_bit_decode", &distlearn::low_bit_decode_cpu, py::arg("shape"), py::arg("gathered"),
        py::arg("n"), py::arg("values"), py::arg("num_threads"), release,
        "shape.world messages -> n float32 values.");

#ifdef DISTLEARN_WITH_CUDA
  m.def("cuda_build_version", &distlearn::cuda_build_version,
        "CUDART_VERSION of the toolkit the extension was built with.");
  m.def("pack_cuda", &distlearn::pack_cuda, py::arg("layout"), py::arg("tensors"),
        py::arg("buffer"), py::arg("count_slot"), py::arg("stream"), release,
        "pack on CUDA tensors of the current device, enqueued on stream (a cudaStream_t "
        "address); one launch per tensor dtype (more for very long lists).");
  m.def(
      "unpack_cuda",
      [](const Layout& layout, const Addresses& tensors, uintptr_t buffer, bool normalize,
         uintptr_t stream, bool skip_nonfinite, uintptr_t agree_slots, int64_t agree_first,
         int64_t agree_count) {
        distlearn::unpack_cuda(layout, tensors, buffer, normalize, stream, skip_nonfinite,
                               agreement(agree_slots, agree_first, agree_count));
      },
      py::arg("layout"), py::arg("tensors"), py::arg("buffer"), py::arg("normalize"),
      py::arg("stream"), py::arg("skip_nonfinite") = false, py::arg("agree_slots") = 0,
      py::arg("agree_first") = 0, py::arg("agree_count") = 0, release,
      "unpack on CUDA tensors; the count, the flag and the agreement are read on the device.");
  m.def("ea_blend_cuda", &distlearn::ea_blend_cuda, py::arg("layout"), py::arg("params"),
        py::arg("centers"), py::arg("buffer"), py::arg("alpha"), py::arg("count_slot"),
        py::arg("stream"), py::arg("catch_up") = false, release, "ea_blend on CUDA tensors.");
  m.def("center_update_cuda", &distlearn::center_update_cuda, py::arg("layout"), py::arg("centers"),
        py::arg("buffer"), py::arg("stream"), py::arg("skip_nonfinite") = false, release,
        "center_update on CUDA tensors.");
  m.def("outer_gradient_cuda", &distlearn::outer_gradient_cuda, py::arg("layout"),
        py::arg("locals"), py::arg("globals"), py::arg("buffer"), py::arg("count_slot"),
        py::arg("stream"), release, "outer_gradient on CUDA tensors.");
  m.def(
      "outer_step_cuda",
      [](const Layout& layout, const Addresses& locals, const Addresses& globals,
         const Addresses& momenta, uintptr_t buffer, double lr, double momentum, bool nesterov,
         double mix, uintptr_t stream, bool skip_nonfinite) {
        distlearn::outer_step_cuda(layout, locals, globals, momenta, buffer,
                                   distlearn::OuterSettings{lr, momentum, nesterov, mix}, stream,
                                   skip_nonfinite);
      },
      py::arg("layout"), py::arg("locals"), py::arg("globals"), py::arg("momenta"),
      py::arg("buffer"), py::arg("lr"), py::arg("momentum"), py::arg("nesterov"), py::arg("mix"),
      py::arg("stream"), py::arg("skip_nonfinite") = false, release,
      "outer_step on CUDA tensors; the count and the flag are read on the device.");
  m.def("low_bit_encode_cuda", &distlearn::low_bit_encode_cuda, py::arg("shape"), py::arg("values"),
        py::arg("residual"), py::arg("next_residual"), py::arg("n"), py::arg("messages"),
        py::arg("stream"), release, "low_bit_encode on device addresses.");
  m.def("low_bit_sum_cuda", &distlearn::low_bit_sum_cuda, py::arg("shape"), py::arg("received"),
        py::arg("summed"), py::arg("stream"), release, "low_bit_sum on device addresses.");
  m.def("low_bit_decode_cuda", &distlearn::low_bit_decode_cuda, py::arg("shape"),
        py::arg("gathered"), py::arg("n"), py::arg("values"), py::arg("stream"), release,
        "low_bit_decode on device addresses.");
#endif

#ifdef DISTLEARN_WITH_NCCL
  using distlearn::NcclCommunicator;
  m.def(
      "nccl_load",
      [](const std::vector<std::string>& candidates) {
        const distlearn::NcclApi& api = distlearn::load_nccl(candidates);
        return py::make_tuple(api.version, api.path);
      },
      py::arg("candidates"),
      "Loads NCCL from the first candidate that works (\"\" = the copy already in the "
      "process), once per process; returns (version, path).");
  m.def(
      "nccl_loaded",
      []() -> py::object {
        const distlearn::NcclApi* api = distlearn::loaded_nccl();
        if (api == nullptr) return py::none();
        return py::make_tuple(api->version, api->path);
      },
      "(version, path) of the loaded NCCL, or None.");
  m.def(
      "nccl_error_string",
      [](int code) {
        const distlearn::NcclApi* api = distlearn::loaded_nccl();
        if (api == nullptr) throw std::runtime_error("NCCL is not loaded");
        return std::string(api->get_error_string(static_cast<distlearn::ncclResult_t>(code)));
      },
      py::arg("code"), "NCCL's own message for an ncclResult_t.");
  py::class_<NcclCommunicator, std::shared_ptr<NcclCommunicator>>(
      m, "NcclCommunicator",
      "One NCCL communicator; collectives enqueue on a given stream, each with its deadline.")
      .def(py::init<const std::string&, int, int, int, double>(), py::arg("unique_id"),
           py::arg("nranks"), py::arg("rank"), py::arg("device"), py::arg("init_timeout"), release)
      .def_static("unique_id", []() { return py::bytes(NcclCommunicator::unique_id()); })
      .def(
          "all_reduce_sum",
          [](NcclCommunicator& comm, uintptr_t buffer, int64_t count, int32_t dtype,
             uintptr_t stream, double timeout) {
            if (!distlearn::is_valid_dtype(dtype)) {
              throw std::invalid_argument("dtype: unknown code " + std::to_string(dtype));
            }
            comm.all_reduce_sum(buffer, count, static_cast<distlearn::DType>(dtype), stream,
                                timeout);
          },
          py::arg("buffer"), py::arg("count"), py::arg("dtype"), py::arg("stream"),
          py::arg("timeout"), release)
      .def("all_to_all", &NcclCommunicator::all_to_all, py::arg("send"), py::arg("recv"),
           py::arg("bytes"), py::arg("stream"), py::arg("timeout"), release,
           "recv's block i <- rank i's send block rank (bytes per block; one group of "
           "ncclSend and ncclRecv with every rank).")
      .def("all_gather", &NcclCommunicator::all_gather, py::arg("send"), py::arg("recv"),
           py::arg("bytes"), py::arg("stream"), py::arg("timeout"), release,
           "recv's block i <- rank i's send (bytes per block; ncclAllGather).")
      .def(
          "broadcast",
          [](NcclCommunicator& comm, uintptr_t buffer, int64_t count, int32_t dtype, int root,
             uintptr_t stream, double timeout) {
            if (!distlearn::is_valid_dtype(dtype)) {
              throw std::invalid_argument("dtype: unknown code " + std::to_string(dtype));
            }
            comm.broadcast(buffer, count, static_cast<distlearn::DType>(dtype), root, stream,
                           timeout);
          },
          py::arg("buffer"), py::arg("count"), py::arg("dtype"), py::arg("root"), py::arg("stream"),
          py::arg("timeout"), release)
      // Every call that takes the communicator's mutex releases the GIL: the
      // watchdog may hold the mutex through a slow abort, and a waiting call
      // that kept the GIL would stall every Python thread (the elastic
      // heartbeat included, which would get a healthy rank declared dead).
      .def("check", &NcclCommunicator::check, release,
           "Raises the failure the watchdog recorded, if any.")
      .def("abort", &NcclCommunicator::abort, release)
      .def("close", &NcclCommunicator::close, py::arg("timeout") = 0.0, release,
           "Stops the watchdog, waits for the collectives in flight and ncclCommFinalize "
           "(timeout: its bound; 0: the longest collective timeout given), destroys; aborts "
           "on failure. Returns how it ended.")
      .def("keep_for_shrink", &NcclCommunicator::keep_for_shrink, release,
           "On a failure the watchdog revokes (where NCCL has ncclCommRevoke) instead of "
           "aborting, so that the remaining ranks can shrink this communicator.")
      .def("shrink", &NcclCommunicator::shrink, py::arg("excluded"), py::arg("init_timeout"),
           release,
           "A communicator over the ranks not in `excluded`, by ncclCommShrink (collective over "
           "them, bounded by init_timeout); this one ends, whether or not it succeeds.")
      .def_property_readonly("can_shrink", py::cpp_function(&NcclCommunicator::can_shrink, release))
      .def_property_readonly("revoked", py::cpp_function(&NcclCommunicator::revoked, release))
      .def_property_readonly("closed", py::cpp_function(&NcclCommunicator::closed, release))
      .def_property_readonly("usable", py::cpp_function(&NcclCommunicator::usable, release))
      .def_property_readonly("in_flight", py::cpp_function(&NcclCommunicator::in_flight, release))
      .def_property_readonly("enqueues_in_progress",
                             py::cpp_function(&NcclCommunicator::enqueues_in_progress, release))
      .def_property_readonly("nonblocking", &NcclCommunicator::nonblocking)
      .def_property_readonly("rank", &NcclCommunicator::rank)
      .def_property_readonly("nranks", &NcclCommunicator::nranks)
      .def_property_readonly("device", &NcclCommunicator::device);
#endif
}
