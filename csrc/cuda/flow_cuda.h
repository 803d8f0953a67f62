// Host entry points of the CUDA flow: forward (with log-det), inverse and the fused steer.
// Plain C++ on the CUDA runtime (no torch): csrc/cuda/ops_cuda.cpp checks tensors, allocates the
// scratch and calls these; nvcc compile-checks them on machines without a CUDA torch.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

#include "../flow_types.h"

namespace innsteer {
namespace cuda {

struct DeviceInfo {
  int num_sms;            // the decode path spreads each layer's weights over >= 2 blocks per SM
  bool dependent_launch;  // programmatic dependent launch between the chain's kernels (sm_90+)
};

// Bytes of device scratch run_flow needs for `rows` rows (0 for the alpha == 0 steer).
template <class Acc, class In, class W>
size_t scratch_bytes(const FlowView<Acc, W>& f, FlowMode mode, int64_t rows, Acc alpha, const DeviceInfo& dev);

// Runs `mode` over `rows` contiguous rows of f.dim values, with the semantics of
// innsteer::cpu::run_flow (csrc/cpu/flow_cpu.h). `f` lives in host memory; every pointer in it
// (and input, residual, output, logdet, direction, scratch) is device memory. output may alias
// input. Enqueues work on `stream` only: no allocation, no host synchronization, so it can be
// captured into a CUDA graph. Returns the first launch error.
template <class Acc, class In, class W>
cudaError_t run_flow(const FlowView<Acc, W>& f, FlowMode mode, const In* input, const In* residual, In* output,
                     Acc* logdet, int64_t rows, Acc alpha, const Acc* direction, void* scratch,
                     const DeviceInfo& dev, cudaStream_t stream);

}  // namespace cuda
}  // namespace innsteer
