// CPU implementations of the innsteer ops: argument checks, dtype dispatch, and the
// parallel-over-tokens driver around csrc/cpu/flow_cpu.h.
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/library.h>

#include "../flow_tensors.h"
#include "flow_cpu.h"

namespace innsteer {
namespace {

FlowArgs pack(const at::Tensor& mean, const at::Tensor& scale, at::TensorList cond_idx, at::TensorList trans_idx,
              at::TensorList w1, at::TensorList b1, at::TensorList w2, at::TensorList b2, double clamp) {
  return FlowArgs{mean, scale, cond_idx.vec(), trans_idx.vec(), w1.vec(), b1.vec(), w2.vec(), b2.vec(), clamp};
}

template <class In>
const In* data_as(const at::Tensor& t) {
  return static_cast<const In*>(t.data_ptr());
}

void check_cpu_input(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.device().is_cpu(), "innsteer: ", name, " is on ", x.device(), "; this is the CPU kernel");
}

void check_finite(const at::Tensor& x, const char* name) {
  bool ok = true;
  switch (x.scalar_type()) {
    case at::kFloat: ok = cpu::all_finite(data_as<float>(x), x.numel()); break;
    case at::kDouble: ok = cpu::all_finite(data_as<double>(x), x.numel()); break;
    case at::kBFloat16: ok = cpu::all_finite(data_as<bf16_t>(x), x.numel()); break;
    case at::kHalf: ok = cpu::all_finite(data_as<half_t>(x), x.numel()); break;
    default: break;
  }
  TORCH_CHECK(ok, "innsteer: ", name, " contains NaN or Inf; the flow is only defined on finite activations");
}

// Runs the flow over contiguous `input` (and `residual`) into `output` / `logdet`.
template <class Acc, class In, class W>
void launch(const FlowArgs& args, FlowMode mode, const at::Tensor& input, const at::Tensor* residual,
            at::Tensor& output, at::Tensor* logdet, double alpha, const at::Tensor* direction) {
  FlowHolder<Acc, W> flow(args);
  const int64_t rows = input.numel() / flow.view.dim;
  if (rows == 0) return;
  const int n_workers = at::get_num_threads();
  at::Tensor workspace = at::empty({n_workers * cpu::workspace_per_worker(flow.view)},
                                   input.options().dtype(accumulate_dtype(input.scalar_type())));
  auto pfor = [](int64_t n, int64_t grain, auto&& fn) {
    at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { fn(b, e, at::get_thread_num()); });
  };
  const at::Tensor dir = direction ? direction->contiguous() : at::Tensor();
  cpu::run_flow<Acc, In, W>(flow.view, mode, data_as<In>(input), residual ? data_as<In>(*residual) : nullptr,
                            static_cast<In*>(output.data_ptr()),
                            logdet ? static_cast<Acc*>(logdet->data_ptr()) : nullptr, rows,
                            static_cast<Acc>(alpha), direction ? data_as<Acc>(dir) : nullptr,
                            static_cast<Acc*>(workspace.data_ptr()), n_workers, pfor);
}

void dispatch(const FlowArgs& args, FlowMode mode, const at::Tensor& input, const at::Tensor* residual,
              at::Tensor& output, at::Tensor* logdet, double alpha, const at::Tensor* direction) {
  dispatch_flow_types(input.scalar_type(), args.w1[0].scalar_type(), [&](auto types) {
    using T = decltype(types);
    launch<typename T::Acc, typename T::In, typename T::W>(args, mode, input, residual, output, logdet, alpha,
                                                          direction);
  });
}

