// The kernels as a Python module.  A pybind11 call costs about 1 µs less than the same function
// registered as a torch.ops operator (whose arguments are parsed against its schema): measured,
// and felt by small batch-1 calls.  The GIL is released while a kernel runs.
#include <torch/python.h>

#include "ops.h"

namespace py = pybind11;

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  const auto nogil = py::call_guard<py::gil_scoped_release>();
  m.def("avg_forward", &anypool::avg_forward, py::arg("x"), py::arg("output_size"), py::arg("sizes") = py::none(), nogil);
  m.def("avg_backward", &anypool::avg_backward, py::arg("grad_out"), py::arg("input_size"),
        py::arg("sizes") = py::none(), nogil);
  m.def("max_forward", &anypool::max_forward, py::arg("x"), py::arg("output_size"), py::arg("sizes") = py::none(), nogil);
  m.def("max_backward", &anypool::max_backward, py::arg("grad_out"), py::arg("indices"), py::arg("input_size"),
        py::arg("sizes") = py::none(), nogil);
  m.def("lp_forward", &anypool::lp_forward, nogil);
  m.def("lp_backward", &anypool::lp_backward, nogil);
  m.def("gem_forward", &anypool::gem_forward, nogil);
  m.def("gem_backward", &anypool::gem_backward, nogil);
  m.def("avgmax_forward", &anypool::avgmax_forward, nogil);
  m.def("avgmax_backward", &anypool::avgmax_backward, nogil);
  m.def("bins", &anypool::bins, "bins.h's tables of one axis (start, end, cover first, cover last), padded with -1");
  m.def("bin_at", &anypool::bin_at, "bins.h's four values at k");
}
