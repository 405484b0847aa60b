// The extension module runtime._scheduler: the error types and the round executor
// (csrc/round_bindings.cpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include "round_bindings.h"
#include "scheduler/cuda_launcher.h"

namespace py = pybind11;
using namespace avatar_sched;

namespace {

py::handle new_error(const char* name, const char* doc, PyObject* base) {
  return PyErr_NewExceptionWithDoc(name, doc, base, nullptr);
}

}  // namespace

PYBIND11_MODULE(_scheduler, m) {
  m.doc() = "Round executor (host threads / CUDA streams); see runtime/scheduler.py.";
  py::handle stage_error = new_error(
      "runtime._scheduler.StageError",
      "A task raised: .stage and .block name where, .group the failure domain, __cause__ is the original.",
      PyExc_RuntimeError);
  py::handle cancelled = new_error("runtime._scheduler.Cancelled",
                                   "The task was cancelled (its group was cancelled, or the runner closed) "
                                   "before it started.",
                                   stage_error.ptr());
  py::handle context_error = new_error(
      "runtime._scheduler.CudaContextError",
      "A device fault poisoned the CUDA context (sticky error, e.g. an illegal address): this process can run "
      "no more GPU work.",
      stage_error.ptr());
  m.attr("StageError") = stage_error;
  m.attr("Cancelled") = cancelled;
  m.attr("CudaContextError") = context_error;
  bind_rounds(m, context_error);
  py::list backends;
  backends.append("host");
#ifdef AVATAR_SCHED_WITH_CUDA
  backends.append("cuda");
  m.attr("cuda_runtime_version") = cuda_runtime_version();
#else
  m.attr("cuda_runtime_version") = py::none();
#endif
  m.attr("compiled_backends") = py::tuple(backends);
}
