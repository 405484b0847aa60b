// Tests of the CUDA backend's launch logic against the simulated runtime (sim_cudart.cpp):
// dependencies through events across lanes and blocks, overlap, launch-time and device-side
// errors, cancel/reset, event and stream lifetimes. Built and run by tests/test_scheduler.py.
#include <algorithm>
#include <chrono>
#include <condition_variable>
#include <cstdio>
#include <cstdlib>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#include "scheduler/cuda_backend.h"
#include "sim_cudart.h"

using namespace avatar_sched;
using Clock = std::chrono::steady_clock;

// Leaves at once: simulated stream threads may still run, so no static destructors.
[[noreturn]] void fail_now() {
  std::fflush(stderr);
  std::_Exit(1);
}

#define CHECK(cond)                                                              \
  do {                                                                           \
    if (!(cond)) {                                                               \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      fail_now();                                                                \
    }                                                                            \
  } while (0)

namespace {

double now_s() { return std::chrono::duration<double>(Clock::now().time_since_epoch()).count(); }

struct Row {
  int64_t block;
  std::string stage;
  double start, end;
};

struct Trace {
  std::mutex mu;
  std::vector<Row> rows;
  const Row* find(int64_t block, const std::string& stage) const {
    for (const Row& r : rows)
      if (r.block == block && r.stage == stage) return &r;
    return nullptr;
  }
};

// A "graph" that sleeps and records; its n-th replay belongs to block n (one replay per block).
struct RecordingGraph {
  SimGraph graph;
  int64_t replays = 0;
  RecordingGraph(Trace& trace, std::string stage, double seconds, int64_t fail_on = -1) {
    graph.body = [this, &trace, stage, seconds, fail_on] {
      const int64_t block = replays++;
      const double start = now_s();
      std::this_thread::sleep_for(std::chrono::duration<double>(seconds));
      if (block == fail_on) return cudaErrorLaunchFailure;
      std::lock_guard<std::mutex> lk(trace.mu);
      trace.rows.push_back({block, stage, start, now_s()});
      return cudaSuccess;
    };
  }
  uintptr_t handle() { return reinterpret_cast<uintptr_t>(&graph); }
};

// The avatar block DAG on three lanes; "feat" is a callable (eager work enqueued on its stream),
// the rest are graphs. Mirrors the host-backend trace test in tests/test_scheduler.py.
std::vector<StageSpec> pipeline_specs() {
  return {
      {"feat", 0, {{"step0", -1}}},
      {"step0", 1, {{"feat", 0}, {"refresh", -1}, {"decode", -2}}},
      {"step1", 1, {{"step0", 0}}},
      {"refresh", 1, {{"step1", 0}}},
      {"decode", 2, {{"step1", 0}, {"decode", -1}}},
  };
}

StageFn eager_feat(Trace& trace, int64_t throw_on = -1) {
  return [&trace, throw_on](const LaunchInfo& info) {
    if (info.block == throw_on) throw std::runtime_error("feature extraction failed");
    const int64_t block = info.block;
    sim_enqueue(reinterpret_cast<cudaStream_t>(info.stream), [&trace, block] {
      const double start = now_s();
      std::this_thread::sleep_for(std::chrono::milliseconds(2));
      std::lock_guard<std::mutex> lk(trace.mu);
      trace.rows.push_back({block, "feat", start, now_s()});
      return cudaSuccess;
    });
  };
}

struct Pipeline {
  Trace trace;
  RecordingGraph step0{trace, "step0", 0.002}, step1{trace, "step1", 0.002}, refresh{trace, "refresh", 0.002};
  RecordingGraph decode{trace, "decode", 0.05};  // the bottleneck: overlap margins are this long
  std::unique_ptr<Backend> backend;

