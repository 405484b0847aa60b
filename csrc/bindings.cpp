// pybind11 layer over the framework-free scheduler headers: converts stage specs, wraps Python
// callables as stage functions, and maps the C++ errors onto Python exceptions. Every entry point
// that can block or take the scheduler's lock releases the GIL first (lock order: never wait for
// the scheduler lock while holding the GIL); stage callables take the GIL only around the call.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "scheduler/block.h"
#include "scheduler/cuda_backend.h"
#include "scheduler/host_backend.h"
#include "scheduler/plan.h"

namespace py = pybind11;
using namespace avatar_sched;

namespace {

using PyDep = std::pair<std::string, int>;
using PyStage = std::tuple<std::string, int, std::vector<PyDep>>;  // (name, lane, deps)

bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// Python objects owned by C++ containers that are copied and dropped on threads without the GIL:
// copying the shared_ptr never touches a Python refcount, and the last owner takes the GIL to
// release the object (or leaks it once the interpreter is going away and no GIL can be had).
template <typename T>
std::shared_ptr<T> share_with_gil(T* raw) {
  return std::shared_ptr<T>(raw, [](T* p) {
    if (interpreter_finalizing()) return;  // deliberate leak at interpreter teardown
    py::gil_scoped_acquire gil;
    delete p;
  });
}

// What a block carries: the `inputs` given to submit and what its stages returned.
struct BlockPayload {
  py::object inputs;
  py::dict results;
};

py::handle stage_error_type;
py::handle cancelled_type;

std::vector<StageSpec> to_specs(const std::vector<PyStage>& stages) {
  std::vector<StageSpec> specs;
  for (const auto& [name, lane, deps] : stages) {
    StageSpec s{name, lane, {}};
    for (const auto& [dep, offset] : deps) s.deps.push_back(DepSpec{dep, offset});
    specs.push_back(std::move(s));
  }
  return specs;
}

StageFn wrap_callable(py::handle fn, const std::string& stage, bool host) {
  auto shared = share_with_gil(new py::object(py::reinterpret_borrow<py::object>(fn)));
  return [shared, stage, host](const LaunchInfo& info) {
    // Asking for the GIL while the interpreter finalizes ends this thread; refuse instead.
    if (interpreter_finalizing()) throw std::runtime_error("Python interpreter is shutting down");
    py::gil_scoped_acquire gil;
    auto* payload = static_cast<BlockPayload*>(info.payload);
    py::object stream = host ? py::object(py::none()) : py::object(py::int_(info.stream));
    py::object result = (*shared)(info.block, payload->inputs, stream);
    if (!result.is_none()) payload->results[py::str(stage)] = result;
  };
}

// A stage's work: a callable, or a cudaGraphExec_t given as a (non-zero, non-bool) int.
StageWork to_work(py::handle work, const std::string& stage, bool host) {
  StageWork w;
  if (py::isinstance<py::int_>(work) && !py::isinstance<py::bool_>(work)) {
    w.graph_exec = work.cast<uintptr_t>();
    if (w.graph_exec == 0) throw py::value_error("stage '" + stage + "': graph exec handle is 0 (not instantiated?)");
    return w;
  }
  if (!PyCallable_Check(work.ptr()))
    throw py::type_error("stage '" + stage + "': work must be a callable or a cudaGraphExec_t handle (int), got " +
                         std::string(py::str(py::type::of(work).attr("__name__"))));
  w.fn = wrap_callable(work, stage, host);
  return w;
}

py::object cause_of(const Failure& f) {
  if (f.cause) {
    try {
      std::rethrow_exception(f.cause);
    } catch (py::error_already_set& e) {
      py::object value = e.value();
      // Before Python 3.12 the fetched traceback is not attached to the exception object.
      auto attached = py::reinterpret_steal<py::object>(PyException_GetTraceback(value.ptr()));
      if (!attached && e.trace()) PyException_SetTraceback(value.ptr(), e.trace().ptr());
      return value;
    } catch (...) {
    }
  }
  return py::reinterpret_borrow<py::object>(PyExc_RuntimeError)(f.message);
}

void raise_stage_error(const StageFailed& e) {
  const Failure& f = *e.failure;
  py::object cause = cause_of(f);
  std::string what = f.message;
  if (f.cause) {
    what = std::string(py::str(py::type::of(cause).attr("__name__")));
    std::string text = py::str(cause);
    if (!text.empty()) what += ": " + text;
  }
  std::string msg = "stage '" + f.stage + "' of block " + std::to_string(f.block) + " failed: " + what;
  if (e.waited_block != f.block)
    msg += " (block " + std::to_string(e.waited_block) + " depends on it and was abandoned)";
  py::object exc = py::reinterpret_borrow<py::object>(stage_error_type)(msg);
  exc.attr("stage") = f.stage;
  exc.attr("block") = f.block;
  exc.attr("waited_block") = e.waited_block;
  PyException_SetCause(exc.ptr(), cause.release().ptr());  // steals the reference
  PyErr_SetObject(stage_error_type.ptr(), exc.ptr());
}

void translate_errors(std::exception_ptr p) {
  try {
    if (p) std::rethrow_exception(p);
  } catch (const StageFailed& e) {
    try {
      raise_stage_error(e);
    } catch (py::error_already_set& inner) {
      inner.restore();
    }
  } catch (const Cancelled& e) {
    PyErr_SetString(cancelled_type.ptr(), e.what());
  } catch (const WaitTimeout& e) {
    PyErr_SetString(PyExc_TimeoutError, e.what());
  }
}

struct Handle {
  std::shared_ptr<Block> block;
  int64_t index() const { return block->index; }
};

class PyScheduler {
 public:
  PyScheduler(const std::string& backend, const std::vector<PyStage>& stages, const py::list& works,
              int num_lanes, int device, const std::vector<uintptr_t>& streams)
      : backend_name_(backend) {
    Plan plan = make_plan(to_specs(stages), num_lanes);
    if (py::len(works) != stages.size())
      throw py::value_error("got " + std::to_string(py::len(works)) + " works for " + std::to_string(stages.size()) +
                            " stages");
    std::vector<StageWork> work(plan.stages.size());
    for (size_t i = 0; i < stages.size(); ++i) {
      const std::string& name = std::get<0>(stages[i]);
      work[plan.index_of(name)] = to_work(works[i], name, backend == "host");
    }
    backend_ = make_backend(backend, std::move(plan), std::move(work), device, streams);
  }

