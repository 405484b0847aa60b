// CUDA launcher of the round executor (contract: csrc/scheduler/cuda_launcher.h). Plain C++
// against the CUDA runtime API: no kernels here, so the host compiler builds it.
//
// Each lane thread of the executor launches its tasks on the lane's stream in FIFO order: first a
// cudaStreamWaitEvent per dependency that ran on another lane (same-lane order is the stream's
// own), then the graph exec (cudaGraphLaunch) or the task function handed the stream, then a
// cudaEventRecord. A task counts as settled once launched; only wait() synchronises, on the
// round's events. Python is involved only for tasks that are functions, not for graphs.
#include "scheduler/cuda_launcher.h"

#include <cuda_runtime_api.h>

#include <chrono>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

namespace avatar_sched {
namespace {

std::string cuda_error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

// Errors that leave the context unusable: every later call in the process fails with them.
bool is_sticky(cudaError_t err) {
  switch (err) {
    case cudaErrorIllegalAddress:
    case cudaErrorLaunchFailure:
    case cudaErrorIllegalInstruction:
    case cudaErrorMisalignedAddress:
    case cudaErrorInvalidAddressSpace:
    case cudaErrorInvalidPc:
    case cudaErrorHardwareStackError:
    case cudaErrorAssert:
    case cudaErrorLaunchTimeout:
    case cudaErrorECCUncorrectable:
      return true;
    default:
      return false;
  }
}

void check_cuda(cudaError_t err, const std::string& what) {
  if (err == cudaSuccess) return;
  if (is_sticky(err)) throw ContextPoisoned(what + ": " + cuda_error_text(err));
  throw std::runtime_error(what + ": " + cuda_error_text(err));
}

// Makes `device` current for a scope (lane threads and waiters may be any thread).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check_cuda(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ != device) check_cuda(cudaSetDevice(device), "cudaSetDevice");
    else previous_ = -1;
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

// Events are recycled: a round gives its events back when it is destroyed. Re-recording an event
// whose earlier record is pending is legal; waits already enqueued keep the earlier record.
class EventPool {
 public:
  ~EventPool() {
    for (cudaEvent_t e : free_) cudaEventDestroy(e);  // errors at process teardown are moot
  }
  cudaEvent_t take() {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (!free_.empty()) {
        cudaEvent_t e = free_.back();
        free_.pop_back();
        return e;
      }
    }
    cudaEvent_t e = nullptr;
    check_cuda(cudaEventCreateWithFlags(&e, cudaEventDisableTiming), "cudaEventCreateWithFlags");
    return e;
  }
  void give(const std::vector<cudaEvent_t>& events) {
    std::lock_guard<std::mutex> lk(mu_);
    for (cudaEvent_t e : events)
      if (e) free_.push_back(e);
  }

 private:
  std::mutex mu_;
  std::vector<cudaEvent_t> free_;
};

// One event per task, written by the task's lane thread before the task settles (the executor's
// lock orders that write before any reader).
struct RoundEvents {
  RoundEvents(size_t n, std::shared_ptr<EventPool> pool) : events(n, nullptr), pool(std::move(pool)) {}
  ~RoundEvents() { pool->give(events); }
  std::vector<cudaEvent_t> events;
  std::shared_ptr<EventPool> pool;
};

RoundEvents& events_of(const Round& r) { return *static_cast<RoundEvents*>(r.device_state.get()); }

class CudaLauncher final : public Launcher {
 public:
  CudaLauncher(int num_lanes, const CudaOptions& options) : device_(pick_device(options.device)) {
    DeviceGuard guard(device_);
    pool_ = std::make_shared<EventPool>();
    make_streams(num_lanes, options.streams);
  }
  ~CudaLauncher() override { close(); }

  std::string name() const override { return "cuda"; }

  void prepare(Round& r) override { r.device_state = std::make_shared<RoundEvents>(r.tasks.size(), pool_); }

  void launch(Round& r, int t, const std::vector<std::pair<const Round*, int>>& wait_on) override {
    DeviceGuard guard(device_);
    const TaskSpec& task = r.tasks[t];
    cudaStream_t stream = streams_.at(task.lane);
    for (const auto& [src, d] : wait_on)
      if (cudaEvent_t ev = events_of(*src).events[d]) check_cuda(cudaStreamWaitEvent(stream, ev, 0), "cudaStreamWaitEvent");
    if (task.graph_exec) {
      check_cuda(cudaGraphLaunch(reinterpret_cast<cudaGraphExec_t>(task.graph_exec), stream), "cudaGraphLaunch");
    } else {
      call_fn(task, stream);
    }
    cudaEvent_t ev = pool_->take();
    events_of(r).events[t] = ev;
    check_cuda(cudaEventRecord(ev, stream), "cudaEventRecord");
  }

