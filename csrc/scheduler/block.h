// Per-block bookkeeping shared by the host and CUDA backends: node states, failures, errors,
// the window of recent blocks that cross-block dependencies refer to.
#pragma once

#include <cstdint>
#include <deque>
#include <exception>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "plan.h"

namespace avatar_sched {

enum class NodeState : uint8_t {
  Pending,
  Running,
  Done,       // host: finished; CUDA: launched (completion is tracked by events)
  Failed,     // the stage raised
  Skipped,    // not run: its block failed, or a dependency in another block failed
  Cancelled,  // not run: cancel() came first
};

inline bool is_settled(NodeState s) { return s != NodeState::Pending && s != NodeState::Running; }

// The first error of a block: the stage that raised and the block it ran for. Blocks that fail
// because they depend on it share the same Failure, so the root cause is always reported.
struct Failure {
  std::string stage;
  int64_t block = 0;
  std::string message;
  std::exception_ptr cause;
};

// Raised by wait(): the block did not complete because `failure` happened (maybe in an earlier
// block it depends on).
class StageFailed : public std::runtime_error {
 public:
  StageFailed(std::shared_ptr<const Failure> f, int64_t waited_block)
      : std::runtime_error(describe(*f, waited_block)), failure(std::move(f)), waited_block(waited_block) {}
  std::shared_ptr<const Failure> failure;
  int64_t waited_block;

 private:
  static std::string describe(const Failure& f, int64_t waited) {
    std::string s = "stage '" + f.stage + "' of block " + std::to_string(f.block) + " failed: " + f.message;
    if (waited != f.block) s += " (block " + std::to_string(waited) + " depends on it and was abandoned)";
    return s;
  }
};

class Cancelled : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

class WaitTimeout : public std::runtime_error {
 public:
  using std::runtime_error::runtime_error;
};

// What a stage callable learns about its launch. `payload` is the per-block object given to
// submit() (the bindings store the Python inputs and results there); `stream` is the lane's
// cudaStream_t as an integer on the CUDA backend and 0 on the host backend.
struct LaunchInfo {
  int64_t block = 0;
  int stage = 0;
  int lane = 0;
  uintptr_t stream = 0;
  void* payload = nullptr;
};

using StageFn = std::function<void(const LaunchInfo&)>;

// The work of one stage: a callable, or (CUDA backend only) an instantiated CUDA graph.
struct StageWork {
  StageFn fn;
  uintptr_t graph_exec = 0;  // cudaGraphExec_t as an integer; 0 when `fn` is used
};

struct Block {
  Block(const void* owner, int64_t index, size_t num_stages, uint64_t cancel_mark, std::shared_ptr<void> payload)
      : owner(owner), index(index), nodes(num_stages, NodeState::Pending),
        unsettled(static_cast<int>(num_stages)), cancel_mark(cancel_mark), payload(std::move(payload)) {}
  virtual ~Block() = default;

  const void* owner;   // the scheduler that made it (wait() refuses foreign handles)
  int64_t index;
  std::vector<NodeState> nodes;
  int unsettled;
  uint64_t cancel_mark;  // scheduler's cancel count at submission
  bool cancelled = false;
  std::shared_ptr<const Failure> failure;
  std::shared_ptr<void> payload;
  // Earlier blocks this one may depend on (held until it settles, then dropped so that a long
  // stream never builds a chain of blocks keeping each other alive).
  std::vector<std::shared_ptr<Block>> earlier;

