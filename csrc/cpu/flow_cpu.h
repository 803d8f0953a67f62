// The flow on the CPU: forward (x -> z, log|det J|), inverse (z -> x) and the fused steer
// (hidden [+ residual] -> phi^-1(phi(h) + alpha * v)) over rows of `dim` values.
// Plain C++ templates, no torch: the torch op and the llama.cpp hook both instantiate these,
// passing their own parallel-for.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "../flow_types.h"
#include "gemm_cpu.h"

namespace innsteer {
namespace cpu {

// Runs fn(c0, c1) over the columns [0, n_cols) of a gemm's output: all at once here; the llama.cpp
// hook passes one that splits one token's columns across threads (each column's sum keeps its
// order, so the result is the same bits).
struct SerialColumns {
  template <class Fn>
  void operator()(int64_t n_cols, Fn&& fn) const {
    fn(int64_t(0), n_cols);
  }
};

template <class Acc, class W>
struct FlowShape {
  int64_t max_cond = 0;
  int64_t max_trans = 0;
  explicit FlowShape(const FlowView<Acc, W>& f) {
    for (int64_t k = 0; k < f.n_couplings; ++k) {
      max_cond = std::max(max_cond, f.couplings[k].n_cond);
      max_trans = std::max(max_trans, f.couplings[k].n_trans);
    }
  }
};

// Scratch elements (of type Acc) each worker needs: one tile of rows plus the coupling MLP's
// gathered input, hidden activations, (s, t) pairs and per-row log-det partials.
template <class Acc, class W>
int64_t workspace_per_worker(const FlowView<Acc, W>& f) {
  const FlowShape<Acc, W> shape(f);
  return kTileTokens * (f.dim + shape.max_cond + f.hidden + 2 * shape.max_trans + 1);
}

template <class In>
bool all_finite(const In* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    if (!std::isfinite(to_acc(x[i]))) return false;
  }
  return true;
}

template <class Acc>
struct TileBuffers {
  Acc* u;        // [tile, dim]
  Acc* gathered; // [tile, max_cond]
  Acc* hidden;   // [tile, hidden]
  Acc* st;       // [tile, 2 * max_trans]
  Acc* logdet;   // [tile]

