// A simulated CUDA runtime for testing the CUDA backend on machines without a GPU.
//
// sim_cudart.cpp defines the handful of cudart functions the backend calls, with real stream
// semantics: each stream is a host thread draining its queue in order, an event record completes
// when its stream reaches it, cudaStreamWaitEvent waits for the record that was latest at call
// time. A "graph exec" is a SimGraph whose body runs on the stream. Link it instead of cudart.
#pragma once

#include <cuda_runtime_api.h>

#include <functional>
#include <string>

struct SimGraph {
  std::function<cudaError_t()> body;  // runs on the launching stream's thread
};

// Enqueues host work on a stream, like an eager kernel launched by a stage callable.
void sim_enqueue(cudaStream_t stream, std::function<cudaError_t()> work);
void sim_set_device_count(int count);
int sim_live_events();
int sim_live_streams();
void sim_clear_sticky_error();

// What the code under test asked of the runtime, counted (reset by sim_reset_counts).
struct SimCounts {
  int graph_launches = 0;
  int stream_waits = 0;
  int event_records = 0;
};
SimCounts sim_counts();
void sim_reset_counts();
