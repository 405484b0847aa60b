// A round plan and its executor: the one launch engine of the scheduler.
//
// A round is the work of one engine step: the next block of every batched session (audio
// conditioning, denoising steps, refresh, decode), given as a list of tasks. Each task names a
// lane, its dependencies (earlier tasks of the round, or tasks of earlier rounds) and a failure
// group (a session). The executor runs one worker thread per lane; a lane is a FIFO across rounds,
// like a CUDA stream. What "running a task" means is the Launcher's business: the host launcher
// calls the task's function, the CUDA launcher (cuda_launcher.cpp) enqueues a graph exec or calls
// the function with the lane stream, with event waits for the dependencies on other lanes.
//
// Deadlock freedom: intra-round dependencies point to earlier indices and cross-round ones to
// earlier rounds, so submission order is a topological order and every lane head can progress.
// Plain C++17, no framework include.
#pragma once

#include <chrono>
#include <condition_variable>
#if defined(__GLIBCXX__)
#include <cxxabi.h>
#endif
#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <map>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include "nvtx.h"

namespace avatar_sched {

// Why a group failed: the task that raised (or the device fault, or the cancellation), kept as
// the root cause for every task skipped because of it.
struct Failure {
  enum Kind { Raised, DeviceFault, Cancelled } kind = Raised;
  std::string stage;
  int64_t block = -1;
  std::string message;
  std::exception_ptr cause;
};
using FailurePtr = std::shared_ptr<const Failure>;

class WaitTimeout : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// The CUDA context is poisoned (a sticky error such as an illegal address): nothing more can run.
class ContextPoisoned : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

struct Round;

struct ExternalDep {
  std::shared_ptr<Round> round;
  int task = 0;
};

struct TaskSpec {
  std::string name;
  int lane = 0;
  int group = 0;  // failure domain id (the bindings map Python hashables to ids)
  int64_t block = -1;
  std::vector<int> deps;              // earlier tasks of this round
  std::vector<ExternalDep> external;  // tasks of earlier rounds (done or in flight)
  std::function<void(uintptr_t stream)> fn;  // empty when graph_exec is set
  uintptr_t graph_exec = 0;           // cudaGraphExec_t as an integer (CUDA launcher only)
};

enum class TaskState : uint8_t { Queued, Running, Done, Failed, Skipped, Cancelled };

inline bool settled(TaskState s) { return s != TaskState::Queued && s != TaskState::Running; }
inline bool broken(TaskState s) { return s == TaskState::Failed || s == TaskState::Skipped || s == TaskState::Cancelled; }

struct Round {
  Round(const void* owner, uint64_t seq, std::vector<TaskSpec> tasks)
      : owner(owner), seq(seq), tasks(std::move(tasks)), state(this->tasks.size(), TaskState::Queued),
        cause(this->tasks.size()), unsettled(static_cast<int>(this->tasks.size())) {}

  const void* owner;
  uint64_t seq;
  std::vector<TaskSpec> tasks;
  std::vector<TaskState> state;
  std::vector<FailurePtr> cause;                       // per task, why it did not run or failed
  std::map<int, std::pair<int, FailurePtr>> failed;    // group -> (first failing task, failure)
  int unsettled;
  std::shared_ptr<void> device_state;  // the launcher's per-round data (CUDA: events)
  std::shared_ptr<void> keepalive;     // objects the plan references (Python graphs, owners)

