// The CUDA launcher of the round executor (csrc/cuda_launcher.cpp): one stream per lane, an
// event recorded after every task, cudaStreamWaitEvent for dependencies on other lanes,
// cudaGraphLaunch for graph tasks. No CUDA include here, so the bindings can name the factory
// without the toolkit; it exists when CMake found the toolkit (AVATAR_SCHED_WITH_CUDA).
#pragma once

#include <cstdint>
#include <memory>
#include <vector>

#include "round.h"

namespace avatar_sched {

struct CudaOptions {
  int device = -1;                 // -1: the calling thread's current device
  std::vector<uintptr_t> streams;  // one existing cudaStream_t per lane; empty: create our own
};

#ifdef AVATAR_SCHED_WITH_CUDA
std::unique_ptr<Launcher> make_cuda_launcher(int num_lanes, const CudaOptions& options);
int cuda_runtime_version();
#endif

}  // namespace avatar_sched
