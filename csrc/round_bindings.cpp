// pybind11 layer of the round executor (csrc/scheduler/round.h): converts task tuples, wraps
// Python callables, hands failures back as plain tuples (runtime/scheduler.py makes the Python
// exceptions). Every entry point that can block releases the GIL first (lock order: never wait
// for the executor lock while holding the GIL); task functions take the GIL only around the call.
#include "round_bindings.h"

#include <pybind11/stl.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

#include "scheduler/cuda_launcher.h"
#include "scheduler/round.h"

namespace py = pybind11;

namespace avatar_sched {
namespace {

bool interpreter_finalizing() {
#if PY_VERSION_HEX >= 0x030D0000
  return Py_IsFinalizing() != 0;
#else
  return _Py_IsFinalizing() != 0;
#endif
}

// Python objects owned by C++ structures that are copied and dropped on threads without the GIL:
// the last owner takes the GIL to release it (or leaks it while the interpreter goes away).
std::shared_ptr<py::object> share_with_gil(py::object obj) {
  return std::shared_ptr<py::object>(new py::object(std::move(obj)), [](py::object* p) {
    if (interpreter_finalizing()) return;  // deliberate leak at interpreter teardown
    py::gil_scoped_acquire gil;
    delete p;
  });
}

struct RoundHandle {
  std::shared_ptr<Round> round;
};

// (name, lane, group, block, deps, external [(handle, task)], fn or None, graph exec int)
using PyTask = std::tuple<std::string, int, int, int64_t, std::vector<int>, std::vector<std::pair<RoundHandle, int>>,
                          py::object, uintptr_t>;

std::function<void(uintptr_t)> wrap_fn(py::object fn, bool host) {
  auto shared = share_with_gil(std::move(fn));
  return [shared, host](uintptr_t stream) {
    // Asking for the GIL while the interpreter finalizes ends this thread; refuse instead.
    if (interpreter_finalizing()) throw std::runtime_error("Python interpreter is shutting down");
    py::gil_scoped_acquire gil;
    (*shared)(host ? py::object(py::none()) : py::object(py::int_(stream)));
  };
}

TaskSpec to_spec(const PyTask& t, bool host) {
  const auto& [name, lane, group, block, deps, external, fn, graph] = t;
  TaskSpec s{name, lane, group, block, deps, {}, {}, graph};
  for (const auto& [handle, task] : external) s.external.push_back(ExternalDep{handle.round, task});
  if (!fn.is_none()) s.fn = wrap_fn(fn, host);
  return s;
}

py::object cause_of(const Failure& f) {
  if (!f.cause) return py::none();
  try {
    std::rethrow_exception(f.cause);
  } catch (py::error_already_set& e) {
    py::object value = e.value();
    // Before Python 3.12 the fetched traceback is not attached to the exception object.
    auto attached = py::reinterpret_steal<py::object>(PyException_GetTraceback(value.ptr()));
    if (!attached && e.trace()) PyException_SetTraceback(value.ptr(), e.trace().ptr());
    return value;
  } catch (...) {
    return py::none();
  }
}

const char* kind_name(Failure::Kind k) {
  switch (k) {
    case Failure::Raised: return "raised";
    case Failure::DeviceFault: return "device";
    case Failure::Cancelled: return "cancelled";
  }
  return "raised";
}

class PyRoundRunner {
 public:
  PyRoundRunner(const std::string& backend, int num_lanes, int device, const std::vector<uintptr_t>& streams)
      : host_(backend == "host") {
    executor_ = std::make_unique<RoundExecutor>(num_lanes, make_launcher(backend, num_lanes, device, streams));
  }

  ~PyRoundRunner() {
    if (!executor_) return;
    py::gil_scoped_release nogil;  // lanes may need the GIL to finish a running task
    try {
      executor_->close();
    } catch (...) {
      // Dropped from inside one of its own tasks: a lane cannot join itself; leak, do not crash.
      (void)executor_.release();
      return;
    }
    executor_.reset();
  }

