// pybind11 bindings of distlearn_cuda._C. Invalid arguments raise
// ValueError (std::invalid_argument); the GIL is released while an op runs.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "../kernels/layout.h"
#include "ops.h"

namespace py = pybind11;
using distlearn::Addresses;
using distlearn::Layout;

PYBIND11_MODULE(_C, m) {
  m.doc() = "Fused multi-tensor ops of distlearn_cuda (CPU flavor).";
  m.attr("kSegmentAlign") = distlearn::kSegmentAlign;
  m.attr("has_cuda") = false;

  py::class_<Layout>(m, "Layout",
                     "Placement of a list of tensors in one flat buffer, plus count slots.")
      .def(py::init(&distlearn::make_layout), py::arg("numels"), py::arg("dtypes"),
           py::arg("buffer_dtype"), py::arg("count_slots"))
      .def_property_readonly("num_tensors", &Layout::num_tensors)
      .def_property_readonly("offsets", [](const Layout& l) { return l.offsets; })
      .def_property_readonly("numels", [](const Layout& l) { return l.numels; })
      .def_readonly("count_offset", &Layout::count_offset)
      .def_readonly("count_slots", &Layout::count_slots)
      .def_readonly("buffer_numel", &Layout::buffer_numel);

  const auto release = py::call_guard<py::gil_scoped_release>();
  m.def("pack", &distlearn::pack_cpu, py::arg("layout"), py::arg("tensors"), py::arg("buffer"),
        py::arg("count_slot"), py::arg("num_threads"), release,
        "buffer <- tensors (cast to the buffer type); count slot `count_slot` <- 1, others 0.");
  m.def("unpack", &distlearn::unpack_cpu, py::arg("layout"), py::arg("tensors"), py::arg("buffer"),
        py::arg("normalize"), py::arg("num_threads"), release,
        "tensors <- buffer * (1 / sum of count slots if normalize else 1).");
  m.def("ea_blend", &distlearn::ea_blend_cpu, py::arg("layout"), py::arg("params"),
        py::arg("centers"), py::arg("buffer"), py::arg("alpha"), py::arg("count_slot"),
        py::arg("num_threads"), release,
        "buffer <- delta = alpha * (params - centers); params -= delta; count slots as pack.");
  m.def("center_update", &distlearn::center_update_cpu, py::arg("layout"), py::arg("centers"),
        py::arg("buffer"), py::arg("num_threads"), release, "centers += buffer.");
}
