// The extension module runtime._scheduler: the error types, stage-template validation
// (csrc/scheduler/plan.h) and the round executor (csrc/round_bindings.cpp).
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "round_bindings.h"
#include "scheduler/cuda_launcher.h"
#include "scheduler/plan.h"

namespace py = pybind11;
using namespace avatar_sched;

namespace {

using PyDep = std::pair<std::string, int>;
using PyStage = std::tuple<std::string, int, std::vector<PyDep>>;  // (name, lane, deps)

std::vector<StageSpec> to_specs(const std::vector<PyStage>& stages) {
  std::vector<StageSpec> specs;
  for (const auto& [name, lane, deps] : stages) {
    StageSpec s{name, lane, {}};
    for (const auto& [dep, offset] : deps) s.deps.push_back(DepSpec{dep, offset});
    specs.push_back(std::move(s));
  }
  return specs;
}

py::list plan_deps(const Plan& plan) {
  py::list out;
  for (size_t i = 0; i < plan.stages.size(); ++i) {
    py::list deps;
    for (const Dep& d : plan.deps[i]) deps.append(py::make_tuple(plan.stages[d.stage].name, d.block_offset));
    out.append(deps);
  }
  return out;
}

void bind_plan(py::module_& m) {
  py::class_<Plan>(m, "Plan", "A validated stage graph: launch order, lanes and dependencies.")
      .def_property_readonly("launch_order", [](const Plan& p) {
        std::vector<std::string> names;
        for (const auto& s : p.stages) names.push_back(s.name);
        return names;
      })
      .def_property_readonly("lanes", [](const Plan& p) {
        std::vector<int> lanes;
        for (const auto& s : p.stages) lanes.push_back(s.lane);
        return lanes;
      })
      .def_property_readonly("deps", &plan_deps)
      .def_readonly("num_lanes", &Plan::num_lanes)
      .def_readonly("history", &Plan::history);
  m.def("make_plan",
        [](const std::vector<PyStage>& stages, int num_lanes) { return make_plan(to_specs(stages), num_lanes); },
        py::arg("stages"), py::arg("num_lanes"),
        "Validate (name, lane, [(dep, block_offset), ...]) stage specs; raises ValueError on a bad graph.");
}

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
  bind_plan(m);
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