  explicit Pipeline(int64_t feat_throw_on = -1, int64_t decode_fault_on = -1)
      : decode(trace, "decode", 0.05, decode_fault_on) {
    std::vector<StageWork> work(5);
    work[0].fn = eager_feat(trace, feat_throw_on);
    work[1].graph_exec = step0.handle();
    work[2].graph_exec = step1.handle();
    work[3].graph_exec = refresh.handle();
    work[4].graph_exec = decode.handle();
    backend = make_cuda_backend(make_plan(pipeline_specs(), 3), std::move(work), CudaOptions{});
  }
};

// Runs f, requires it to throw E, returns E's message.
template <typename E, typename F>
void expect_throw(F&& f, std::string& what) {
  try {
    f();
  } catch (const E& e) {
    what = e.what();
    return;
  } catch (const std::exception& e) {
    std::fprintf(stderr, "unexpected exception: %s\n", e.what());
    fail_now();
  }
  std::fprintf(stderr, "expected an exception, none thrown\n");
  fail_now();
}

void test_order_overlap_and_async_launch() {
  Pipeline p;
  const int blocks = 5;
  std::vector<std::shared_ptr<Block>> handles;
  for (int b = 0; b < blocks; ++b) handles.push_back(p.backend->submit(b, nullptr));
  size_t ran_at_submit;
  {
    std::lock_guard<std::mutex> lk(p.trace.mu);
    ran_at_submit = p.trace.rows.size();
  }
  for (auto& h : handles) p.backend->wait(h, -1);
  CHECK(ran_at_submit < static_cast<size_t>(blocks) * 5);  // launching never waited for the device
  CHECK(p.trace.rows.size() == static_cast<size_t>(blocks) * 5);
  struct Edge { const char* src; const char* dst; int gap; };
  const Edge edges[] = {{"feat", "step0", 0},  {"step0", "feat", 1},    {"refresh", "step0", 1},
                        {"decode", "step0", 2}, {"step0", "step1", 0},   {"step1", "refresh", 0},
                        {"step1", "decode", 0}, {"decode", "decode", 1}};
  for (int b = 0; b < blocks; ++b)
    for (const Edge& e : edges)
      if (b + e.gap < blocks) CHECK(p.trace.find(b, e.src)->end <= p.trace.find(b + e.gap, e.dst)->start);
  for (int b = 0; b + 1 < blocks; ++b)  // block b+1 denoises while block b decodes
    CHECK(p.trace.find(b + 1, "step0")->start < p.trace.find(b, "decode")->end);
}

void test_launch_error_fails_block_and_dependents() {
  Pipeline p(/*feat_throw_on=*/2);
  std::vector<std::shared_ptr<Block>> h;
  for (int b = 0; b < 4; ++b) h.push_back(p.backend->submit(b, nullptr));
  p.backend->wait(h[0], -1);
  p.backend->wait(h[1], -1);
  std::string what;
  expect_throw<StageFailed>([&] { p.backend->wait(h[2], -1); }, what);
  CHECK(what.find("stage 'feat' of block 2 failed: feature extraction failed") != std::string::npos);
  expect_throw<StageFailed>([&] { p.backend->wait(h[3], -1); }, what);
  CHECK(what.find("stage 'feat' of block 2") != std::string::npos);
  CHECK(what.find("block 3 depends on it") != std::string::npos);
  CHECK(p.step0.replays == 2);  // blocks 2 and 3 launched no graph after the failure
  p.backend->reset();
  p.backend->wait(p.backend->submit(0, nullptr), -1);
  CHECK(p.step0.replays == 3);
}

void test_device_fault_is_reported_on_wait() {
  Pipeline p(-1, /*decode_fault_on=*/1);
  auto h0 = p.backend->submit(0, nullptr);
  auto h1 = p.backend->submit(1, nullptr);
  p.backend->wait(h0, -1);
  std::string what;
  expect_throw<StageFailed>([&] { p.backend->wait(h1, -1); }, what);
  CHECK(what.find("of block 1 failed: device error") != std::string::npos);
  CHECK(p.backend->done(h1));
  expect_throw<std::runtime_error>([&] { p.backend->reset(); }, what);  // the stream reports it too
  CHECK(what.find("reset") != std::string::npos);
  sim_clear_sticky_error();
  p.backend->reset();
  p.backend->wait(p.backend->submit(0, nullptr), -1);
}

struct Gate {
  std::mutex mu;
  std::condition_variable cv;
  bool open = false, entered = false;
  void pass() {
    std::unique_lock<std::mutex> lk(mu);
    entered = true;
    cv.notify_all();
    cv.wait(lk, [&] { return open; });
  }
  void wait_entered() {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return entered; });
  }
  void release() {
    std::lock_guard<std::mutex> lk(mu);
    open = true;
    cv.notify_all();
  }
};

