// CUDA implementations of the innsteer ops: tensor checks, dtype dispatch and the scratch
// allocation around csrc/cuda/flow_cuda.h. The only file of the CUDA build that includes torch's
// CUDA headers; built only against a CUDA torch (setup.py).
//
// Not checked here, because each would cost a device-to-host synchronization per call (and break
// CUDA-graph capture): the values of cond_idx / trans_idx (INN builds them as partitions and
// Steerer.load validates them, innsteer.steerer.check_partitions) and the finiteness of the
// activations (NaN / Inf propagate to the output instead of raising as on the CPU).
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>  // c10::cuda::getCurrentCUDAStream is at::cuda::getCurrentCUDAStream
#include <torch/library.h>

#include <cstdlib>
#include <string>
#include <vector>

#include "../flow_tensors.h"
#include "flow_cuda.h"

namespace innsteer {
namespace {

FlowArgs pack(const at::Tensor& mean, const at::Tensor& scale, at::TensorList cond_idx, at::TensorList trans_idx,
              at::TensorList w1, at::TensorList b1, at::TensorList w2, at::TensorList b2, double clamp) {
  return FlowArgs{mean, scale, cond_idx.vec(), trans_idx.vec(), w1.vec(), b1.vec(), w2.vec(), b2.vec(), clamp};
}

void check_cuda_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cuda(), "innsteer: ", name, " is on ", x.device(), "; this is the CUDA kernel");
}

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

template <class T>
const T* data_as(const at::Tensor& t) {
  return static_cast<const T*>(t.data_ptr());
}

// Runs the flow over contiguous `input` (and `residual`) into `output` / `logdet` on the current stream.
template <class Acc, class In, class W>
void launch(const FlowArgs& args, FlowMode mode, const at::Tensor& input, const at::Tensor* residual,
            at::Tensor& output, at::Tensor* logdet, double alpha, const at::Tensor* direction) {
  FlowHolder<Acc, W> flow(args);
  const int64_t rows = input.numel() / flow.view.dim;
  if (rows == 0) return;
  const cuda::DeviceInfo dev = device_info(input.device());
  const Acc a = static_cast<Acc>(alpha);
  const size_t bytes = cuda::scratch_bytes<Acc, In, W>(flow.view, mode, rows, a, dev);
  at::Tensor scratch = at::empty({static_cast<int64_t>(bytes)}, input.options().dtype(at::kByte));
  const at::Tensor dir = direction ? direction->contiguous() : at::Tensor();
  const cudaError_t err = cuda::run_flow<Acc, In, W>(
      flow.view, mode, data_as<In>(input), residual ? data_as<In>(*residual) : nullptr,
      static_cast<In*>(output.data_ptr()), logdet ? static_cast<Acc*>(logdet->data_ptr()) : nullptr, rows, a,
      direction ? data_as<Acc>(dir) : nullptr, bytes ? scratch.data_ptr() : nullptr, dev,
      c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, "innsteer: CUDA kernel launch failed for ", rows, " rows of hidden size ",
              flow.view.dim, ": ", cudaGetErrorString(err));
}

void dispatch(const FlowArgs& args, FlowMode mode, const at::Tensor& input, const at::Tensor* residual,
              at::Tensor& output, at::Tensor* logdet, double alpha, const at::Tensor* direction) {
  dispatch_flow_types(input.scalar_type(), args.w1[0].scalar_type(), [&](auto types) {
    using T = decltype(types);
    launch<typename T::Acc, typename T::In, typename T::W>(args, mode, input, residual, output, logdet, alpha,
                                                          direction);
  });
}

