// Host-side planning of the per-block stage DAG.
//
// A block (one latent block of the stream) runs the same small DAG every time: denoising steps,
// the KV refresh, the VAE decode. `make_plan` validates that DAG once, on the host, and fixes a
// launch order; the backends then replay the plan for every submitted block without re-checking
// anything (FlashInfer's plan()/run() split). No framework includes: this header is plain C++17.
#pragma once

#include <algorithm>
#include <cstdint>
#include <stdexcept>
#include <string>
#include <unordered_map>
#include <vector>

namespace avatar_sched {

// A bad stage graph: unknown dependency, cycle, bad lane, duplicate name...
class PlanError : public std::invalid_argument {
 public:
  using std::invalid_argument::invalid_argument;
};

// "stage `stage` of block (b + block_offset) must finish first". Offset 0 is the same block;
// -1 is the previous block (e.g. step0 of block b after the KV refresh of block b-1). Future
// blocks (offset > 0) are rejected: blocks are submitted in increasing order.
struct DepSpec {
  std::string stage;
  int block_offset = 0;
};

struct StageSpec {
  std::string name;
  int lane = 0;  // worker thread (host) or stream (CUDA) the stage runs on
  std::vector<DepSpec> deps;
};

// A dependency resolved to a stage index in the plan.
struct Dep {
  int stage = 0;
  int block_offset = 0;  // <= 0
};

struct Plan {
  std::vector<StageSpec> stages;        // in launch order
  std::vector<std::vector<Dep>> deps;   // deps[i] for stages[i], indices into `stages`
  int num_lanes = 0;
  int history = 0;                      // how many earlier blocks a block can depend on

  int index_of(const std::string& name) const {
    for (size_t i = 0; i < stages.size(); ++i)
      if (stages[i].name == name) return static_cast<int>(i);
    return -1;
  }
};

namespace detail {

inline void check_stage_fields(const std::vector<StageSpec>& specs, int num_lanes) {
  if (specs.empty()) throw PlanError("stage graph is empty: give at least one stage");
  if (num_lanes < 1) throw PlanError("num_lanes must be >= 1, got " + std::to_string(num_lanes));
  std::unordered_map<std::string, int> seen;
  for (size_t i = 0; i < specs.size(); ++i) {
    const StageSpec& s = specs[i];
    if (s.name.empty()) throw PlanError("stage #" + std::to_string(i) + " has an empty name");
    if (!seen.emplace(s.name, static_cast<int>(i)).second)
      throw PlanError("duplicate stage name '" + s.name + "'");
    if (s.lane < 0 || s.lane >= num_lanes)
      throw PlanError("stage '" + s.name + "' is on lane " + std::to_string(s.lane) +
                      " but there are only " + std::to_string(num_lanes) + " lanes");
  }
  for (const StageSpec& s : specs) {
    for (const DepSpec& d : s.deps) {
      if (!seen.count(d.stage))
        throw PlanError("stage '" + s.name + "' depends on unknown stage '" + d.stage + "'");
      if (d.block_offset > 0)
        throw PlanError("stage '" + s.name + "' depends on '" + d.stage + "' of a later block (offset " +
                        std::to_string(d.block_offset) + "); offsets must be <= 0");
      if (d.block_offset == 0 && d.stage == s.name)
        throw PlanError("stage '" + s.name + "' depends on itself in the same block");
    }
  }
}

// Follows same-block edges from a stage left over by Kahn's algorithm until a stage repeats:
// every leftover stage has a leftover predecessor, so this always closes a cycle.
inline std::string describe_cycle(const std::vector<StageSpec>& specs,
                                  const std::vector<std::vector<int>>& preds,
                                  const std::vector<int>& indegree) {
  int start = -1;
  for (size_t i = 0; i < specs.size(); ++i)
    if (indegree[i] > 0) { start = static_cast<int>(i); break; }
  std::vector<int> path;
  std::vector<int> pos(specs.size(), -1);
  int cur = start;
  while (pos[cur] < 0) {
    pos[cur] = static_cast<int>(path.size());
    path.push_back(cur);
    for (int p : preds[cur])
      if (indegree[p] > 0) { cur = p; break; }
  }
  // path[pos[cur]..] is the cycle walked backwards (stage -> its dependency); print it forwards.
  std::string out;
  std::vector<int> cycle(path.begin() + pos[cur], path.end());
  std::reverse(cycle.begin(), cycle.end());
  for (int i : cycle) out += specs[i].name + " -> ";
  return out + specs[cycle.front()].name;
}

}  // namespace detail

// Validates the stage graph and orders it: a topological order of the same-block edges that
// keeps the declaration order wherever the dependencies allow it (so traces read naturally).
inline Plan make_plan(const std::vector<StageSpec>& specs, int num_lanes) {
  detail::check_stage_fields(specs, num_lanes);
  const size_t n = specs.size();
  std::unordered_map<std::string, int> index;
  for (size_t i = 0; i < n; ++i) index[specs[i].name] = static_cast<int>(i);

  std::vector<std::vector<int>> preds(n), succs(n);
  std::vector<int> indegree(n, 0);
  int history = 0;
  for (size_t i = 0; i < n; ++i) {
    for (const DepSpec& d : specs[i].deps) {
      history = std::max(history, -d.block_offset);
      if (d.block_offset != 0) continue;  // cross-block edges cannot form a cycle
      int j = index[d.stage];
      if (std::find(preds[i].begin(), preds[i].end(), j) != preds[i].end()) continue;
      preds[i].push_back(j);
      succs[j].push_back(static_cast<int>(i));
      ++indegree[i];
    }
  }

  std::vector<int> order;
  std::vector<bool> placed(n, false);
  while (order.size() < n) {
    int next = -1;
    for (size_t i = 0; i < n && next < 0; ++i)
      if (!placed[i] && indegree[i] == 0) next = static_cast<int>(i);
    if (next < 0) throw PlanError("dependency cycle (each stage must finish before the next): " +
                                detail::describe_cycle(specs, preds, indegree));
    placed[next] = true;
    indegree[next] = -1;  // keeps describe_cycle off placed stages
    order.push_back(next);
    for (int s : succs[next]) --indegree[s];
  }

  Plan plan;
  plan.num_lanes = num_lanes;
  plan.history = history;
  std::vector<int> new_index(n);
  for (size_t k = 0; k < n; ++k) new_index[order[k]] = static_cast<int>(k);
  for (int old : order) plan.stages.push_back(specs[old]);
  plan.deps.resize(n);
  for (size_t k = 0; k < n; ++k) {
    for (const DepSpec& d : plan.stages[k].deps) {
      Dep dep{new_index[index[d.stage]], d.block_offset};
      bool dup = false;
      for (const Dep& e : plan.deps[k]) dup |= (e.stage == dep.stage && e.block_offset == dep.block_offset);
      if (!dup) plan.deps[k].push_back(dep);
    }
  }
  return plan;
}

}  // namespace avatar_sched