  void fail_group(int t, FailurePtr f) {
    auto it = failed.find(tasks[t].group);
    if (it == failed.end()) failed.emplace(tasks[t].group, std::make_pair(t, std::move(f)));
    else if (t < it->second.first && f && f->kind != Failure::Cancelled) it->second.first = t;
  }
};

// Runs tasks for the executor's lane threads (see the header comment).
class Launcher {
 public:
  virtual ~Launcher() = default;
  virtual void prepare(Round&) {}
  // Runs or enqueues task t on its lane; throws on failure. Called on the lane's thread, without
  // the executor lock. `wait_on` lists the dependencies that ran on other lanes.
  virtual void launch(Round& r, int t, const std::vector<std::pair<const Round*, int>>& wait_on) = 0;
  // After every task settled: waits for the device (timeout_s < 0: no limit) and returns the
  // device fault, if any, pinned on a task; throws WaitTimeout.
  virtual std::pair<int, FailurePtr> finish(Round&, double /*timeout_s*/) { return {-1, nullptr}; }
  virtual bool finished(Round&) { return true; }
  virtual void close() {}
  virtual std::string name() const = 0;
};

class HostLauncher final : public Launcher {
 public:
  void launch(Round& r, int t, const std::vector<std::pair<const Round*, int>>&) override {
    if (!r.tasks[t].fn)
      throw std::invalid_argument("task '" + r.tasks[t].name +
                                  "' has no function: the host backend runs only Task.fn (graphs need cuda)");
    r.tasks[t].fn(0);
  }
  std::string name() const override { return "host"; }
};

inline std::string describe_exception(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    return ex.what();
  } catch (...) {
    return "unknown non-standard exception";
  }
}

class RoundExecutor {
 public:
  RoundExecutor(int num_lanes, std::unique_ptr<Launcher> launcher)
      : launcher_(std::move(launcher)), queues_(num_lanes) {
    if (num_lanes < 1) throw std::invalid_argument("a round runner needs at least one lane");
    for (int lane = 0; lane < num_lanes; ++lane) workers_.emplace_back([this, lane] { worker_loop(lane); });
  }
  ~RoundExecutor() {
    try {
      close();
    } catch (...) {
      // Destroyed from one of its own tasks: the bindings prevent this.
    }
  }
  RoundExecutor(const RoundExecutor&) = delete;
  RoundExecutor& operator=(const RoundExecutor&) = delete;

  const std::string launcher_name() const { return launcher_->name(); }
  int num_lanes() const { return static_cast<int>(queues_.size()); }