  template <class W>
  TileBuffers(Acc* base, const FlowView<Acc, W>& f) {
    const FlowShape<Acc, W> shape(f);
    u = base;
    gathered = u + kTileTokens * f.dim;
    hidden = gathered + kTileTokens * shape.max_cond;
    st = hidden + kTileTokens * f.hidden;
    logdet = st + kTileTokens * 2 * shape.max_trans;
  }
};

template <class Acc, class W>
void gather_conditioner(const CouplingView<Acc, W>& c, const Acc* u, int64_t dim, Acc* gathered, int64_t nt) {
  for (int64_t t = 0; t < nt; ++t) {
    for (int64_t i = 0; i < c.n_cond; ++i) gathered[t * c.n_cond + i] = u[t * dim + c.cond_idx[i]];
  }
}

// hidden = tanh(gathered @ w1 + b1).  A bounded activation keeps (s, t) locally constant for
// rows far outside the training data, so the flow stays well conditioned (invertible to float32
// precision) on LLMs' massive-activation rows.
template <class Acc, class W, class Columns = SerialColumns>
void hidden_layer(const CouplingView<Acc, W>& c, int64_t n_hidden, const Acc* gathered, Acc* hidden, int nt,
                  const Columns& columns = Columns()) {
  for (int t = 0; t < nt; ++t) std::copy(c.b1, c.b1 + n_hidden, hidden + t * n_hidden);
  columns(n_hidden, [&](int64_t c0, int64_t c1) {
    gemm_accumulate(c.w1 + c0, n_hidden, gathered, c.n_cond, hidden + c0, n_hidden, c.n_cond, c1 - c0, nt);
  });
  for (int t = 0; t < nt; ++t) tanh_inplace(hidden + t * n_hidden, n_hidden);
}

// The affine step on rows whose raw (s, t) = hidden @ w2 + b2 are in st (row stride 2 * n_trans):
// bounds (s, t), then u = u * e^s + t (or its inverse) on the transformed coordinates, adding
// sum(s) (or -sum(s)) to logdet when given. Shared by the row-streaming and the BLAS paths.
template <class Acc, class W>
void apply_affine(const CouplingView<Acc, W>& c, Acc clamp, Acc* st, Acc* u, int64_t dim, int64_t nt, bool inverse,
                  Acc* logdet) {
  const int64_t n_st = 2 * c.n_trans;
  const Acc shift_clamp = static_cast<Acc>(kShiftClampFactor) * clamp;
  for (int64_t t = 0; t < nt; ++t) {
    Acc* st_t = st + t * n_st;
    Acc* u_t = u + t * dim;
    const Acc s_sum = scale_shift_inplace(st_t, c.n_trans, clamp, shift_clamp, inverse);
    for (int64_t j = 0; j < c.n_trans; ++j) {
      const Acc factor = st_t[2 * j], shift = st_t[2 * j + 1];  // exp(+-s), t
      Acc& v = u_t[c.trans_idx[j]];
      v = inverse ? (v - shift) * factor : v * factor + shift;
    }
    if (logdet) logdet[t] += inverse ? -s_sum : s_sum;
  }
}

// (s, t) = bounded(hidden @ w2 + b2), then the affine step.
template <class Acc, class W, class Columns = SerialColumns>
void affine_step(const CouplingView<Acc, W>& c, int64_t n_hidden, Acc clamp, const Acc* hidden, Acc* st, Acc* u,
                 int64_t dim, int nt, bool inverse, Acc* logdet, const Columns& columns = Columns()) {
  const int64_t n_st = 2 * c.n_trans;
  for (int t = 0; t < nt; ++t) std::copy(c.b2, c.b2 + n_st, st + t * n_st);
  columns(n_st, [&](int64_t c0, int64_t c1) {
    gemm_accumulate(c.w2 + c0, n_st, hidden, n_hidden, st + c0, n_st, n_hidden, c1 - c0, nt);
  });
  apply_affine(c, clamp, st, u, dim, nt, inverse, logdet);
}

template <class Acc, class W, class Columns = SerialColumns>
void coupling_tile(const FlowView<Acc, W>& f, int64_t k, const TileBuffers<Acc>& buf, int nt, bool inverse,
                   Acc* logdet, const Columns& columns = Columns()) {
  const CouplingView<Acc, W>& c = f.couplings[k];
  gather_conditioner(c, buf.u, f.dim, buf.gathered, nt);
  hidden_layer(c, f.hidden, buf.gathered, buf.hidden, nt, columns);
  affine_step(c, f.hidden, f.clamp, buf.hidden, buf.st, buf.u, f.dim, nt, inverse, logdet, columns);
}

// Reads rows into the flow's working space and writes results back, for one call of `mode`:
//   kForward: output = z (standardized, then couplings 0..K-1), logdet_out[r] = log|det J|.
//   kInverse: output = x from z (couplings K-1..0, then de-standardized).
//   kSteer:   h = input (+ residual, rounded to In like an eager add); output = h if alpha == 0
//             (bit for bit), else phi^-1(phi(h) + alpha * direction).
// output may alias input (in-place): each row is read before it is written.
template <class Acc, class In, class W>
struct FlowRows {
  const FlowView<Acc, W>& f;
  FlowMode mode;
  const In* input;
  const In* residual;
  In* output;
  Acc* logdet_out;
  Acc alpha;
  const Acc* direction;
  bool identity;     // a steer with alpha == 0: load() writes the rows straight out
  Acc base_logdet;   // log|det| of the standardization

  FlowRows(const FlowView<Acc, W>& flow, FlowMode m, const In* in, const In* res, In* out, Acc* logdet, Acc a,
           const Acc* dir)
      : f(flow), mode(m), input(in), residual(res), output(out), logdet_out(logdet), alpha(a), direction(dir),
        identity(m == FlowMode::kSteer && a == Acc(0)), base_logdet(0) {
    for (int64_t i = 0; i < f.dim; ++i) base_logdet -= std::log(f.scale[i]);
  }

