// The CUDA backend of the innsteer ops (csrc/flow_ops.h): device properties and the scratch
// allocation around csrc/cuda/flow_cuda.h. The only file of the CUDA build that includes torch's
// CUDA headers; built only against a CUDA torch (setup.py).
//
// Not checked here, because each would cost a device-to-host synchronization per call (and break
// CUDA-graph capture): the values of cond_idx / trans_idx (INN builds them as partitions and
// Steerer.load validates them), and the finiteness of the activations, of direction and of the
// results (NaN / Inf, and overflow, propagate to the output instead of raising as on the CPU).
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream is at::cuda::getCurrentCUDAStream
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "../flow_ops.h"
#include "flow_cuda.h"

namespace innsteer {
namespace {

// Per device, read once (not during a later graph capture). INNSTEER_CUDA_PDL=0 turns programmatic
// dependent launch off, to tell its effect (or a driver that cannot capture it) apart.
cuda::DeviceInfo device_info(const at::Device& device) {
  static const std::vector<cuda::DeviceInfo> infos = [] {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    TORCH_CHECK(err == cudaSuccess, "innsteer: cannot count CUDA devices: ", cudaGetErrorString(err));
    const char* pdl = std::getenv("INNSTEER_CUDA_PDL");
    const bool allow_pdl = !(pdl && std::string(pdl) == "0");
    std::vector<cuda::DeviceInfo> out;
    for (int d = 0; d < n; ++d) {
      int sms = 0, major = 0;
      err = cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, d);
      if (err == cudaSuccess) err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, d);
      TORCH_CHECK(err == cudaSuccess, "innsteer: cannot query CUDA device ", d, ": ", cudaGetErrorString(err));
      out.push_back({sms, allow_pdl && major >= 9});
    }
    return out;
  }();
  TORCH_CHECK(device.index() >= 0 && device.index() < static_cast<int>(infos.size()), "innsteer: no CUDA device ",
              device);
  return infos[device.index()];
}

struct CudaBackend {
  static constexpr const char* kName = "CUDA";
  static constexpr bool kHostMemory = false;
  using Guard = c10::cuda::CUDAGuard;

  static bool on_device(const at::Device& device) { return device.is_cuda(); }

  // Enqueues the flow on the current stream.
  template <class Acc, class In, class W>
  static void launch(const FlowView<Acc, W>& flow, FlowMode mode, const In* input, const In* residual, In* output,
                     Acc* logdet, int64_t rows, Acc alpha, const Acc* direction, const at::Tensor& like) {
    const cuda::DeviceInfo dev = device_info(like.device());
    const size_t bytes = cuda::scratch_bytes<Acc, In, W>(flow, mode, rows, alpha, dev);
    at::Tensor scratch = at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
    const cudaError_t err =
        cuda::run_flow<Acc, In, W>(flow, mode, input, residual, output, logdet, rows, alpha, direction,
                                   bytes ? scratch.data_ptr() : nullptr, dev,
                                   c10::cuda::getCurrentCUDAStream().stream());
    TORCH_CHECK(err == cudaSuccess, "innsteer: CUDA kernel launch failed for ", rows, " rows of hidden size ",
                flow.dim, ": ", cudaGetErrorString(err));
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(innsteer, CUDA, m) { register_flow_ops<CudaBackend>(m); }

}  // namespace innsteer