  const Block* find_earlier(int64_t idx) const {
    for (const auto& b : earlier)
      if (b->index == idx) return b.get();
    return nullptr;
  }
};

// How a stage's dependencies stand right now.
struct DepStatus {
  enum Kind { Ready, Waiting, Broken, DepCancelled } kind = Ready;
  std::shared_ptr<const Failure> failure;  // for Broken
  std::vector<std::pair<const Block*, int>> sources;  // resolved (block, stage) pairs
};

// A dependency on a block that was never submitted (before the first block, or a gap in the
// indices) is satisfied: there is nothing to wait for.
inline DepStatus check_deps(const Plan& plan, const Block& blk, int stage) {
  DepStatus st;
  for (const Dep& d : plan.deps[stage]) {
    const Block* src = d.block_offset == 0 ? &blk : blk.find_earlier(blk.index + d.block_offset);
    if (!src) continue;
    st.sources.emplace_back(src, d.stage);
    NodeState s = src->nodes[d.stage];
    if (s == NodeState::Failed || s == NodeState::Skipped) {
      st.kind = DepStatus::Broken;
      st.failure = src->failure;
      return st;
    }
    if (s == NodeState::Cancelled) { st.kind = DepStatus::DepCancelled; return st; }
    if (s != NodeState::Done) st.kind = DepStatus::Waiting;
  }
  return st;
}

// Settles one node; returns true when that completed the block.
inline bool settle(Block& blk, int stage, NodeState state) {
  blk.nodes[stage] = state;
  if (state == NodeState::Cancelled) blk.cancelled = true;
  if (--blk.unsettled == 0) {
    blk.earlier.clear();
    return true;
  }
  return false;
}

inline std::string describe_exception(const std::exception_ptr& e) {
  try {
    std::rethrow_exception(e);
  } catch (const std::exception& ex) {
    return ex.what();
  } catch (...) {
    return "unknown non-standard exception";
  }
}

// The last `history` submitted blocks, i.e. every block a new block can depend on. Also
// enforces that block indices increase, which keeps every dependency pointing backwards.
class BlockWindow {
 public:
  explicit BlockWindow(int history) : history_(history) {}

  void check_next(int64_t index) const {
    if (has_last_ && index <= last_)
      throw std::invalid_argument("block " + std::to_string(index) + " submitted after block " +
                                  std::to_string(last_) + ": block indices must increase (reset() starts over)");
  }

  std::vector<std::shared_ptr<Block>> earlier_for(int64_t index) const {
    std::vector<std::shared_ptr<Block>> out;
    for (const auto& b : recent_)
      if (b->index >= index - history_) out.push_back(b);
    return out;
  }

  // Returns the block that fell out of the window (dropped by the caller outside any lock).
  std::shared_ptr<Block> push(std::shared_ptr<Block> blk) {
    last_ = blk->index;
    has_last_ = true;
    if (history_ == 0) return nullptr;
    recent_.push_back(std::move(blk));
    if (static_cast<int>(recent_.size()) <= history_) return nullptr;
    std::shared_ptr<Block> old = std::move(recent_.front());
    recent_.pop_front();
    return old;
  }

  std::deque<std::shared_ptr<Block>> clear() {
    has_last_ = false;
    std::deque<std::shared_ptr<Block>> out;
    out.swap(recent_);
    return out;
  }

 private:
  int history_;
  std::deque<std::shared_ptr<Block>> recent_;
  int64_t last_ = 0;
  bool has_last_ = false;
};

// The contract both backends implement (the bindings only see this).
class Backend {
 public:
  virtual ~Backend() = default;
  // Launches (CUDA) or queues (host) every stage of block `index`; never waits for stages.
  virtual std::shared_ptr<Block> submit(int64_t index, std::shared_ptr<void> payload) = 0;
  // Blocks until `blk` completed; throws StageFailed, Cancelled or WaitTimeout (timeout_s >= 0).
  virtual void wait(const std::shared_ptr<Block>& blk, double timeout_s) = 0;
  virtual bool done(const std::shared_ptr<Block>& blk) = 0;
  // Stops launching stages; pending waits throw Cancelled; running stages finish.
  virtual void cancel() = 0;
  // cancel(), then waits for running stages and forgets every block: a fresh session.
  virtual void reset() = 0;
  // Stops the workers for good (called from the destructor too).
  virtual void close() = 0;
  virtual const Plan& plan() const = 0;
};

}  // namespace avatar_sched
