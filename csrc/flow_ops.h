// The innsteer ops (schemas in csrc/ops.cpp), written once over a backend policy that
// csrc/cpu/ops_cpu.cpp and csrc/cuda/ops_cuda.cpp define and register with register_flow_ops.
//
// A Backend provides:
//   kName           "CPU" / "CUDA", for errors
//   on_device(d)    whether its kernels run on device d
//   Guard           constructed from the activations' device for the whole call
//   kHostMemory     whether the op may read tensor values: index partitions, finiteness of the
//                   activations, direction and results (on CUDA each read is a device sync)
//   all_finite(t)   (kHostMemory only) whether every value of contiguous t is finite
//   launch<Acc, In, W>(flow, mode, input, residual, output, logdet, rows, alpha, direction, like)
//                   runs the flow over `rows` contiguous rows; `like` is the input tensor, whose
//                   options any scratch is allocated with
#pragma once

#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include <tuple>

#include "flow_tensors.h"

namespace innsteer {

template <class Backend>
struct FlowOps {
  static std::tuple<at::Tensor, at::Tensor> coupling_forward(const at::Tensor& x, const at::Tensor& mean,
                                                             const at::Tensor& scale, at::TensorList cond_idx,
                                                             at::TensorList trans_idx, at::TensorList w1,
                                                             at::TensorList b1, at::TensorList w2, at::TensorList b2,
                                                             double clamp) {
    check_device(x, "x");
    const typename Backend::Guard guard(x.device());
    const FlowArgs args = pack_flow_args(mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp);
    check_flow(x, "x", args, Backend::kHostMemory);
    const at::Tensor input = x.contiguous();
    check_finite(input, "x");
    at::Tensor z = at::empty_like(input);
    at::Tensor logdet = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(mean.scalar_type()));
    run(args, FlowMode::kForward, input, nullptr, z, &logdet, 0.0, nullptr);
    check_result(z, "coupling_forward", "x is too large for this flow");
    return {z, logdet};
  }

  static at::Tensor coupling_inverse(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale,
                                     at::TensorList cond_idx, at::TensorList trans_idx, at::TensorList w1,
                                     at::TensorList b1, at::TensorList w2, at::TensorList b2, double clamp) {
    check_device(z, "z");
    const typename Backend::Guard guard(z.device());
    const FlowArgs args = pack_flow_args(mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp);
    check_flow(z, "z", args, Backend::kHostMemory);
    const at::Tensor input = z.contiguous();
    check_finite(input, "z");
    at::Tensor x = at::empty_like(input);
    run(args, FlowMode::kInverse, input, nullptr, x, nullptr, 0.0, nullptr);
    check_result(x, "coupling_inverse", "z is too large for this flow");
    return x;
  }

  static at::Tensor steer(const at::Tensor& hidden, const c10::optional<at::Tensor>& residual,
                          const at::Tensor& direction, double alpha, const at::Tensor& mean, const at::Tensor& scale,
                          at::TensorList cond_idx, at::TensorList trans_idx, at::TensorList w1, at::TensorList b1,
                          at::TensorList w2, at::TensorList b2, double clamp) {
    check_device(hidden, "hidden");
    const typename Backend::Guard guard(hidden.device());
    const FlowArgs args = pack_flow_args(mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp);
    check_steer(hidden, residual, direction, alpha, args);
    at::Tensor output = at::empty_like(hidden, at::MemoryFormat::Contiguous);
    steer_into(hidden, residual, direction, alpha, args, output);
    return output;
  }

  static void steer_(at::Tensor& hidden, const c10::optional<at::Tensor>& residual, const at::Tensor& direction,
                     double alpha, const at::Tensor& mean, const at::Tensor& scale, at::TensorList cond_idx,
                     at::TensorList trans_idx, at::TensorList w1, at::TensorList b1, at::TensorList w2,
                     at::TensorList b2, double clamp) {
    check_device(hidden, "hidden");
    const typename Backend::Guard guard(hidden.device());
    const FlowArgs args = pack_flow_args(mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp);
    check_steer(hidden, residual, direction, alpha, args);
    check_steer_inplace_memory(hidden, residual, direction, args);
    if (hidden.is_contiguous()) {
      steer_into(hidden, residual, direction, alpha, args, hidden);  // the kernels allow output == input
      return;
    }
    at::Tensor output = at::empty_like(hidden, at::MemoryFormat::Contiguous);
    steer_into(hidden, residual, direction, alpha, args, output);
    hidden.copy_(output);
  }