  // Rows r0..r0+nt into u (standardized unless inverting), logdet to its base value.
  void load(int64_t r0, int64_t nt, Acc* u, Acc* logdet) const {
    const int64_t dim = f.dim;
    for (int64_t t = 0; t < nt; ++t) {
      const In* in = input + (r0 + t) * dim;
      const In* res = residual ? residual + (r0 + t) * dim : nullptr;
      Acc* u_t = u + t * dim;
      In* out = output + (r0 + t) * dim;
      for (int64_t i = 0; i < dim; ++i) {
        Acc v = to_acc(in[i]);
        if (res) v = to_acc(from_acc<In>(v + to_acc(res[i])));
        if (identity) {
          out[i] = from_acc<In>(v);
        } else {
          u_t[i] = mode == FlowMode::kInverse ? v : (v - f.mean[i]) / f.scale[i];
        }
      }
      logdet[t] = base_logdet;
    }
  }

  // Between phi and phi^-1 of a steer: u += alpha * direction.
  void shift_latent(int64_t nt, Acc* u) const {
    for (int64_t t = 0; t < nt; ++t) {
      for (int64_t i = 0; i < f.dim; ++i) u[t * f.dim + i] += alpha * direction[i];
    }
  }

  void store(int64_t r0, int64_t nt, const Acc* u, const Acc* logdet) const {
    const int64_t dim = f.dim;
    for (int64_t t = 0; t < nt; ++t) {
      const Acc* u_t = u + t * dim;
      In* out = output + (r0 + t) * dim;
      if (mode == FlowMode::kForward) {
        for (int64_t i = 0; i < dim; ++i) out[i] = from_acc<In>(u_t[i]);
        logdet_out[r0 + t] = logdet[t];
      } else {
        for (int64_t i = 0; i < dim; ++i) out[i] = from_acc<In>(u_t[i] * f.scale[i] + f.mean[i]);
      }
    }
  }
};

// Runs `mode` (see FlowRows) over `rows` rows of `dim` values, a tile of kTileTokens rows at a
// time streaming the weights once per tile: the decode path (and the llama.cpp hook's only one).
// workspace holds n_workers * workspace_per_worker(f) values.
// pfor(n, grain, fn) must call fn(begin, end, worker) over [0, n) with worker < n_workers.
template <class Acc, class In, class W, class ParallelFor, class Columns = SerialColumns>
void run_flow(const FlowView<Acc, W>& f, FlowMode mode, const In* input, const In* residual, In* output,
              Acc* logdet_out, int64_t rows, Acc alpha, const Acc* direction, Acc* workspace, int n_workers,
              ParallelFor&& pfor, const Columns& columns = Columns()) {
  const FlowRows<Acc, In, W> io(f, mode, input, residual, output, logdet_out, alpha, direction);
  const int64_t per_worker = workspace_per_worker(f);

  // Rows are independent: workers take whole tiles, one fork/join per call. A tile is never
  // split across threads: splitting decode's 1-8 tokens (by rows, or one token's products by
  // columns with a join per layer) measured no faster on 2 cores and stalled badly whenever
  // another process held a core.
  const int64_t n_tiles = (rows + kTileTokens - 1) / kTileTokens;
  pfor(n_tiles, 1, [&](int64_t b, int64_t e, int worker) {
    const TileBuffers<Acc> buf(workspace + worker * per_worker, f);
    for (int64_t tile = b; tile < e; ++tile) {
      const int64_t r0 = tile * kTileTokens;
      const int nt = static_cast<int>(std::min<int64_t>(kTileTokens, rows - r0));
      io.load(r0, nt, buf.u, buf.logdet);
      if (io.identity) continue;
      if (mode != FlowMode::kInverse) {
        for (int64_t k = 0; k < f.n_couplings; ++k) coupling_tile(f, k, buf, nt, false, buf.logdet, columns);
      }
      if (mode == FlowMode::kSteer) io.shift_latent(nt, buf.u);
      if (mode != FlowMode::kForward) {
        for (int64_t k = f.n_couplings - 1; k >= 0; --k)
          coupling_tile(f, k, buf, nt, true, static_cast<Acc*>(nullptr), columns);
      }
      io.store(r0, nt, buf.u, buf.logdet);
    }
  });
}

}  // namespace cpu
}  // namespace innsteer