  std::pair<int, FailurePtr> finish(Round& r, double timeout_s) override {
    DeviceGuard guard(device_);
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                              std::chrono::duration<double>(timeout_s < 0 ? 0.0 : timeout_s));
    const auto& events = events_of(r).events;
    for (size_t t = 0; t < events.size(); ++t) {
      if (!events[t]) continue;
      cudaError_t err = timeout_s < 0 ? cudaEventSynchronize(events[t]) : poll(events[t], deadline);
      if (err == cudaErrorNotReady) throw WaitTimeout("round not done on the device after " + std::to_string(timeout_s) + " s");
      if (err != cudaSuccess) {
        auto kind = is_sticky(err) ? Failure::DeviceFault : Failure::Raised;
        return {static_cast<int>(t), std::make_shared<Failure>(Failure{kind, r.tasks[t].name, r.tasks[t].block,
                                                                        "device error: " + cuda_error_text(err), nullptr})};
      }
    }
    return {-1, nullptr};
  }

  bool finished(Round& r) override {
    DeviceGuard guard(device_);
    for (cudaEvent_t e : events_of(r).events)
      if (e && cudaEventQuery(e) == cudaErrorNotReady) return false;
    return true;
  }

  void close() override {
    std::lock_guard<std::mutex> lk(close_mu_);
    if (closed_) return;
    closed_ = true;
    try {
      DeviceGuard guard(device_);
      for (cudaStream_t s : streams_) cudaStreamSynchronize(s);  // launched work cannot be recalled
      if (own_streams_)
        for (cudaStream_t s : streams_) cudaStreamDestroy(s);
    } catch (...) {
      // A broken context at teardown: nothing useful left to do.
    }
    streams_.clear();
  }

 private:
  static int pick_device(int requested) {
    int count = 0;
    cudaError_t err = cudaGetDeviceCount(&count);
    if (err != cudaSuccess || count == 0)
      throw std::runtime_error("cuda backend: no usable CUDA device (" +
                               (err != cudaSuccess ? cuda_error_text(err) : std::string("0 devices")) + ")");
    int device = requested;
    if (device < 0) check_cuda(cudaGetDevice(&device), "cudaGetDevice");
    if (device >= count)
      throw std::invalid_argument("cuda backend: device " + std::to_string(device) + " does not exist (" +
                                  std::to_string(count) + " devices)");
    return device;
  }

  void make_streams(int num_lanes, const std::vector<uintptr_t>& given) {
    if (!given.empty()) {
      if (static_cast<int>(given.size()) != num_lanes)
        throw std::invalid_argument("got " + std::to_string(given.size()) + " streams for " +
                                    std::to_string(num_lanes) + " lanes");
      for (uintptr_t s : given) streams_.push_back(reinterpret_cast<cudaStream_t>(s));
      own_streams_ = false;
      return;
    }
    for (int lane = 0; lane < num_lanes; ++lane) {
      cudaStream_t s = nullptr;
      check_cuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
      streams_.push_back(s);
    }
    own_streams_ = true;
  }

  // A function task that raised may have hit a sticky fault (torch reports it as a plain
  // RuntimeError): the stream's state says whether the context is poisoned.
  static void call_fn(const TaskSpec& task, cudaStream_t stream) {
    try {
      task.fn(reinterpret_cast<uintptr_t>(stream));
    } catch (...) {
      cudaError_t state = cudaStreamQuery(stream);
      if (is_sticky(state))
        throw ContextPoisoned("task '" + task.name + "' raised (" + describe_exception(std::current_exception()) +
                              ") and the context reports " + cuda_error_text(state));
      throw;
    }
  }

  static cudaError_t poll(cudaEvent_t e, std::chrono::steady_clock::time_point deadline) {
    for (;;) {
      cudaError_t err = cudaEventQuery(e);
      if (err != cudaErrorNotReady || std::chrono::steady_clock::now() >= deadline) return err;
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  int device_;
  std::shared_ptr<EventPool> pool_;
  std::vector<cudaStream_t> streams_;
  bool own_streams_ = false;
  std::mutex close_mu_;
  bool closed_ = false;
};

}  // namespace

std::unique_ptr<Launcher> make_cuda_launcher(int num_lanes, const CudaOptions& options) {
  return std::make_unique<CudaLauncher>(num_lanes, options);
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace avatar_sched