std::tuple<at::Tensor, at::Tensor> coupling_forward_cuda(const at::Tensor& x, const at::Tensor& mean,
                                                         const at::Tensor& scale, at::TensorList cond_idx,
                                                         at::TensorList trans_idx, at::TensorList w1,
                                                         at::TensorList b1, at::TensorList w2, at::TensorList b2,
                                                         double clamp) {
  const FlowArgs args = pack(mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp);
  check_cuda_input(x, "x");
  const c10::cuda::CUDAGuard guard(x.device());
  check_flow(x, "x", args, /*check_index_values=*/false);
  const at::Tensor input = x.contiguous();
  at::Tensor z = at::empty_like(input);
  at::Tensor logdet = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(mean.scalar_type()));
  dispatch(args, FlowMode::kForward, input, nullptr, z, &logdet, 0.0, nullptr);
  return {z, logdet};
}

at::Tensor coupling_inverse_cuda(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale,
                                 at::TensorList cond_idx, at::TensorList trans_idx, at::TensorList w1,
                                 at::TensorList b1, at::TensorList w2, at::TensorList b2, double clamp) {
  const FlowArgs args = pack(mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp);
  check_cuda_input(z, "z");
  const c10::cuda::CUDAGuard guard(z.device());
  check_flow(z, "z", args, /*check_index_values=*/false);
  const at::Tensor input = z.contiguous();
  at::Tensor x = at::empty_like(input);
  dispatch(args, FlowMode::kInverse, input, nullptr, x, nullptr, 0.0, nullptr);
  return x;
}

// Shared by steer and steer_: checks, then steers `hidden` (+ residual) into `output`.
void steer_into(const at::Tensor& hidden, const c10::optional<at::Tensor>& residual, const at::Tensor& direction,
                double alpha, const FlowArgs& args, at::Tensor& output) {
  check_cuda_input(hidden, "hidden");
  const int64_t dim = check_flow(hidden, "hidden", args, /*check_index_values=*/false);
  check_steer_args(hidden, residual, direction, alpha, dim);
  const at::Tensor input = hidden.contiguous();
  at::Tensor res;
  if (residual.has_value()) res = residual->contiguous();
  dispatch(args, FlowMode::kSteer, input, residual.has_value() ? &res : nullptr, output, nullptr, alpha,
           &direction);
}

at::Tensor steer_cuda(const at::Tensor& hidden, const c10::optional<at::Tensor>& residual,
                      const at::Tensor& direction, double alpha, const at::Tensor& mean, const at::Tensor& scale,
                      at::TensorList cond_idx, at::TensorList trans_idx, at::TensorList w1, at::TensorList b1,
                      at::TensorList w2, at::TensorList b2, double clamp) {
  check_cuda_input(hidden, "hidden");
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor output = at::empty_like(hidden, at::MemoryFormat::Contiguous);
  steer_into(hidden, residual, direction, alpha, pack(mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp),
             output);
  return output;
}

void steer_inplace_cuda(at::Tensor& hidden, const c10::optional<at::Tensor>& residual,
                        const at::Tensor& direction, double alpha, const at::Tensor& mean, const at::Tensor& scale,
                        at::TensorList cond_idx, at::TensorList trans_idx, at::TensorList w1, at::TensorList b1,
                        at::TensorList w2, at::TensorList b2, double clamp) {
  check_cuda_input(hidden, "hidden");
  const c10::cuda::CUDAGuard guard(hidden.device());
  const FlowArgs args = pack(mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp);
  if (hidden.is_contiguous()) {
    steer_into(hidden, residual, direction, alpha, args, hidden);  // the kernels allow output == input
    return;
  }
  at::Tensor output = at::empty_like(hidden, at::MemoryFormat::Contiguous);
  steer_into(hidden, residual, direction, alpha, args, output);
  hidden.copy_(output);
}

}  // namespace

TORCH_LIBRARY_IMPL(innsteer, CUDA, m) {
  m.impl("coupling_forward", &coupling_forward_cuda);
  m.impl("coupling_inverse", &coupling_inverse_cuda);
  m.impl("steer", &steer_cuda);
  m.impl("steer_", &steer_inplace_cuda);
}

}  // namespace innsteer