 private:
  static void check_device(const at::Tensor& x, const char* name) {
    TORCH_CHECK(Backend::on_device(x.device()), "innsteer: ", name, " is on ", x.device(), "; this is the ",
                Backend::kName, " kernel");
  }

  static void check_finite(const at::Tensor& contiguous, const char* name) {
    if constexpr (Backend::kHostMemory) {
      TORCH_CHECK(Backend::all_finite(contiguous), "innsteer: ", name,
                  " contains NaN or Inf; the flow is only defined on finite activations");
    }
  }

  // Finite inputs can still overflow the output dtype (float16's range ends at 65504).
  static void check_result(const at::Tensor& result, const char* op, const char* cause) {
    if constexpr (Backend::kHostMemory) {
      TORCH_CHECK(Backend::all_finite(result), "innsteer: ", op, " overflowed ", result.scalar_type(), ": ",
                  cause);
    }
  }

  static void check_steer(const at::Tensor& hidden, const c10::optional<at::Tensor>& residual,
                          const at::Tensor& direction, double alpha, const FlowArgs& args) {
    const int64_t dim = check_flow(hidden, "hidden", args, Backend::kHostMemory);
    check_steer_args(hidden, residual, direction, alpha, dim);
    if constexpr (Backend::kHostMemory) {
      const at::Tensor dir = direction.contiguous();
      if (dir.scalar_type() == at::kDouble) {
        check_latent_shift(dir.data_ptr<double>(), dir.numel(), alpha);
      } else {
        check_latent_shift(dir.data_ptr<float>(), dir.numel(), alpha);
      }
    }
  }

  // Steers checked `hidden` (+ residual) into contiguous `output`, which may be hidden itself.
  static void steer_into(const at::Tensor& hidden, const c10::optional<at::Tensor>& residual,
                         const at::Tensor& direction, double alpha, const FlowArgs& args, at::Tensor& output) {
    const at::Tensor input = hidden.contiguous();
    check_finite(input, "hidden");
    at::Tensor res;
    if (residual.has_value()) {
      res = residual->contiguous();
      check_finite(res, "residual");
    }
    run(args, FlowMode::kSteer, input, residual.has_value() ? &res : nullptr, output, nullptr, alpha, &direction);
    check_result(output, "steer", "the steered activations (or hidden + residual) are out of its range; use a "
                 "smaller alpha");
  }

  template <class T>
  static const T* data_as(const at::Tensor& t) {
    return static_cast<const T*>(t.data_ptr());
  }

  // Runs the flow over contiguous `input` (and `residual`) into contiguous `output` / `logdet`.
  static void run(const FlowArgs& args, FlowMode mode, const at::Tensor& input, const at::Tensor* residual,
                  at::Tensor& output, at::Tensor* logdet, double alpha, const at::Tensor* direction) {
    dispatch_flow_types(input.scalar_type(), args.w1[0].scalar_type(), [&](auto types) {
      using Acc = typename decltype(types)::Acc;
      using In = typename decltype(types)::In;
      using W = typename decltype(types)::W;
      const FlowHolder<Acc, W> flow(args);
      const int64_t rows = input.numel() / flow.view.dim;
      if (rows == 0) return;
      const at::Tensor dir = direction ? direction->contiguous() : at::Tensor();
      Backend::template launch<Acc, In, W>(flow.view, mode, data_as<In>(input),
                                           residual ? data_as<In>(*residual) : nullptr,
                                           static_cast<In*>(output.data_ptr()),
                                           logdet ? static_cast<Acc*>(logdet->data_ptr()) : nullptr, rows,
                                           static_cast<Acc>(alpha), direction ? data_as<Acc>(dir) : nullptr,
                                           input);
    });
  }
};

template <class Backend>
void register_flow_ops(torch::Library& m) {
  m.impl("coupling_forward", &FlowOps<Backend>::coupling_forward);
  m.impl("coupling_inverse", &FlowOps<Backend>::coupling_inverse);
  m.impl("steer", &FlowOps<Backend>::steer);
  m.impl("steer_", &FlowOps<Backend>::steer_);
}

}  // namespace innsteer
