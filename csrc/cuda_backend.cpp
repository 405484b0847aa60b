// CUDA backend of the stage scheduler (see csrc/scheduler/cuda_backend.h for the contract).
// Plain C++ against the CUDA runtime API: no kernels here, so the host compiler builds it.
#include "scheduler/cuda_backend.h"

#include <cuda_runtime_api.h>

#include <chrono>
#if defined(__GLIBCXX__)
#include <cxxabi.h>
#endif
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>

namespace avatar_sched {
namespace {

std::string cuda_error_text(cudaError_t err) {
  return std::string(cudaGetErrorName(err)) + " (" + cudaGetErrorString(err) + ")";
}

void check_cuda(cudaError_t err, const std::string& what) {
  if (err != cudaSuccess) throw std::runtime_error(what + ": " + cuda_error_text(err));
}

// Makes `device` current for a scope (submit/wait may come from any thread).
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

// Events are recycled: a block returns its events when the last handle on it goes. Re-recording
// an event whose earlier record is still pending is legal, and waits already enqueued on it keep
// referring to the earlier record. Shared with the blocks, so it outlives the backend if needed.
class EventPool {
 public:
  EventPool() = default;
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

struct CudaBlock final : Block {
  CudaBlock(const void* owner, int64_t index, size_t num_stages, uint64_t cancel_mark,
            std::shared_ptr<void> payload, std::shared_ptr<EventPool> pool)
      : Block(owner, index, num_stages, cancel_mark, std::move(payload)),
        events(num_stages, nullptr), pool(std::move(pool)) {}
  ~CudaBlock() override { pool->give(events); }

  std::vector<cudaEvent_t> events;  // recorded after each launched stage; null if not launched
  std::shared_ptr<EventPool> pool;
};

class CudaBackend final : public Backend {
 public:
  CudaBackend(Plan plan, std::vector<StageWork> work, const CudaOptions& options)
      : plan_(std::move(plan)), work_(std::move(work)), window_(plan_.history) {
    if (work_.size() != plan_.stages.size())
      throw std::invalid_argument("got " + std::to_string(work_.size()) + " stage works for " +
                                  std::to_string(plan_.stages.size()) + " stages");
    for (size_t i = 0; i < work_.size(); ++i)
      if (!work_[i].fn && work_[i].graph_exec == 0)
        throw std::invalid_argument("stage '" + plan_.stages[i].name + "' has neither a callable nor a graph exec");
    device_ = pick_device(options.device);
    DeviceGuard guard(device_);
    pool_ = std::make_shared<EventPool>();
    make_streams(options.streams);
  }

  ~CudaBackend() override {
    try {
      close();
    } catch (...) {
      // A broken context at teardown: nothing useful left to do with the error.
    }
  }

  const Plan& plan() const override { return plan_; }

  std::shared_ptr<Block> submit(int64_t index, std::shared_ptr<void> payload) override {
    std::shared_ptr<Block> dropped;
    std::vector<std::shared_ptr<Block>> finished;
    std::lock_guard<std::mutex> lk(mu_);
    if (closed_) throw std::runtime_error("scheduler is closed");
    if (cancelled_)
      throw Cancelled("scheduler was cancelled: call reset() before submitting block " + std::to_string(index));
    window_.check_next(index);
    DeviceGuard guard(device_);
    finished = prune_inflight();
    auto blk = std::make_shared<CudaBlock>(this, index, plan_.stages.size(), cancel_count_, std::move(payload), pool_);
    blk->earlier = window_.earlier_for(index);
    for (size_t s = 0; s < plan_.stages.size(); ++s) launch_stage(*blk, static_cast<int>(s));
    inflight_.push_back(blk);
    dropped = window_.push(blk);
    return blk;
  }

