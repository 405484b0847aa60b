// Tests of the round executor's CUDA launcher against the simulated runtime (sim_cudart.cpp):
// the graph-exec launch path (launch order per stream, events between lanes, no function call
// per graph task), counted; overlap across rounds; launch-time errors failing one group; a sticky
// device fault reported as such; cancellation; event and stream lifetimes. Built and run by
// tests/test_scheduler_sim.py.
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

#include "scheduler/cuda_launcher.h"
#include "sim_cudart.h"

using namespace avatar_sched;

// Leaves at once: simulated stream threads may still run, so no static destructors.
[[noreturn]] void fail_now() {
  std::fflush(stderr);
  std::_Exit(1);
}

#define CHECK(cond)                                                                 \
  do {                                                                              \
    if (!(cond)) {                                                                  \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      fail_now();                                                                   \
    }                                                                               \
  } while (0)

namespace {

// The order in which "kernels" ran on the simulated device, with the stream each ran on.
struct DeviceLog {
  std::mutex mu;
  std::condition_variable cv;
  std::vector<std::pair<std::string, int64_t>> ran;  // (task, round)
  std::map<std::string, std::vector<int64_t>> by_stage;

  void add(const std::string& stage, int64_t round) {
    std::lock_guard<std::mutex> lk(mu);
    ran.emplace_back(stage, round);
    by_stage[stage].push_back(round);
    cv.notify_all();
  }
  int index(const std::string& stage, int64_t round) {
    std::lock_guard<std::mutex> lk(mu);
    for (size_t i = 0; i < ran.size(); ++i)
      if (ran[i].first == stage && ran[i].second == round) return static_cast<int>(i);
    return -1;
  }
  // Waits (bounded) until `stage` of `round` started; false on timeout.
  bool wait_for(const std::string& stage, int64_t round) {
    std::unique_lock<std::mutex> lk(mu);
    return cv.wait_for(lk, std::chrono::seconds(10), [&] {
      for (const auto& r : ran)
        if (r.first == stage && r.second == round) return true;
      return false;
    });
  }
};

// A captured graph: its n-th replay belongs to round n. `body` may block (overlap proofs) or fault.
struct Graph {
  SimGraph sim;
  int64_t replays = 0;
  Graph(DeviceLog& log, std::string stage, std::function<cudaError_t(int64_t)> extra = nullptr) {
    sim.body = [this, &log, stage, extra] {
      const int64_t round = replays++;
      log.add(stage, round);
      return extra ? extra(round) : cudaSuccess;
    };
  }
  uintptr_t exec() { return reinterpret_cast<uintptr_t>(&sim); }
};

enum Lane { kCompute = 0, kDecode = 1, kCopy = 2 };

struct Pipeline {
  DeviceLog log;
  int fn_calls = 0;
  Graph step0{log, "step0"}, step1{log, "step1"}, refresh{log, "refresh"};
  Graph decode;
  std::unique_ptr<RoundExecutor> exec;
  std::vector<std::shared_ptr<Round>> rounds;

  explicit Pipeline(std::function<cudaError_t(int64_t)> decode_extra = nullptr)
      : decode(log, "decode", std::move(decode_extra)),
        exec(std::make_unique<RoundExecutor>(3, make_cuda_launcher(3, CudaOptions{}))) {}