  // Validates and queues a round; returns at once.
  std::shared_ptr<Round> submit(std::vector<TaskSpec> tasks, std::shared_ptr<void> keepalive) {
    check_tasks(tasks);
    std::shared_ptr<Round> r;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (stopping_) throw std::runtime_error("round runner is closed");
      if (poisoned_) throw ContextPoisoned(poison_message_);
      if (active_ == 0) cancel_marks_.clear();  // no round can still be affected by them
      r = std::make_shared<Round>(this, next_seq_++, std::move(tasks));
      r->keepalive = std::move(keepalive);
      launcher_->prepare(*r);
      ++active_;
      if (r->tasks.empty()) --active_;
      for (size_t t = 0; t < r->tasks.size(); ++t) queues_[r->tasks[t].lane].emplace_back(r, static_cast<int>(t));
    }
    cv_.notify_all();
    return r;
  }

  // Blocks until every task settled and the device finished; throws WaitTimeout.
  void wait(const std::shared_ptr<Round>& r, double timeout_s) {
    check_owner(r);
    const auto start = std::chrono::steady_clock::now();
    {
      std::unique_lock<std::mutex> lk(mu_);
      auto all_settled = [&] { return r->unsettled == 0; };
      if (timeout_s < 0) cv_.wait(lk, all_settled);
      else if (!cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), all_settled))
        throw WaitTimeout("round not done after " + std::to_string(timeout_s) + " s");
    }
    double left = -1.0;
    if (timeout_s >= 0)
      left = std::max(0.0, timeout_s - std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count());
    auto [task, fault] = launcher_->finish(*r, left);
    if (fault) record_device_fault(*r, task, fault);
  }

  bool done(const std::shared_ptr<Round>& r) {
    check_owner(r);
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (r->unsettled != 0) return false;
    }
    return launcher_->finished(*r);
  }

  // Tasks of `group` in rounds submitted so far that have not started are cancelled.
  void cancel(int group) {
    {
      std::lock_guard<std::mutex> lk(mu_);
      cancel_marks_[group] = next_seq_;
    }
    cv_.notify_all();
  }

  // Cancels every queued task, joins the lanes, then lets the launcher release its streams.
  void close() {
    for (const auto& t : workers_)
      if (t.get_id() == std::this_thread::get_id())
        throw std::logic_error("close() called from one of the round runner's own tasks");
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (stopping_) return;
      stopping_ = true;
    }
    cv_.notify_all();
    for (auto& t : workers_)
      if (t.joinable()) t.join();
    workers_.clear();
    launcher_->close();
  }

  bool poisoned() {
    std::lock_guard<std::mutex> lk(mu_);
    return poisoned_;
  }

 private:
  using Item = std::pair<std::shared_ptr<Round>, int>;

  void check_owner(const std::shared_ptr<Round>& r) const {
    if (!r || r->owner != this) throw std::invalid_argument("round handle does not belong to this round runner");
  }

  void check_tasks(const std::vector<TaskSpec>& tasks) const {
    for (size_t t = 0; t < tasks.size(); ++t) {
      const TaskSpec& s = tasks[t];
      const std::string where = "task #" + std::to_string(t) + " '" + s.name + "'";
      if (s.lane < 0 || s.lane >= num_lanes()) throw std::invalid_argument(where + ": lane out of range");
      if (!s.fn && s.graph_exec == 0) throw std::invalid_argument(where + " has neither a function nor a graph");
      for (int d : s.deps)
        if (d < 0 || d >= static_cast<int>(t))
          throw std::invalid_argument(where + " depends on task " + std::to_string(d) +
                                      ": a dependency must be an earlier task of the round");
      for (const ExternalDep& e : s.external) {
        if (!e.round || e.round->owner != this)
          throw std::invalid_argument(where + " depends on a round of another round runner");
        if (e.task < 0 || e.task >= static_cast<int>(e.round->tasks.size()))
          throw std::invalid_argument(where + " depends on task " + std::to_string(e.task) + " of an earlier round (it has " +
                                      std::to_string(e.round->tasks.size()) + " tasks)");
      }
    }
  }

  // The dependencies of (r, t) as (round, task) pairs.
  template <typename F>
  static void for_each_dep(const Round& r, int t, F&& f) {
    for (int d : r.tasks[t].deps) f(&r, d);
    for (const ExternalDep& e : r.tasks[t].external) f(e.round.get(), e.task);
  }

  bool head_ready(const Item& item) const {
    bool ready = true;
    for_each_dep(*item.first, item.second, [&](const Round* src, int d) { ready &= settled(src->state[d]); });
    return ready || stopping_;
  }

  // Returns the reason the task must not run, or null.
  FailurePtr reason_not_to_run(const Round& r, int t) const {
    FailurePtr why;
    for_each_dep(r, t, [&](const Round* src, int d) {
      if (!why && broken(src->state[d])) why = src->cause[d];
    });
    if (why) return why;
    auto it = r.failed.find(r.tasks[t].group);
    if (it != r.failed.end() && it->second.first < t) return it->second.second;
    auto mark = cancel_marks_.find(r.tasks[t].group);
    if (stopping_ || (mark != cancel_marks_.end() && r.seq < mark->second))
      return std::make_shared<Failure>(Failure{Failure::Cancelled, r.tasks[t].name, r.tasks[t].block,
                                               stopping_ ? "the round runner was closed" : "the group was cancelled",
                                               nullptr});
    return nullptr;
  }

  void worker_loop(int lane) {
    std::deque<Item>& q = queues_[lane];
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return (stopping_ && q.empty()) || (!q.empty() && head_ready(q.front())); });
      if (q.empty()) return;
      Item item = std::move(q.front());
      q.pop_front();
      if (FailurePtr why = reason_not_to_run(*item.first, item.second)) {
        Round& r = *item.first;
        r.cause[item.second] = why;
        r.fail_group(item.second, why);
        settle(r, item.second, why->kind == Failure::Cancelled ? TaskState::Cancelled : TaskState::Skipped);
      } else {
        run_task(lk, item);
      }
      std::vector<std::shared_ptr<Round>> drop;
      drop.swap(dropped_);
      lk.unlock();
      cv_.notify_all();
      item = Item();  // a round's last reference may go here (it may hold Python objects): no lock held
      drop.clear();
      lk.lock();
    }
  }

  void run_task(std::unique_lock<std::mutex>& lk, const Item& item) {
    Round& r = *item.first;
    const int t = item.second;
    r.state[t] = TaskState::Running;
    std::vector<std::pair<const Round*, int>> wait_on;
    for_each_dep(r, t, [&](const Round* src, int d) {
      if (src->tasks[d].lane != r.tasks[t].lane) wait_on.emplace_back(src, d);
    });
    lk.unlock();
    FailurePtr failure;
    {
      NvtxRange range(r.tasks[t].name);
      try {
        launcher_->launch(r, t, wait_on);
#if defined(__GLIBCXX__)
      } catch (abi::__forced_unwind&) {
        throw;  // thread teardown (pthread_exit) must unwind
#endif
      } catch (const ContextPoisoned& e) {
        failure = std::make_shared<Failure>(
            Failure{Failure::DeviceFault, r.tasks[t].name, r.tasks[t].block, e.what(), std::current_exception()});
      } catch (...) {
        std::exception_ptr e = std::current_exception();
        failure = std::make_shared<Failure>(
            Failure{Failure::Raised, r.tasks[t].name, r.tasks[t].block, describe_exception(e), e});
      }
    }
    lk.lock();
    if (failure) {
      r.cause[t] = failure;
      r.fail_group(t, failure);
      if (failure->kind == Failure::DeviceFault) poison(failure->message);
    }
    settle(r, t, failure ? TaskState::Failed : TaskState::Done);
    lk.unlock();
    failure.reset();  // may hold a Python exception: released with no lock held
    lk.lock();
  }

  void settle(Round& r, int t, TaskState s) {
    r.state[t] = s;
    if (--r.unsettled == 0) {
      --active_;
      // Drop the links to earlier rounds: a long stream must not build a chain of rounds. They
      // may be the last references (holding Python objects): released by the caller, unlocked.
      for (TaskSpec& task : r.tasks) {
        for (ExternalDep& e : task.external) dropped_.push_back(std::move(e.round));
        task.external.clear();
      }
    }
  }

  void record_device_fault(Round& r, int task, FailurePtr fault) {
    std::lock_guard<std::mutex> lk(mu_);
    const bool sticky = fault->kind == Failure::DeviceFault;
    for (size_t t = 0; t < r.tasks.size(); ++t) {  // a poisoned context fails every group of the round
      if (static_cast<int>(t) == task || (sticky && r.state[t] == TaskState::Done)) {
        r.fail_group(static_cast<int>(t), fault);
        if (!r.cause[t]) r.cause[t] = fault;
      }
    }
    if (sticky) poison(fault->message);
  }

  void poison(const std::string& message) {
    if (poisoned_) return;
    poisoned_ = true;
    poison_message_ = "the CUDA context is poisoned by an earlier device fault (" + message +
                      "); no more rounds can run in this process";
  }

  std::unique_ptr<Launcher> launcher_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::deque<Item>> queues_;
  std::vector<std::thread> workers_;
  std::map<int, uint64_t> cancel_marks_;  // group -> rounds with seq below it are cancelled
  std::vector<std::shared_ptr<Round>> dropped_;
  uint64_t next_seq_ = 0;
  int active_ = 0;
  bool stopping_ = false;
  bool poisoned_ = false;
  std::string poison_message_;
};

}  // namespace avatar_sched