  void wait(const std::shared_ptr<Block>& b, double timeout_s) override {
    auto blk = as_cuda(b);
    std::vector<int> launched;
    {
      std::lock_guard<std::mutex> lk(mu_);
      throw_if_settled_badly(*blk);
      for (size_t s = 0; s < blk->events.size(); ++s)
        if (blk->events[s]) launched.push_back(static_cast<int>(s));
    }
    DeviceGuard guard(device_);
    const auto deadline = std::chrono::steady_clock::now() +
                          std::chrono::duration_cast<std::chrono::steady_clock::duration>(
                              std::chrono::duration<double>(timeout_s < 0 ? 0.0 : timeout_s));
    for (int s : launched) {
      cudaError_t err = timeout_s < 0 ? cudaEventSynchronize(blk->events[s]) : poll_event(blk->events[s], deadline);
      if (err == cudaErrorNotReady)
        throw WaitTimeout("block " + std::to_string(blk->index) + " not done after " +
                          std::to_string(timeout_s) + " s");
      if (err != cudaSuccess) record_device_failure(*blk, s, err);
    }
    std::lock_guard<std::mutex> lk(mu_);
    throw_if_settled_badly(*blk);
  }

  bool done(const std::shared_ptr<Block>& b) override {
    auto blk = as_cuda(b);
    std::lock_guard<std::mutex> lk(mu_);
    if (blk->failure || blk->cancelled) return true;
    DeviceGuard guard(device_);
    return events_complete(*blk);
  }

  void cancel() override {
    std::vector<std::shared_ptr<CudaBlock>> forgotten;
    std::lock_guard<std::mutex> lk(mu_);
    cancelled_ = true;
    ++cancel_count_;
    DeviceGuard guard(device_);
    // Launched work cannot be recalled; a block the device has not finished counts as cancelled.
    for (auto& blk : inflight_)
      if (!events_complete(*blk)) blk->cancelled = true;
    forgotten.swap(inflight_);
  }

  void reset() override {
    cancel();
    std::string error = synchronize_streams();
    std::deque<std::shared_ptr<Block>> forgotten;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (closed_) throw std::runtime_error("scheduler is closed");
      forgotten = window_.clear();
      cancelled_ = false;
    }
    if (!error.empty()) throw std::runtime_error("reset: a lane stream reported an error: " + error);
  }

  void close() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (closed_) return;
    }
    cancel();
    synchronize_streams();
    std::vector<StageWork> dropped_work;
    std::deque<std::shared_ptr<Block>> forgotten;
    std::lock_guard<std::mutex> lk(mu_);
    closed_ = true;
    forgotten = window_.clear();
    DeviceGuard guard(device_);
    if (own_streams_)
      for (cudaStream_t s : streams_) cudaStreamDestroy(s);
    streams_.clear();
    dropped_work = std::move(work_);  // callables may reference the owner (a cycle GC cannot see)
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

  void make_streams(const std::vector<uintptr_t>& given) {
    if (!given.empty()) {
      if (static_cast<int>(given.size()) != plan_.num_lanes)
        throw std::invalid_argument("got " + std::to_string(given.size()) + " streams for " +
                                    std::to_string(plan_.num_lanes) + " lanes");
      for (uintptr_t s : given) streams_.push_back(reinterpret_cast<cudaStream_t>(s));
      own_streams_ = false;
      return;
    }
    for (int lane = 0; lane < plan_.num_lanes; ++lane) {
      cudaStream_t s = nullptr;
      check_cuda(cudaStreamCreateWithFlags(&s, cudaStreamNonBlocking), "cudaStreamCreateWithFlags");
      streams_.push_back(s);
    }
    own_streams_ = true;
  }

  std::shared_ptr<CudaBlock> as_cuda(const std::shared_ptr<Block>& b) const {
    if (!b || b->owner != this) throw std::invalid_argument("handle does not belong to this scheduler");
    return std::static_pointer_cast<CudaBlock>(b);
  }

  void throw_if_settled_badly(const CudaBlock& blk) const {
    if (blk.failure) throw StageFailed(blk.failure, blk.index);
    if (blk.cancelled)  // flagged by cancel() when the device had not finished it
      throw Cancelled("block " + std::to_string(blk.index) + " was cancelled");
  }

  bool events_complete(const CudaBlock& blk) const {
    for (cudaEvent_t e : blk.events)
      if (e && cudaEventQuery(e) == cudaErrorNotReady) return false;
    return true;
  }

  static cudaError_t poll_event(cudaEvent_t e, std::chrono::steady_clock::time_point deadline) {
    for (;;) {
      cudaError_t err = cudaEventQuery(e);
      if (err != cudaErrorNotReady || std::chrono::steady_clock::now() >= deadline) return err;
      std::this_thread::sleep_for(std::chrono::microseconds(50));
    }
  }

