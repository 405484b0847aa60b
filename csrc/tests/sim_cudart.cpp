// Simulated CUDA runtime (see sim_cudart.h). One global lock keeps it obviously correct; the
// simulation is for ordering semantics, not speed.
#include "sim_cudart.h"

#include <algorithm>
#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

namespace {

std::mutex g_mu;
std::condition_variable g_cv;
cudaError_t g_sticky = cudaSuccess;  // a faulting "kernel" poisons the context, as on a GPU
int g_device_count = 1;
int g_live_events = 0;
int g_live_streams = 0;
thread_local int t_device = 0;
SimCounts g_counts;

struct SimEvent {
  uint64_t recorded = 0;   // records enqueued so far
  uint64_t completed = 0;  // highest record its stream has reached
};

struct Op {
  enum Kind { Wait, Record, Run } kind;
  SimEvent* event = nullptr;
  uint64_t generation = 0;
  std::function<cudaError_t()> work;
};

struct SimStream {
  std::deque<Op> ops;
  bool busy = false;
  bool stop = false;
  std::thread thread;

  void loop() {
    std::unique_lock<std::mutex> lk(g_mu);
    for (;;) {
      g_cv.wait(lk, [&] { return stop || (!ops.empty() && ready(ops.front())); });
      if (ops.empty()) return;
      Op op = std::move(ops.front());
      ops.pop_front();
      busy = true;
      if (op.kind == Op::Record) op.event->completed = std::max(op.event->completed, op.generation);
      if (op.kind == Op::Run) {
        lk.unlock();
        cudaError_t err = op.work();
        lk.lock();
        if (err != cudaSuccess && g_sticky == cudaSuccess) g_sticky = err;
      }
      busy = false;
      g_cv.notify_all();
    }
  }

  static bool ready(const Op& op) { return op.kind != Op::Wait || op.event->completed >= op.generation; }
};

SimStream* as_stream(cudaStream_t s) { return reinterpret_cast<SimStream*>(s); }
SimEvent* as_event(cudaEvent_t e) { return reinterpret_cast<SimEvent*>(e); }

void push(cudaStream_t s, Op op) {
  as_stream(s)->ops.push_back(std::move(op));
  g_cv.notify_all();
}

}  // namespace

void sim_enqueue(cudaStream_t stream, std::function<cudaError_t()> work) {
  std::lock_guard<std::mutex> lk(g_mu);
  push(stream, Op{Op::Run, nullptr, 0, std::move(work)});
}

void sim_set_device_count(int count) { g_device_count = count; }
int sim_live_events() {
  std::lock_guard<std::mutex> lk(g_mu);
  return g_live_events;
}
int sim_live_streams() {
  std::lock_guard<std::mutex> lk(g_mu);
  return g_live_streams;
}
void sim_clear_sticky_error() {
  std::lock_guard<std::mutex> lk(g_mu);
  g_sticky = cudaSuccess;
}

SimCounts sim_counts() {
  std::lock_guard<std::mutex> lk(g_mu);
  return g_counts;
}
void sim_reset_counts() {
  std::lock_guard<std::mutex> lk(g_mu);
  g_counts = SimCounts();
}

extern "C" {

cudaError_t cudaGetDeviceCount(int* count) {
  *count = g_device_count;
  return g_device_count > 0 ? cudaSuccess : cudaErrorNoDevice;
}
cudaError_t cudaGetDevice(int* device) {
  *device = t_device;
  return cudaSuccess;
}
cudaError_t cudaSetDevice(int device) {
  if (device < 0 || device >= g_device_count) return cudaErrorInvalidDevice;
  t_device = device;
  return cudaSuccess;
}
cudaError_t cudaRuntimeGetVersion(int* version) {
  *version = 13000;
  return cudaSuccess;
}
const char* cudaGetErrorName(cudaError_t err) {
  if (err == cudaSuccess) return "cudaSuccess";
  return err == cudaErrorIllegalAddress ? "cudaErrorIllegalAddress" : "cudaErrorSim";
}
const char* cudaGetErrorString(cudaError_t err) { return err == cudaSuccess ? "no error" : "simulated error"; }

cudaError_t cudaStreamCreateWithFlags(cudaStream_t* stream, unsigned int) {
  auto* s = new SimStream();
  s->thread = std::thread([s] { s->loop(); });
  std::lock_guard<std::mutex> lk(g_mu);
  ++g_live_streams;
  *stream = reinterpret_cast<cudaStream_t>(s);
  return cudaSuccess;
}
cudaError_t cudaStreamDestroy(cudaStream_t stream) {
  SimStream* s = as_stream(stream);
  {
    std::unique_lock<std::mutex> lk(g_mu);
    g_cv.wait(lk, [&] { return s->ops.empty() && !s->busy; });
    s->stop = true;
    --g_live_streams;
  }
  g_cv.notify_all();
  s->thread.join();
  delete s;
  return cudaSuccess;
}
cudaError_t cudaStreamSynchronize(cudaStream_t stream) {
  SimStream* s = as_stream(stream);
  std::unique_lock<std::mutex> lk(g_mu);
  g_cv.wait(lk, [&] { return s->ops.empty() && !s->busy; });
  return g_sticky;
}
cudaError_t cudaStreamQuery(cudaStream_t stream) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_sticky != cudaSuccess) return g_sticky;
  return as_stream(stream)->ops.empty() && !as_stream(stream)->busy ? cudaSuccess : cudaErrorNotReady;
}
cudaError_t cudaStreamWaitEvent(cudaStream_t stream, cudaEvent_t event, unsigned int) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_sticky != cudaSuccess) return g_sticky;
  ++g_counts.stream_waits;
  if (as_event(event)->recorded > 0) push(stream, Op{Op::Wait, as_event(event), as_event(event)->recorded, {}});
  return cudaSuccess;
}

cudaError_t cudaEventCreateWithFlags(cudaEvent_t* event, unsigned int) {
  std::lock_guard<std::mutex> lk(g_mu);
  ++g_live_events;
  *event = reinterpret_cast<cudaEvent_t>(new SimEvent());
  return cudaSuccess;
}
cudaError_t cudaEventDestroy(cudaEvent_t event) {
  std::lock_guard<std::mutex> lk(g_mu);
  --g_live_events;
  delete as_event(event);
  return cudaSuccess;
}
cudaError_t cudaEventRecord(cudaEvent_t event, cudaStream_t stream) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_sticky != cudaSuccess) return g_sticky;
  ++g_counts.event_records;
  push(stream, Op{Op::Record, as_event(event), ++as_event(event)->recorded, {}});
  return cudaSuccess;
}
cudaError_t cudaEventQuery(cudaEvent_t event) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_sticky != cudaSuccess) return g_sticky;
  return as_event(event)->completed >= as_event(event)->recorded ? cudaSuccess : cudaErrorNotReady;
}
cudaError_t cudaEventSynchronize(cudaEvent_t event) {
  std::unique_lock<std::mutex> lk(g_mu);
  const uint64_t target = as_event(event)->recorded;
  g_cv.wait(lk, [&] { return as_event(event)->completed >= target || g_sticky != cudaSuccess; });
  return g_sticky;
}

cudaError_t cudaGraphLaunch(cudaGraphExec_t exec, cudaStream_t stream) {
  std::lock_guard<std::mutex> lk(g_mu);
  if (g_sticky != cudaSuccess) return g_sticky;
  ++g_counts.graph_launches;
  SimGraph* graph = reinterpret_cast<SimGraph*>(exec);
  push(stream, Op{Op::Run, nullptr, 0, [graph] { return graph->body(); }});
  return cudaSuccess;
}

}  // extern "C"
