// The one registration file of the flashops extension: every family's kernels become functions of one Python
// module (flashops._C when built ahead of time, a JIT-built module of the same content otherwise; see
// flashops/_ext.py). Functions take and return tensors (None for an absent optional) with the signatures of
// the family's Python backends, so a family's custom ops call the extension like any other backend. The GIL
// is released while a kernel runs.

#include <torch/csrc/utils/pybind.h>

#include "ssm/scan_cpu.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "flashops C++ kernels";
  const auto no_gil = py::call_guard<py::gil_scoped_release>();

  // ssm: the scans (csrc/ssm/scan_cpu.cpp)
  m.def("linear_scan_fwd", &flashops::ssm::linear_scan_fwd, "linear scan forward (CPU)", py::arg("a"),
        py::arg("b"), py::arg("initial_state"), py::arg("reverse"), no_gil);
  m.def("linear_scan_bwd", &flashops::ssm::linear_scan_bwd, "linear scan backward (CPU)", py::arg("dh"),
        py::arg("a"), py::arg("h"), py::arg("initial_state"), py::arg("reverse"), no_gil);
  m.def("selective_scan_fwd", &flashops::ssm::selective_scan_fwd, "selective scan forward (CPU)", py::arg("u"),
        py::arg("delta"), py::arg("A"), py::arg("B"), py::arg("C"), py::arg("D"), py::arg("z"),
        py::arg("delta_bias"), py::arg("initial_state"), py::arg("delta_softplus"), no_gil);
  m.def("selective_scan_bwd", &flashops::ssm::selective_scan_bwd, "selective scan backward (CPU)",
        py::arg("dout"), py::arg("dlast"), py::arg("u"), py::arg("delta"), py::arg("A"), py::arg("B"),
        py::arg("C"), py::arg("D"), py::arg("z"), py::arg("delta_bias"), py::arg("initial_state"),
        py::arg("saved"), py::arg("delta_softplus"), no_gil);
}
