// The prefill path of the CPU op: each coupling layer runs over a chunk of rows as one BLAS GEMM
// (ATen's addmm, i.e. MKL/OpenBLAS) into views of one scratch tensor, with the gather, tanh and
// the bounded affine step (and log-det) as the row-streaming path does them (flow_cpu.h).
// Torch-dependent: only the torch op uses it; the llama.cpp hook stays on run_flow.
#pragma once

#include <ATen/Parallel.h>
#include <ATen/ThreadLocalState.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/copy.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/from_blob.h>
#include <ATen/ops/mv.h>

#include <algorithm>
#include <type_traits>
#include <vector>

#include "flow_cpu.h"

namespace innsteer {
namespace cpu {

// From this many rows on the op takes the BLAS path: below it, streaming the weights once per
// 8-row tile beats a GEMM's packing; above it, a GEMM's register blocking wins. bfloat16 weights
// are widened to float32 for the GEMMs first, which moves their crossover up (both measured in
// bench/RESULTS.md, "Prefill path").
template <class W>
constexpr int64_t blas_min_rows() {
  return std::is_same<W, bf16_t>::value ? 48 : 32;
}
// Rows per BLAS pass: bounds the scratch (u, gathered, hidden and st of this many rows) so a
// chunk's activations stay in cache between the GEMMs and the elementwise passes.
constexpr int64_t kBlasChunkRows = 256;

template <class Acc>
at::ScalarType scalar_type_of() {
  static_assert(std::is_same<Acc, float>::value || std::is_same<Acc, double>::value,
                "flows compute in float or double");
  return std::is_same<Acc, float>::value ? at::kFloat : at::kDouble;
}

// Every coupling's weights as [rows, cols] Acc matrices: views of the caller's memory, or for
// bfloat16 weights one float32 copy (ATen's vectorized conversion).
template <class Acc, class W>
void weight_matrices(const FlowView<Acc, W>& f, std::vector<at::Tensor>& w1, std::vector<at::Tensor>& w2) {
  const int64_t n_hidden = f.hidden;
  if constexpr (std::is_same<W, Acc>::value) {
    const at::TensorOptions options = at::TensorOptions().dtype(scalar_type_of<Acc>());
    for (int64_t k = 0; k < f.n_couplings; ++k) {
      const CouplingView<Acc, W>& c = f.couplings[k];
      w1.push_back(at::from_blob(const_cast<W*>(c.w1), {c.n_cond, n_hidden}, options));
      w2.push_back(at::from_blob(const_cast<W*>(c.w2), {n_hidden, 2 * c.n_trans}, options));
    }
  } else {
    int64_t total = 0;
    for (int64_t k = 0; k < f.n_couplings; ++k) {
      total += (f.couplings[k].n_cond + 2 * f.couplings[k].n_trans) * n_hidden;
    }
    at::Tensor widened = at::empty({total}, at::TensorOptions().dtype(scalar_type_of<Acc>()));
    int64_t offset = 0;
    auto widen = [&](const W* data, int64_t rows, int64_t cols) {
      at::Tensor m = widened.narrow(0, offset, rows * cols).view({rows, cols});
      m.copy_(at::from_blob(const_cast<W*>(data), {rows, cols}, at::TensorOptions().dtype(at::kBFloat16)));
      offset += rows * cols;
      return m;
    };
    for (int64_t k = 0; k < f.n_couplings; ++k) {
      const CouplingView<Acc, W>& c = f.couplings[k];
      w1.push_back(widen(c.w1, c.n_cond, n_hidden));
      w2.push_back(widen(c.w2, n_hidden, 2 * c.n_trans));
    }
  }
}

template <class Acc>
at::Tensor bias_vector(const Acc* data, int64_t n) {
  return at::from_blob(const_cast<Acc*>(data), {n}, at::TensorOptions().dtype(scalar_type_of<Acc>()));
}

// Runs `mode` (see FlowRows in flow_cpu.h) over `rows` rows. One fork/join per call, like the
// row-streaming path: each worker takes a contiguous share of the rows and runs it in chunks of at
// most kBlasChunkRows with single-threaded GEMMs (BLAS called inside a parallel region does not
// fork again). Each fork/join costs a scheduler time slice whenever another process holds a core,
// so GEMMs parallelized inside BLAS plus parallel elementwise passes (seven joins per coupling)
// measured several times slower on a shared 2-core machine.
template <class Acc, class In, class W>
void run_flow_blas(const FlowView<Acc, W>& f, FlowMode mode, const In* input, const In* residual, In* output,
                   Acc* logdet_out, int64_t rows, Acc alpha, const Acc* direction) {
  const FlowRows<Acc, In, W> io(f, mode, input, residual, output, logdet_out, alpha, direction);
  const int64_t dim = f.dim, n_hidden = f.hidden;
  const FlowShape<Acc, W> shape(f);
  const int64_t n_workers = at::get_num_threads();
  const int64_t chunk = std::min(kBlasChunkRows, (rows + n_workers - 1) / n_workers);
  const int64_t n_chunks = (rows + chunk - 1) / chunk;

  // A steer's last coupling leaves its conditioner coordinates c unchanged, so phi^-1 feeds it
  // z_c + alpha * v_c and its first layer's pre-activation is phi's plus alpha * (v_c @ w1):
  // keeping phi's (pre_last) saves that GEMM.
  const int64_t last = f.n_couplings - 1;
  const bool reuse_last = mode == FlowMode::kSteer && !io.identity;

  // The one scratch tensor, per worker: u [chunk, dim], gathered [chunk, max_cond],
  // hidden [chunk, H], st [chunk, 2 * max_trans], logdet [chunk], pre_last [chunk, H] (steer).
  const int64_t u_size = chunk * dim, gathered_size = chunk * shape.max_cond, hidden_size = chunk * n_hidden,
                st_size = chunk * 2 * shape.max_trans;
  const int64_t per_worker =
      u_size + gathered_size + hidden_size + st_size + chunk + (reuse_last ? hidden_size : 0);
  at::Tensor scratch = at::empty({n_workers * per_worker}, at::TensorOptions().dtype(scalar_type_of<Acc>()));

  std::vector<at::Tensor> w1, b1, w2, b2;
  if (!io.identity) {
    weight_matrices(f, w1, w2);
    for (int64_t k = 0; k < f.n_couplings; ++k) {
      b1.push_back(bias_vector(f.couplings[k].b1, n_hidden));
      b2.push_back(bias_vector(f.couplings[k].b2, 2 * f.couplings[k].n_trans));
    }
  }
  std::vector<Acc> latent_shift_last;  // alpha * (direction_c @ w1) of the last coupling
  if (reuse_last) {
    const CouplingView<Acc, W>& c = f.couplings[last];
    at::Tensor direction_cond = at::empty({c.n_cond}, at::TensorOptions().dtype(scalar_type_of<Acc>()));
    for (int64_t i = 0; i < c.n_cond; ++i) direction_cond.data_ptr<Acc>()[i] = alpha * direction[c.cond_idx[i]];
    const at::Tensor shift = at::mv(w1[last].t(), direction_cond).contiguous();
    latent_shift_last.assign(shift.data_ptr<Acc>(), shift.data_ptr<Acc>() + n_hidden);
  }

  // The workers' ATen calls see the caller's thread-local state (inference mode, profiler) and
  // skip autograd: nothing here requires grad, and scratch made in inference mode is an inference
  // tensor that autograd's checks refuse to write outside it.
  const at::ThreadLocalState caller_state;
  at::parallel_for(0, n_chunks, 1, [&](int64_t chunk_begin, int64_t chunk_end) {
    const at::ThreadLocalStateGuard caller_state_guard(caller_state);
    const at::AutoDispatchBelowADInplaceOrView below_autograd;
    const int64_t base = at::get_thread_num() * per_worker;
    Acc* const u = scratch.data_ptr<Acc>() + base;
    Acc* const gathered = u + u_size;
    Acc* const hidden_data = gathered + gathered_size;
    Acc* const st_data = hidden_data + hidden_size;
    Acc* const logdet = st_data + st_size;
    Acc* const pre_last = logdet + chunk;
    for (int64_t ci = chunk_begin; ci < chunk_end; ++ci) {
      const int64_t r0 = ci * chunk, n = std::min(chunk, rows - r0);
      auto matrix = [&](const Acc* data, int64_t cols) {
        return scratch.narrow(0, base + (data - u), n * cols).view({n, cols});
      };
      io.load(r0, n, u, logdet);
      if (io.identity) continue;
      at::Tensor hidden = matrix(hidden_data, n_hidden);
      auto coupling = [&](int64_t k, bool inverse, Acc* ld) {
        const CouplingView<Acc, W>& c = f.couplings[k];
        at::Tensor st = matrix(st_data, 2 * c.n_trans);
        if (reuse_last && k == last && inverse) {
          for (int64_t r = 0; r < n; ++r) {
            for (int64_t j = 0; j < n_hidden; ++j)
              hidden_data[r * n_hidden + j] = pre_last[r * n_hidden + j] + latent_shift_last[j];
          }
        } else {
          gather_conditioner(c, u, dim, gathered, n);
          at::addmm_out(hidden, b1[k], matrix(gathered, c.n_cond), w1[k]);
          if (reuse_last && k == last) std::copy(hidden_data, hidden_data + n * n_hidden, pre_last);
        }
        tanh_inplace(hidden_data, n * n_hidden);
        at::addmm_out(st, b2[k], hidden, w2[k]);
        apply_affine(c, f.clamp, st_data, u, dim, n, inverse, ld);
      };
      if (mode != FlowMode::kInverse) {
        for (int64_t k = 0; k < f.n_couplings; ++k) coupling(k, false, logdet);
      }
      if (mode == FlowMode::kSteer) io.shift_latent(n, u);
      if (mode != FlowMode::kForward) {
        for (int64_t k = f.n_couplings - 1; k >= 0; --k) coupling(k, true, nullptr);
      }
      io.store(r0, n, u, logdet);
    }
  });
}

}  // namespace cpu
}  // namespace innsteer