  // feat (a function: eager work enqueued on the copy stream) -> step0 -> step1 -> refresh, and
  // decode after step1; step0 after the previous round's refresh (same lane: no event wait).
  std::shared_ptr<Round> submit(int64_t r) {
    std::vector<TaskSpec> t(5);
    t[0] = TaskSpec{"feat", kCopy, 0, r, {}, {}, [this, r](uintptr_t stream) {
                      ++fn_calls;
                      sim_enqueue(reinterpret_cast<cudaStream_t>(stream), [this, r] {
                        log.add("feat", r);
                        return cudaSuccess;
                      });
                    }, 0};
    t[1] = TaskSpec{"step0", kCompute, 0, r, {0}, {}, nullptr, step0.exec()};
    if (!rounds.empty()) t[1].external.push_back(ExternalDep{rounds.back(), 3});
    t[2] = TaskSpec{"step1", kCompute, 0, r, {1}, {}, nullptr, step1.exec()};
    t[3] = TaskSpec{"refresh", kCompute, 0, r, {2}, {}, nullptr, refresh.exec()};
    t[4] = TaskSpec{"decode", kDecode, 0, r, {2}, {}, nullptr, decode.exec()};
    rounds.push_back(exec->submit(std::move(t), nullptr));
    return rounds.back();
  }
};

void test_graph_launch_path_is_counted_and_ordered() {
  sim_reset_counts();
  Pipeline p;
  const int n = 4;
  for (int r = 0; r < n; ++r) p.submit(r);
  for (auto& r : p.rounds) {
    p.exec->wait(r, -1);
    CHECK(r->failed.empty());
  }
  SimCounts c = sim_counts();
  CHECK(c.graph_launches == 4 * n);  // every graph task is one cudaGraphLaunch ...
  CHECK(p.fn_calls == n);            // ... and only the function task calls back into the host
  CHECK(c.event_records == 5 * n);   // one event per task
  CHECK(c.stream_waits == 2 * n);    // feat->step0 (copy->compute), step1->decode (compute->decode)
  for (const char* s : {"step0", "step1", "refresh", "decode", "feat"})
    CHECK((p.log.by_stage[s] == std::vector<int64_t>{0, 1, 2, 3}));  // FIFO per lane across rounds
  for (int r = 0; r < n; ++r) {
    CHECK(p.log.index("feat", r) < p.log.index("step0", r));  // cross-lane edge held by an event
    CHECK(p.log.index("step1", r) < p.log.index("decode", r));
    CHECK(p.log.index("step0", r) < p.log.index("step1", r));
    if (r) CHECK(p.log.index("refresh", r - 1) < p.log.index("step0", r));
  }
}

void test_decode_of_round_r_overlaps_compute_of_round_r_plus_1() {
  DeviceLog* log_ptr = nullptr;
  bool overlapped = true;
  // decode of round 0 finishes only once step0 of round 1 ran on the compute stream.
  Pipeline p([&](int64_t round) {
    if (round == 0) overlapped = log_ptr->wait_for("step0", 1);
    return cudaSuccess;
  });
  log_ptr = &p.log;
  p.submit(0);
  p.submit(1);
  for (auto& r : p.rounds) p.exec->wait(r, -1);
  CHECK(overlapped);
}

void test_launch_error_fails_one_group() {
  DeviceLog log;
  Graph g(log, "step");
  RoundExecutor exec(2, make_cuda_launcher(2, CudaOptions{}));
  std::vector<TaskSpec> t = {
      {"a.audio", kCompute, 1, 5, {}, {}, [](uintptr_t) { throw std::runtime_error("bad audio"); }, 0},
      {"a.step", kCompute, 1, 5, {0}, {}, nullptr, g.exec()},
      {"b.step", kCompute, 2, 9, {}, {}, nullptr, g.exec()},
      {"b.decode", kDecode, 2, 9, {2}, {}, nullptr, g.exec()},
  };
  auto r = exec.submit(std::move(t), nullptr);
  exec.wait(r, -1);
  CHECK(r->failed.size() == 1 && r->failed.count(1));
  const Failure& f = *r->failed.at(1).second;
  CHECK(f.stage == "a.audio" && f.block == 5 && f.kind == Failure::Raised);
  CHECK(f.message.find("bad audio") != std::string::npos);
  CHECK(g.replays == 2);  // b.step and b.decode ran; a.step was skipped
  CHECK(!exec.poisoned());
}

void test_sticky_fault_poisons_the_context() {
  {
    Pipeline p([](int64_t round) { return round == 1 ? cudaErrorIllegalAddress : cudaSuccess; });
    p.submit(0);
    // Round 0 finishes first: a sticky fault fails whatever is still pending on the device, so a
    // round 0 still running when round 1 faults may rightly fail too (a race, not what is tested).
    p.exec->wait(p.rounds[0], -1);
    CHECK(p.rounds[0]->failed.empty());
    p.submit(1);
    p.exec->wait(p.rounds[1], -1);
    CHECK(p.rounds[1]->failed.count(0));
    CHECK(p.rounds[1]->failed.at(0).second->kind == Failure::DeviceFault);
    CHECK(p.rounds[1]->failed.at(0).second->message.find("cudaErrorIllegalAddress") != std::string::npos);
    CHECK(p.exec->poisoned());
    bool refused = false;
    try {
      p.submit(2);
    } catch (const ContextPoisoned& e) {
      refused = std::string(e.what()).find("poisoned") != std::string::npos;
    }
    CHECK(refused);
  }
  sim_clear_sticky_error();  // the simulation's own state; the executor has no recovery hook
}

void test_cancel_skips_unlaunched_tasks_of_a_group() {
  DeviceLog log;
  std::mutex mu;
  std::condition_variable cv;
  bool entered = false, open = false;
  RoundExecutor exec(2, make_cuda_launcher(2, CudaOptions{}));
  Graph g(log, "g");
  auto hold = [&](uintptr_t) {  // a function task: holds its lane thread until released
    std::unique_lock<std::mutex> lk(mu);
    entered = true;
    cv.notify_all();
    cv.wait(lk, [&] { return open; });
  };
  std::vector<TaskSpec> t = {{"hold", kCompute, 1, 0, {}, {}, hold, 0},
                             {"a.next", kCompute, 1, 0, {}, {}, nullptr, g.exec()},
                             {"b.next", kDecode, 2, 0, {}, {}, nullptr, g.exec()}};
  auto r = exec.submit(std::move(t), nullptr);
  {
    std::unique_lock<std::mutex> lk(mu);
    cv.wait(lk, [&] { return entered; });
  }
  exec.cancel(1);
  {
    std::lock_guard<std::mutex> lk(mu);
    open = true;
    cv.notify_all();
  }
  exec.wait(r, -1);
  CHECK(r->failed.size() == 1 && r->failed.at(1).second->kind == Failure::Cancelled);
  CHECK(g.replays == 1);  // b.next only
}

void test_events_and_streams_do_not_leak() {
  const int streams_before = sim_live_streams();
  {
    Pipeline p;
    int peak = 0;
    for (int r = 0; r < 300; ++r) {
      p.submit(r);
      if (p.rounds.size() > 4) {
        p.exec->wait(p.rounds.front(), -1);
        p.rounds.erase(p.rounds.begin());
      }
      peak = std::max(peak, sim_live_events());
    }
    for (auto& r : p.rounds) p.exec->wait(r, -1);
    CHECK(peak <= 5 * 12);  // recycled: a few rounds' worth, not 300 rounds' worth
    CHECK(sim_live_streams() == streams_before + 3);
    p.rounds.clear();
  }
  CHECK(sim_live_streams() == streams_before);
}

void test_external_streams_are_used_and_not_destroyed() {
  cudaStream_t a = nullptr, b = nullptr;
  cudaStreamCreateWithFlags(&a, 0);
  cudaStreamCreateWithFlags(&b, 0);
  const int live = sim_live_streams();
  std::map<uintptr_t, int> seen;
  {
    RoundExecutor exec(2, make_cuda_launcher(2, CudaOptions{-1, {reinterpret_cast<uintptr_t>(a),
                                                                  reinterpret_cast<uintptr_t>(b)}}));
    auto fn = [&seen](uintptr_t s) { seen[s]++; };
    auto r = exec.submit({{"x", 0, 0, 0, {}, {}, fn, 0}, {"y", 1, 0, 0, {0}, {}, fn, 0}}, nullptr);
    exec.wait(r, -1);
  }
  CHECK(seen.size() == 2 && seen.count(reinterpret_cast<uintptr_t>(a)) && seen.count(reinterpret_cast<uintptr_t>(b)));
  CHECK(sim_live_streams() == live);
  cudaStreamDestroy(a);
  cudaStreamDestroy(b);
}

void test_no_device_is_a_clear_error() {
  sim_set_device_count(0);
  bool clear = false;
  try {
    make_cuda_launcher(1, CudaOptions{});
  } catch (const std::runtime_error& e) {
    clear = std::string(e.what()).find("no usable CUDA device") != std::string::npos;
  }
  sim_set_device_count(1);
  CHECK(clear);
}

}  // namespace

int main() {
  test_graph_launch_path_is_counted_and_ordered();
  test_decode_of_round_r_overlaps_compute_of_round_r_plus_1();
  test_launch_error_fails_one_group();
  test_sticky_fault_poisons_the_context();
  test_cancel_skips_unlaunched_tasks_of_a_group();
  test_events_and_streams_do_not_leak();
  test_external_streams_are_used_and_not_destroyed();
  test_no_device_is_a_clear_error();
  std::printf("round executor on the simulated CUDA runtime: all tests passed\n");
  return 0;
}