std::tuple<at::Tensor, at::Tensor> coupling_forward_cpu(const at::Tensor& x, const at::Tensor& mean,
                                                        const at::Tensor& scale, at::TensorList cond_idx,
                                                        at::TensorList trans_idx, at::TensorList w1,
                                                        at::TensorList b1, at::TensorList w2, at::TensorList b2,
                                                        double clamp) {
  const FlowArgs args = pack(mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp);
  check_cpu_input(x, "x");
  check_flow(x, "x", args, /*check_index_values=*/true);
  const at::Tensor input = x.contiguous();
  check_finite(input, "x");
  at::Tensor z = at::empty_like(input);
  at::Tensor logdet = at::empty(x.sizes().slice(0, x.dim() - 1), x.options().dtype(mean.scalar_type()));
  dispatch(args, FlowMode::kForward, input, nullptr, z, &logdet, 0.0, nullptr);
  return {z, logdet};
}

at::Tensor coupling_inverse_cpu(const at::Tensor& z, const at::Tensor& mean, const at::Tensor& scale,
                                at::TensorList cond_idx, at::TensorList trans_idx, at::TensorList w1,
                                at::TensorList b1, at::TensorList w2, at::TensorList b2, double clamp) {
  const FlowArgs args = pack(mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp);
  check_cpu_input(z, "z");
  check_flow(z, "z", args, /*check_index_values=*/true);
  const at::Tensor input = z.contiguous();
  check_finite(input, "z");
  at::Tensor x = at::empty_like(input);
  dispatch(args, FlowMode::kInverse, input, nullptr, x, nullptr, 0.0, nullptr);
  return x;
}

// Shared by steer and steer_: checks, then steers `hidden` (+ residual) into `output`.
void steer_into(const at::Tensor& hidden, const c10::optional<at::Tensor>& residual, const at::Tensor& direction,
                double alpha, const FlowArgs& args, at::Tensor& output) {
  check_cpu_input(hidden, "hidden");
  const int64_t dim = check_flow(hidden, "hidden", args, /*check_index_values=*/true);
  check_steer_args(hidden, residual, direction, alpha, dim);
  const at::Tensor input = hidden.contiguous();
  check_finite(input, "hidden");
  at::Tensor res;
  if (residual.has_value()) {
    res = residual->contiguous();
    check_finite(res, "residual");
  }
  dispatch(args, FlowMode::kSteer, input, residual.has_value() ? &res : nullptr, output, nullptr, alpha,
           &direction);
}

at::Tensor steer_cpu(const at::Tensor& hidden, const c10::optional<at::Tensor>& residual,
                     const at::Tensor& direction, double alpha, const at::Tensor& mean, const at::Tensor& scale,
                     at::TensorList cond_idx, at::TensorList trans_idx, at::TensorList w1, at::TensorList b1,
                     at::TensorList w2, at::TensorList b2, double clamp) {
  at::Tensor output = at::empty_like(hidden, at::MemoryFormat::Contiguous);
  steer_into(hidden, residual, direction, alpha, pack(mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp),
             output);
  return output;
}

void steer_inplace_cpu(at::Tensor& hidden, const c10::optional<at::Tensor>& residual, const at::Tensor& direction,
                       double alpha, const at::Tensor& mean, const at::Tensor& scale, at::TensorList cond_idx,
                       at::TensorList trans_idx, at::TensorList w1, at::TensorList b1, at::TensorList w2,
                       at::TensorList b2, double clamp) {
  const FlowArgs args = pack(mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp);
  if (hidden.is_contiguous()) {
    steer_into(hidden, residual, direction, alpha, args, hidden);
    return;
  }
  at::Tensor output = at::empty_like(hidden, at::MemoryFormat::Contiguous);
  steer_into(hidden, residual, direction, alpha, args, output);
  hidden.copy_(output);
}

}  // namespace

TORCH_LIBRARY_IMPL(innsteer, CPU, m) {
  m.impl("coupling_forward", &coupling_forward_cpu);
  m.impl("coupling_inverse", &coupling_inverse_cpu);
  m.impl("steer", &steer_cpu);
  m.impl("steer_", &steer_inplace_cpu);
}

}  // namespace innsteer
