// Host backend: one worker thread per lane, the same contract as the CUDA backend.
//
// Each lane is a FIFO like a CUDA stream: a worker runs its lane's stages in submission order
// and waits (on a condition variable) until the head stage's dependencies are done. Blocks are
// submitted in increasing order and cross-block dependencies point backwards, so the global
// submission order is a topological order of the whole stream and a lane head can always make
// progress: FIFO lanes cannot deadlock. Several blocks are in flight at once: block b+1's
// denoising starts on its lane while block b's decode still runs on another.
#pragma once

#include <chrono>
#include <condition_variable>
#if defined(__GLIBCXX__)
#include <cxxabi.h>
#endif
#include <deque>
#include <mutex>
#include <thread>
#include <utility>

#include "block.h"

namespace avatar_sched {

class HostBackend final : public Backend {
 public:
  HostBackend(Plan plan, std::vector<StageWork> work) : plan_(std::move(plan)), window_(plan_.history) {
    if (work.size() != plan_.stages.size())
      throw std::invalid_argument("got " + std::to_string(work.size()) + " stage functions for " +
                                  std::to_string(plan_.stages.size()) + " stages");
    for (size_t i = 0; i < work.size(); ++i) {
      if (work[i].graph_exec != 0 || !work[i].fn)
        throw std::invalid_argument("stage '" + plan_.stages[i].name +
                                    "' is not a callable: the host backend runs only callables "
                                    "(CUDA graph execs need the cuda backend)");
      fns_.push_back(std::move(work[i].fn));
    }
    queues_.resize(plan_.num_lanes);
    for (int lane = 0; lane < plan_.num_lanes; ++lane) workers_.emplace_back([this, lane] { worker_loop(lane); });
  }

  ~HostBackend() override {
    try {
      close();
    } catch (...) {
      // Destroyed from one of its own stages: the bindings prevent this (they leak instead).
    }
  }

  const Plan& plan() const override { return plan_; }

  std::shared_ptr<Block> submit(int64_t index, std::shared_ptr<void> payload) override {
    std::shared_ptr<Block> dropped;
    std::shared_ptr<Block> blk;
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (stopping_) throw std::runtime_error("scheduler is closed");
      if (cancelled_) throw Cancelled("scheduler was cancelled: call reset() before submitting block " +
                                      std::to_string(index));
      window_.check_next(index);
      blk = std::make_shared<Block>(this, index, plan_.stages.size(), cancel_count_, std::move(payload));
      blk->earlier = window_.earlier_for(index);
      for (size_t s = 0; s < plan_.stages.size(); ++s)
        queues_[plan_.stages[s].lane].emplace_back(blk, static_cast<int>(s));
      dropped = window_.push(blk);
    }
    cv_.notify_all();
    return blk;
  }

  void wait(const std::shared_ptr<Block>& blk, double timeout_s) override {
    check_owner(blk);
    std::unique_lock<std::mutex> lk(mu_);
    auto finished = [&] { return blk->unsettled == 0 || cancel_count_ > blk->cancel_mark; };
    if (timeout_s < 0) {
      cv_.wait(lk, finished);
    } else if (!cv_.wait_for(lk, std::chrono::duration<double>(timeout_s), finished)) {
      throw WaitTimeout("block " + std::to_string(blk->index) + " not done after " + std::to_string(timeout_s) + " s");
    }
    if (blk->failure) throw StageFailed(blk->failure, blk->index);
    if (blk->unsettled != 0 || blk->cancelled)
      throw Cancelled("block " + std::to_string(blk->index) + " was cancelled");
  }

  bool done(const std::shared_ptr<Block>& blk) override {
    check_owner(blk);
    std::lock_guard<std::mutex> lk(mu_);
    return blk->unsettled == 0 || cancel_count_ > blk->cancel_mark;  // i.e. wait() would not block
  }

  void cancel() override {
    {
      std::lock_guard<std::mutex> lk(mu_);
      cancelled_ = true;
      ++cancel_count_;
    }
    cv_.notify_all();
  }

  void reset() override {
    cancel();
    std::deque<std::shared_ptr<Block>> forgotten;
    {
      std::unique_lock<std::mutex> lk(mu_);
      if (stopping_) throw std::runtime_error("scheduler is closed");
      cv_.wait(lk, [&] { return running_ == 0 && all_queues_empty(); });
      forgotten = window_.clear();
      cancelled_ = false;
    }
    cv_.notify_all();
  }

