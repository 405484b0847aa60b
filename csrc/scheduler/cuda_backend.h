// CUDA backend: one cudaStream_t per lane, one cudaEvent_t per launched stage.
//
// submit() launches a whole block from the calling thread without ever waiting on the device:
// for each stage in plan order it makes the lane stream wait on the events of the stage's
// dependencies on other lanes (same-lane order is the stream's own FIFO), launches the stage (a
// cudaGraphExec_t, or a callable handed the stream), and records the stage's event. Cross-block
// dependencies use the events of the earlier block. Only wait() synchronises, on the block's events.
//
// This header has no CUDA include, so the bindings can name the factory without the toolkit;
// the implementation (csrc/cuda_backend.cpp) is compiled only when CMake finds the toolkit, which
// defines AVATAR_SCHED_WITH_CUDA.
#pragma once

#include <memory>
#include <vector>

#include "block.h"

namespace avatar_sched {

struct CudaOptions {
  int device = -1;                 // -1: the calling thread's current device
  std::vector<uintptr_t> streams;  // one existing cudaStream_t per lane; empty: create our own
};

#ifdef AVATAR_SCHED_WITH_CUDA
std::unique_ptr<Backend> make_cuda_backend(Plan plan, std::vector<StageWork> work, const CudaOptions& options);
int cuda_runtime_version();
#endif

}  // namespace avatar_sched