void test_cancel_then_reset() {
  Trace trace;
  Gate gate;
  int64_t replays = 0;
  SimGraph held{[&] {
    if (replays++ == 1) gate.pass();
    return cudaSuccess;
  }};
  std::vector<StageWork> work(1);
  work[0].graph_exec = reinterpret_cast<uintptr_t>(&held);
  auto backend = make_cuda_backend(make_plan({{"step", 0, {{"step", -1}}}}, 1), std::move(work), CudaOptions{});
  auto h0 = backend->submit(0, nullptr);
  backend->wait(h0, -1);
  std::vector<std::shared_ptr<Block>> h;
  for (int b = 1; b < 4; ++b) h.push_back(backend->submit(b, nullptr));
  gate.wait_entered();
  std::string what;
  expect_throw<WaitTimeout>([&] { backend->wait(h[0], 0.01); }, what);
  backend->cancel();
  for (auto& x : h) expect_throw<Cancelled>([&] { backend->wait(x, -1); }, what);
  expect_throw<Cancelled>([&] { backend->submit(4, nullptr); }, what);
  backend->wait(h0, -1);  // finished before the cancel: still fine
  std::thread opener([&] {
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
    gate.release();
  });
  backend->reset();  // waits for the launched work
  opener.join();
  CHECK(replays == 4);  // launched work cannot be recalled: it ran
  backend->wait(backend->submit(0, nullptr), -1);
  CHECK(replays == 5);
}

void test_events_and_streams_do_not_leak() {
  const int streams_before = sim_live_streams();
  {
    SimGraph nop{[] { return cudaSuccess; }};
    std::vector<StageWork> work(3);
    for (auto& w : work) w.graph_exec = reinterpret_cast<uintptr_t>(&nop);
    auto backend = make_cuda_backend(make_plan({{"a", 0, {{"c", -1}}}, {"b", 1, {{"a", 0}}}, {"c", 1, {{"b", 0}}}}, 2),
                                     std::move(work), CudaOptions{});
    CHECK(sim_live_streams() == streams_before + 2);
    std::vector<std::shared_ptr<Block>> inflight;
    int peak_events = 0;
    for (int b = 0; b < 300; ++b) {
      inflight.push_back(backend->submit(b, nullptr));
      if (inflight.size() > 4) {
        backend->wait(inflight.front(), -1);
        inflight.erase(inflight.begin());
      }
      peak_events = std::max(peak_events, sim_live_events());
    }
    for (auto& h : inflight) backend->wait(h, -1);
    CHECK(peak_events <= 3 * 12);  // recycled: a few blocks' worth, not 300 blocks' worth
  }
  CHECK(sim_live_streams() == streams_before);
}

void test_external_streams_are_not_destroyed() {
  cudaStream_t a = nullptr, b = nullptr;
  cudaStreamCreateWithFlags(&a, 0);
  cudaStreamCreateWithFlags(&b, 0);
  const int live = sim_live_streams();
  {
    std::map<uintptr_t, int> seen;
    std::vector<StageWork> work(2);
    for (auto& w : work) w.fn = [&seen](const LaunchInfo& info) { seen[info.stream]++; };
    auto backend = make_cuda_backend(make_plan({{"x", 0, {}}, {"y", 1, {{"x", 0}}}}, 2), std::move(work),
                                     CudaOptions{-1, {reinterpret_cast<uintptr_t>(a), reinterpret_cast<uintptr_t>(b)}});
    backend->wait(backend->submit(0, nullptr), -1);
    CHECK(seen.size() == 2 && seen.count(reinterpret_cast<uintptr_t>(a)) && seen.count(reinterpret_cast<uintptr_t>(b)));
  }
  CHECK(sim_live_streams() == live);
  cudaStreamDestroy(a);
  cudaStreamDestroy(b);
}

void test_no_device_is_a_clear_error() {
  sim_set_device_count(0);
  std::string what;
  std::vector<StageWork> work(1);
  work[0].fn = [](const LaunchInfo&) {};
  expect_throw<std::runtime_error>(
      [&] { make_cuda_backend(make_plan({{"x", 0, {}}}, 1), std::move(work), CudaOptions{}); }, what);
  CHECK(what.find("no usable CUDA device") != std::string::npos);
  sim_set_device_count(1);
}

}  // namespace

int main() {
  test_order_overlap_and_async_launch();
  test_launch_error_fails_block_and_dependents();
  test_device_fault_is_reported_on_wait();
  test_cancel_then_reset();
  test_events_and_streams_do_not_leak();
  test_external_streams_are_not_destroyed();
  test_no_device_is_a_clear_error();
  std::printf("cuda backend simulation: all tests passed\n");
  return 0;
}
