// The prefill path of the CPU op: each coupling layer runs over a chunk of rows as one BLAS GEMM
// (ATen's addmm, i.e. MKL/OpenBLAS) into views of one scratch tensor, with the gather, tanh and
// the bounded affine step (and log-det) as the row-streaming path does them (flow_cpu.h).
// Torch-dependent: only the torch op uses it; the llama.cpp hook stays on run_flow.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "flow_cpu.h"

namespace innsteer {
namespace cpu {

// From this many rows on the op takes the BLAS path: below it, streaming the weights once per
// 8-row tile beats a GEMM's packing; above it, a GEMM's register blocking wins (crossover
// measured in bench/RESULTS.md, "Prefill path").
constexpr int64_t kBlasMinRows = 32;
// Rows per BLAS pass: bounds the scratch (u, gathered, hidden and st of this many rows) so a
// chunk's activations stay in cache between the GEMMs and the elementwise passes.
constexpr int64_t kBlasChunkRows = 256;
// Rows per task of the elementwise passes.
constexpr int64_t kBlasRowGrain = 16;

template <class T>
at::ScalarType scalar_type_of() {
  if constexpr (std::is_same<T, float>::value) return at::kFloat;
  if constexpr (std::is_same<T, double>::value) return at::kDouble;
  static_assert(std::is_same<T, float>::value || std::is_same<T, double>::value || std::is_same<T, bf16_t>::value,
                "no ATen dtype for this weight type");
  return at::kBFloat16;
}

// A read-only [rows, cols] weight matrix as an Acc tensor (bfloat16 weights widened once per call).
template <class Acc, class W>
at::Tensor weight_matrix(const W* data, int64_t rows, int64_t cols) {
  const at::Tensor m = at::from_blob(const_cast<W*>(data), {rows, cols}, at::TensorOptions().dtype(scalar_type_of<W>()));
  return std::is_same<W, Acc>::value ? m : m.to(scalar_type_of<Acc>());
}

template <class Acc>
at::Tensor bias_vector(const Acc* data, int64_t n) {
  return at::from_blob(const_cast<Acc*>(data), {n}, at::TensorOptions().dtype(scalar_type_of<Acc>()));
}

// Runs `mode` (see FlowRows in flow_cpu.h) over `rows` rows, kBlasChunkRows at a time.
template <class Acc, class In, class W>
void run_flow_blas(const FlowView<Acc, W>& f, FlowMode mode, const In* input, const In* residual, In* output,
                   Acc* logdet_out, int64_t rows, Acc alpha, const Acc* direction) {
  const FlowRows<Acc, In, W> io(f, mode, input, residual, output, logdet_out, alpha, direction);
  const int64_t dim = f.dim, n_hidden = f.hidden;
  const FlowShape<Acc, W> shape(f);
  const int64_t chunk = std::min(rows, kBlasChunkRows);

  // The one scratch tensor: u [chunk, dim], gathered [chunk, max_cond], hidden [chunk, H],
  // st [chunk, 2 * max_trans], logdet [chunk].
  const int64_t u_size = chunk * dim, gathered_size = chunk * shape.max_cond, hidden_size = chunk * n_hidden,
                st_size = chunk * 2 * shape.max_trans;
  at::Tensor scratch = at::empty({u_size + gathered_size + hidden_size + st_size + chunk},
                                 at::TensorOptions().dtype(scalar_type_of<Acc>()));
  Acc* const u = scratch.data_ptr<Acc>();
  Acc* const gathered_data = u + u_size;
  Acc* const hidden_data = gathered_data + gathered_size;
  Acc* const st_data = hidden_data + hidden_size;
  Acc* const logdet = st_data + st_size;
  auto scratch_matrix = [&](int64_t offset, int64_t n, int64_t cols) {
    return scratch.narrow(0, offset, n * cols).view({n, cols});
  };

  std::vector<at::Tensor> w1, b1, w2, b2;
  if (!io.identity) {
    for (int64_t k = 0; k < f.n_couplings; ++k) {
      const CouplingView<Acc, W>& c = f.couplings[k];
      w1.push_back(weight_matrix<Acc>(c.w1, c.n_cond, n_hidden));
      b1.push_back(bias_vector(c.b1, n_hidden));
      w2.push_back(weight_matrix<Acc>(c.w2, n_hidden, 2 * c.n_trans));
      b2.push_back(bias_vector(c.b2, 2 * c.n_trans));
    }
  }

  for (int64_t r0 = 0; r0 < rows; r0 += chunk) {
    const int64_t n = std::min(chunk, rows - r0);
    auto each_rows = [n](auto&& fn) {
      at::parallel_for(0, n, kBlasRowGrain, [&](int64_t b, int64_t e) { fn(b, e - b); });
    };
    each_rows([&](int64_t b, int64_t nb) { io.load(r0 + b, nb, u + b * dim, logdet + b); });
    if (io.identity) continue;

    at::Tensor hidden = scratch_matrix(u_size + gathered_size, n, n_hidden);
    auto coupling = [&](int64_t k, bool inverse, Acc* ld) {
      const CouplingView<Acc, W>& c = f.couplings[k];
      const int64_t n_st = 2 * c.n_trans;
      at::Tensor gathered = scratch_matrix(u_size, n, c.n_cond);
      at::Tensor st = scratch_matrix(u_size + gathered_size + hidden_size, n, n_st);
      each_rows([&](int64_t b, int64_t nb) {
        gather_conditioner(c, u + b * dim, dim, gathered_data + b * c.n_cond, nb);
      });
      at::addmm_out(hidden, b1[k], gathered, w1[k]);
      each_rows([&](int64_t b, int64_t nb) { tanh_inplace(hidden_data + b * n_hidden, nb * n_hidden); });
      at::addmm_out(st, b2[k], hidden, w2[k]);
      each_rows([&](int64_t b, int64_t nb) {
        apply_affine(c, f.clamp, st_data + b * n_st, u + b * dim, dim, nb, inverse, ld ? ld + b : nullptr);
      });
    };
    if (mode != FlowMode::kInverse) {
      for (int64_t k = 0; k < f.n_couplings; ++k) coupling(k, false, logdet);
    }
    if (mode == FlowMode::kSteer) each_rows([&](int64_t b, int64_t nb) { io.shift_latent(nb, u + b * dim); });
    if (mode != FlowMode::kForward) {
      for (int64_t k = f.n_couplings - 1; k >= 0; --k) coupling(k, true, nullptr);
    }
    each_rows([&](int64_t b, int64_t nb) { io.store(r0 + b, nb, u + b * dim, logdet + b); });
  }
}

}  // namespace cpu
}  // namespace innsteer