  ~PyScheduler() {
    if (!backend_) return;
    py::gil_scoped_release nogil;  // workers may need the GIL to finish a running stage
    try {
      backend_->close();
    } catch (...) {
      // Dropped from inside one of its own stages: a worker cannot join itself. Leak the
      // backend rather than crash; closing explicitly (or `with Scheduler(...)`) avoids this.
      (void)backend_.release();
      return;
    }
    backend_.reset();
  }

  Handle submit(int64_t block, py::object inputs) {
    auto payload = share_with_gil(new BlockPayload{std::move(inputs), py::dict()});
    std::shared_ptr<void> opaque = payload;
    payload.reset();
    py::gil_scoped_release nogil;
    return Handle{backend().submit(block, std::move(opaque))};
  }

  py::dict wait(const Handle& h, std::optional<double> timeout) {
    if (timeout && *timeout < 0) throw py::value_error("timeout must be >= 0 or None");
    {
      py::gil_scoped_release nogil;
      backend().wait(h.block, timeout ? *timeout : -1.0);
    }
    return static_cast<BlockPayload*>(h.block->payload.get())->results;
  }

  bool done(const Handle& h) {
    py::gil_scoped_release nogil;
    return backend().done(h.block);
  }

  void cancel() {
    py::gil_scoped_release nogil;
    backend().cancel();
  }

  void reset() {
    py::gil_scoped_release nogil;
    backend().reset();
  }

  void close() {
    py::gil_scoped_release nogil;
    backend().close();
  }

  const std::string& backend_name() const { return backend_name_; }
  const Plan& plan() { return backend().plan(); }

 private:
  Backend& backend() {
    if (!backend_) throw std::runtime_error("scheduler is closed");
    return *backend_;
  }

  static std::unique_ptr<Backend> make_backend(const std::string& name, Plan plan, std::vector<StageWork> work,
                                               int device, const std::vector<uintptr_t>& streams) {
    if (name == "host") {
      if (!streams.empty()) throw py::value_error("streams= is for the cuda backend only");
      return std::make_unique<HostBackend>(std::move(plan), std::move(work));
    }
    if (name == "cuda") {
#ifdef AVATAR_SCHED_WITH_CUDA
      return make_cuda_backend(std::move(plan), std::move(work), CudaOptions{device, streams});
#else
      (void)device;
      throw py::value_error("the cuda backend was not compiled into this build (no CUDA toolkit at build time)");
#endif
    }
    throw py::value_error("unknown backend '" + name + "': expected 'host' or 'cuda'");
  }

  std::string backend_name_;
  std::unique_ptr<Backend> backend_;
};

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

void bind_scheduler(py::module_& m) {
  py::class_<Handle>(m, "BlockHandle", "A submitted block; pass it to Scheduler.wait().")
      .def_property_readonly("block", &Handle::index)
      .def("__repr__", [](const Handle& h) { return "<BlockHandle block=" + std::to_string(h.index()) + ">"; });

  py::class_<PyScheduler>(m, "Scheduler")
      .def(py::init<const std::string&, const std::vector<PyStage>&, const py::list&, int, int,
                    const std::vector<uintptr_t>&>(),
           py::arg("backend"), py::arg("stages"), py::arg("works"), py::arg("num_lanes"), py::arg("device") = -1,
           py::arg("streams") = std::vector<uintptr_t>{})
      .def("submit", &PyScheduler::submit, py::arg("block"), py::arg("inputs") = py::none())
      .def("wait", &PyScheduler::wait, py::arg("handle"), py::arg("timeout") = py::none())
      .def("done", &PyScheduler::done, py::arg("handle"))
      .def("cancel", &PyScheduler::cancel)
      .def("reset", &PyScheduler::reset)
      .def("close", &PyScheduler::close)
      .def_property_readonly("backend", &PyScheduler::backend_name)
      .def_property_readonly("plan", &PyScheduler::plan, py::return_value_policy::copy);
}

}  // namespace

PYBIND11_MODULE(_scheduler, m) {
  m.doc() = "Per-block stage scheduler (host threads / CUDA streams); see runtime/scheduler.py.";
  stage_error_type = PyErr_NewExceptionWithDoc(
      "runtime._scheduler.StageError",
      "A stage raised: .stage and .block name where, .waited_block the block that was waited on, "
      "__cause__ is the original exception.",
      PyExc_RuntimeError, nullptr);
  cancelled_type = PyErr_NewExceptionWithDoc("runtime._scheduler.Cancelled",
                                             "The block was cancelled (Scheduler.cancel/reset) before it completed.",
                                             PyExc_RuntimeError, nullptr);
  m.attr("StageError") = stage_error_type;
  m.attr("Cancelled") = cancelled_type;
  py::register_exception_translator(&translate_errors);
  bind_plan(m);
  bind_scheduler(m);
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
