// The CPU backend of the innsteer ops (csrc/flow_ops.h): from blas_min_rows<W>() rows on the BLAS
// prefill path (csrc/cpu/flow_blas_cpu.h), below it the row-streaming flow (csrc/cpu/flow_cpu.h).
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include "../flow_ops.h"
#include "flow_blas_cpu.h"
#include "flow_cpu.h"

namespace innsteer {
namespace {

struct CpuBackend {
  static constexpr const char* kName = "CPU";
  static constexpr bool kHostMemory = true;
  struct Guard {
    explicit Guard(const at::Device&) {}
  };

  static bool on_device(const at::Device& device) { return device.is_cpu(); }

  static bool all_finite(const at::Tensor& x) {
    const void* data = x.data_ptr();
    switch (x.scalar_type()) {
      case at::kFloat: return cpu::all_finite(static_cast<const float*>(data), x.numel());
      case at::kDouble: return cpu::all_finite(static_cast<const double*>(data), x.numel());
      case at::kBFloat16: return cpu::all_finite(static_cast<const bf16_t*>(data), x.numel());
      case at::kHalf: return cpu::all_finite(static_cast<const half_t*>(data), x.numel());
      default: TORCH_CHECK(false, "innsteer: no finiteness check for dtype ", x.scalar_type());
    }
  }

  template <class Acc, class In, class W>
  static void launch(const FlowView<Acc, W>& flow, FlowMode mode, const In* input, const In* residual, In* output,
                     Acc* logdet, int64_t rows, Acc alpha, const Acc* direction, const at::Tensor& like) {
    if (rows >= cpu::blas_min_rows<W>()) {
      cpu::run_flow_blas<Acc, In, W>(flow, mode, input, residual, output, logdet, rows, alpha, direction);
      return;
    }
    const int n_workers = at::get_num_threads();
    at::Tensor workspace = at::empty({n_workers * cpu::workspace_per_worker(flow)},
                                     like.options().dtype(accumulate_dtype(like.scalar_type())));
    auto pfor = [](int64_t n, int64_t grain, auto&& fn) {
      at::parallel_for(0, n, grain, [&](int64_t b, int64_t e) { fn(b, e, at::get_thread_num()); });
    };
    cpu::run_flow<Acc, In, W>(flow, mode, input, residual, output, logdet, rows, alpha, direction,
                              static_cast<Acc*>(workspace.data_ptr()), n_workers, pfor);
  }
};

}  // namespace

TORCH_LIBRARY_IMPL(innsteer, CPU, m) { register_flow_ops<CpuBackend>(m); }

}  // namespace innsteer