  // A device-side error (a faulting graph) is seen only when waiting: pin it on the stage.
  void record_device_failure(CudaBlock& blk, int stage, cudaError_t err) {
    std::lock_guard<std::mutex> lk(mu_);
    if (!blk.failure)
      blk.failure = std::make_shared<Failure>(
          Failure{plan_.stages[stage].name, blk.index, "device error: " + cuda_error_text(err), nullptr});
  }

  // Blocks whose work the device finished no longer need to be kept alive by the scheduler
  // (their payload, e.g. input tensors, stays referenced until then). Returned to be dropped by
  // the caller after its own cleanup.
  std::vector<std::shared_ptr<Block>> prune_inflight() {
    std::vector<std::shared_ptr<Block>> finished;
    std::vector<std::shared_ptr<CudaBlock>> keep;
    for (auto& blk : inflight_) {
      if (events_complete(*blk)) finished.push_back(blk);
      else keep.push_back(blk);
    }
    inflight_.swap(keep);
    return finished;
  }

  void launch_stage(CudaBlock& blk, int s) {
    if (blk.failure) return void(settle(blk, s, NodeState::Skipped));
    DepStatus st = check_deps(plan_, blk, s);
    if (st.kind == DepStatus::Broken) {
      blk.failure = st.failure;
      return void(settle(blk, s, NodeState::Skipped));
    }
    if (st.kind != DepStatus::Ready)  // every earlier stage is settled by now: cannot happen
      throw std::logic_error("cuda backend: stage '" + plan_.stages[s].name + "' found a dependency unsettled");
    const int lane = plan_.stages[s].lane;
    cudaStream_t stream = streams_[lane];
    try {
      for (const auto& src : st.sources) {
        const auto* dep = static_cast<const CudaBlock*>(src.first);
        if (plan_.stages[src.second].lane == lane) continue;  // same stream: already ordered
        check_cuda(cudaStreamWaitEvent(stream, dep->events[src.second], 0), "cudaStreamWaitEvent");
      }
      if (work_[s].graph_exec) {
        check_cuda(cudaGraphLaunch(reinterpret_cast<cudaGraphExec_t>(work_[s].graph_exec), stream), "cudaGraphLaunch");
      } else {
        work_[s].fn(LaunchInfo{blk.index, s, lane, reinterpret_cast<uintptr_t>(stream), blk.payload.get()});
      }
      cudaEvent_t ev = pool_->take();
      blk.events[s] = ev;
      check_cuda(cudaEventRecord(ev, stream), "cudaEventRecord");
#if defined(__GLIBCXX__)
    } catch (abi::__forced_unwind&) {
      throw;  // thread teardown, not a stage failure
#endif
    } catch (...) {
      std::exception_ptr e = std::current_exception();
      blk.failure = std::make_shared<Failure>(Failure{plan_.stages[s].name, blk.index, describe_exception(e), e});
      return void(settle(blk, s, NodeState::Failed));
    }
    settle(blk, s, NodeState::Done);
  }

  // Waits for every lane; returns the first error instead of throwing (reset/close go on).
  std::string synchronize_streams() {
    std::vector<cudaStream_t> streams;
    {
      std::lock_guard<std::mutex> lk(mu_);
      streams = streams_;
    }
    DeviceGuard guard(device_);
    std::string first_error;
    for (cudaStream_t s : streams) {
      cudaError_t err = cudaStreamSynchronize(s);
      if (err != cudaSuccess && first_error.empty()) first_error = cuda_error_text(err);
    }
    return first_error;
  }

  Plan plan_;
  std::vector<StageWork> work_;
  BlockWindow window_;
  int device_ = 0;
  std::shared_ptr<EventPool> pool_;
  std::vector<cudaStream_t> streams_;
  bool own_streams_ = false;
  std::mutex mu_;
  std::vector<std::shared_ptr<CudaBlock>> inflight_;
  bool cancelled_ = false;
  bool closed_ = false;
  uint64_t cancel_count_ = 0;
};

}  // namespace

std::unique_ptr<Backend> make_cuda_backend(Plan plan, std::vector<StageWork> work, const CudaOptions& options) {
  return std::make_unique<CudaBackend>(std::move(plan), std::move(work), options);
}

int cuda_runtime_version() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return v;
}

}  // namespace avatar_sched