  RoundHandle submit(const std::vector<PyTask>& tasks, py::object keepalive) {
    std::vector<TaskSpec> specs;
    specs.reserve(tasks.size());
    for (const PyTask& t : tasks) specs.push_back(to_spec(t, host_));
    std::shared_ptr<void> keep = share_with_gil(std::move(keepalive));
    py::gil_scoped_release nogil;
    return RoundHandle{executor().submit(std::move(specs), std::move(keep))};
  }

  // [(group, stage, block, kind, message, cause)] for the failed groups.
  py::list wait(const RoundHandle& h, std::optional<double> timeout) {
    if (timeout && *timeout < 0) throw py::value_error("timeout must be >= 0 or None");
    {
      py::gil_scoped_release nogil;
      executor().wait(h.round, timeout ? *timeout : -1.0);
    }
    return failures(*h.round);
  }

  bool done(const RoundHandle& h) {
    py::gil_scoped_release nogil;
    return executor().done(h.round);
  }

  void cancel(int group) {
    py::gil_scoped_release nogil;
    executor().cancel(group);
  }

  void close() {
    py::gil_scoped_release nogil;
    executor().close();
  }

  std::string backend() { return executor().launcher_name(); }
  bool poisoned() { return executor().poisoned(); }

 private:
  RoundExecutor& executor() {
    if (!executor_) throw std::runtime_error("round runner is closed");
    return *executor_;
  }

  static py::list failures(const Round& r) {
    py::list out;
    for (const auto& [group, entry] : r.failed) {
      const Failure& f = *entry.second;
      out.append(py::make_tuple(group, f.stage, f.block, kind_name(f.kind), f.message, cause_of(f)));
    }
    return out;
  }

  static std::unique_ptr<Launcher> make_launcher(const std::string& name, int num_lanes, int device,
                                                 const std::vector<uintptr_t>& streams) {
    if (name == "host") {
      if (!streams.empty()) throw py::value_error("streams= is for the cuda backend only");
      return std::make_unique<HostLauncher>();
    }
    if (name == "cuda") {
#ifdef AVATAR_SCHED_WITH_CUDA
      return make_cuda_launcher(num_lanes, CudaOptions{device, streams});
#else
      (void)num_lanes;
      (void)device;
      throw py::value_error("the cuda backend was not compiled into this build (no CUDA toolkit at build time)");
#endif
    }
    throw py::value_error("unknown backend '" + name + "': expected 'host' or 'cuda'");
  }

  bool host_;
  std::unique_ptr<RoundExecutor> executor_;
};

}  // namespace

void bind_rounds(py::module_& m, py::handle context_error_type) {
  static py::handle context_error = context_error_type;
  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const WaitTimeout& e) {
      PyErr_SetString(PyExc_TimeoutError, e.what());
    } catch (const ContextPoisoned& e) {
      PyErr_SetString(context_error.ptr(), e.what());
    }
  });
  py::class_<RoundHandle>(m, "_Round");
  py::class_<PyRoundRunner>(m, "RoundExecutor")
      .def(py::init<const std::string&, int, int, const std::vector<uintptr_t>&>(), py::arg("backend"),
           py::arg("num_lanes"), py::arg("device") = -1, py::arg("streams") = std::vector<uintptr_t>{})
      .def("submit", &PyRoundRunner::submit, py::arg("tasks"), py::arg("keepalive") = py::none())
      .def("wait", &PyRoundRunner::wait, py::arg("round"), py::arg("timeout") = py::none())
      .def("done", &PyRoundRunner::done, py::arg("round"))
      .def("cancel", &PyRoundRunner::cancel, py::arg("group"))
      .def("close", &PyRoundRunner::close)
      .def_property_readonly("backend", &PyRoundRunner::backend)
      .def_property_readonly("poisoned", &PyRoundRunner::poisoned);
  m.def("nvtx_library", [] { return nvtx_api().source; },
        "The NVTX library the task ranges go to ('' when AVATAR_NVTX is not 1 or none was found).");
}

}  // namespace avatar_sched