  // Stops and joins the workers, then drops the stage functions: they may reference the
  // scheduler's owner, a cycle Python's GC cannot see through C++.
  void close() override {
    for (const auto& t : workers_)
      if (t.get_id() == std::this_thread::get_id())
        throw std::logic_error("close() called from one of the scheduler's own stages");
    {
      std::lock_guard<std::mutex> lk(mu_);
      if (stopping_) return;  // already closed (or closing on another thread)
      stopping_ = true;
      cancelled_ = true;
      ++cancel_count_;
    }
    cv_.notify_all();
    for (auto& t : workers_)
      if (t.joinable()) t.join();
    workers_.clear();
    std::vector<StageFn> fns;
    std::deque<std::shared_ptr<Block>> forgotten;
    std::lock_guard<std::mutex> lk(mu_);
    fns.swap(fns_);
    forgotten = window_.clear();
  }

 private:
  using Item = std::pair<std::shared_ptr<Block>, int>;

  void check_owner(const std::shared_ptr<Block>& blk) const {
    if (!blk || blk->owner != this) throw std::invalid_argument("handle does not belong to this scheduler");
  }

  bool all_queues_empty() const {
    for (const auto& q : queues_)
      if (!q.empty()) return false;
    return true;
  }

  // Anything to do for the lane head: settle it without running, or run it.
  bool head_actionable(const Item& item) const {
    if (cancelled_ || item.first->failure) return true;
    return check_deps(plan_, *item.first, item.second).kind != DepStatus::Waiting;
  }

  void worker_loop(int lane) {
    std::deque<Item>& q = queues_[lane];
    std::unique_lock<std::mutex> lk(mu_);
    for (;;) {
      cv_.wait(lk, [&] { return (stopping_ && q.empty()) || (!q.empty() && head_actionable(q.front())); });
      if (q.empty()) return;  // stopping
      Item item = std::move(q.front());
      q.pop_front();
      if (!settle_without_running(item)) run_stage(lk, item, lane);
      lk.unlock();
      cv_.notify_all();
      item = Item();  // a Block's last reference may go here, with no lock held
      lk.lock();
    }
  }

  // Cancelled, or its block failed, or a dependency in another block failed: settle, don't run.
  bool settle_without_running(const Item& item) {
    Block& blk = *item.first;
    const int s = item.second;
    if (cancelled_) return settle(blk, s, NodeState::Cancelled), true;
    if (blk.failure) return settle(blk, s, NodeState::Skipped), true;
    DepStatus st = check_deps(plan_, blk, s);
    if (st.kind == DepStatus::DepCancelled) return settle(blk, s, NodeState::Cancelled), true;
    if (st.kind == DepStatus::Broken) {
      blk.failure = st.failure;
      return settle(blk, s, NodeState::Skipped), true;
    }
    return false;
  }

  void run_stage(std::unique_lock<std::mutex>& lk, const Item& item, int lane) {
    Block& blk = *item.first;
    const int s = item.second;
    blk.nodes[s] = NodeState::Running;
    ++running_;
    LaunchInfo info{blk.index, s, lane, 0, blk.payload.get()};
    lk.unlock();
    std::exception_ptr error;
    try {
      fns_[s](info);
#if defined(__GLIBCXX__)
    } catch (abi::__forced_unwind&) {
      throw;  // pthread_exit (e.g. Python ending a thread that asks for the GIL at exit) must unwind
#endif
    } catch (...) {
      error = std::current_exception();
    }
    std::shared_ptr<const Failure> failure;
    if (error)
      failure = std::make_shared<Failure>(Failure{plan_.stages[s].name, blk.index, describe_exception(error), error});
    lk.lock();
    --running_;
    // The first failure of a block wins; a second one (a parallel lane) is only dropped.
    if (failure && !blk.failure) blk.failure = failure;
    settle(blk, s, error ? NodeState::Failed : NodeState::Done);
    lk.unlock();
    failure.reset();  // may hold a Python exception: released with no lock held
    lk.lock();
  }

  Plan plan_;
  std::vector<StageFn> fns_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::vector<std::deque<Item>> queues_;
  std::vector<std::thread> workers_;
  BlockWindow window_;
  int running_ = 0;
  bool cancelled_ = false;
  bool stopping_ = false;
  uint64_t cancel_count_ = 0;
};

}  // namespace avatar_sched
