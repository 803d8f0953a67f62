// Validates the op arguments that describe a flow and views them as a FlowView.
// Device-agnostic torch glue shared by the CPU and CUDA implementations.
#pragma once

#include <ATen/MemoryOverlap.h>
#include <ATen/core/Tensor.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <string>
#include <utility>
#include <vector>

#include "flow_types.h"

namespace innsteer {

struct FlowArgs {
  at::Tensor mean;
  at::Tensor scale;
  std::vector<at::Tensor> cond_idx, trans_idx, w1, b1, w2, b2;
  double clamp;
};

inline FlowArgs pack_flow_args(const at::Tensor& mean, const at::Tensor& scale, at::TensorList cond_idx,
                               at::TensorList trans_idx, at::TensorList w1, at::TensorList b1, at::TensorList w2,
                               at::TensorList b2, double clamp) {
  return FlowArgs{mean, scale, cond_idx.vec(), trans_idx.vec(), w1.vec(), b1.vec(), w2.vec(), b2.vec(), clamp};
}

inline std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

inline bool is_activation_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kBFloat16 || t == at::kHalf || t == at::kDouble;
}

// The dtype the flow computes in for activations of dtype `x`: float64 stays float64,
// everything else runs in float32.
inline at::ScalarType accumulate_dtype(at::ScalarType x) { return x == at::kDouble ? at::kDouble : at::kFloat; }

inline void check_param(const at::Tensor& t, const char* name, int64_t k, at::IntArrayRef shape,
                        at::ScalarType dtype, const at::Device& device) {
  const std::string where = k >= 0 ? std::string(name) + "[" + std::to_string(k) + "]" : std::string(name);
  TORCH_CHECK(t.device() == device, "innsteer: ", where, " is on ", t.device(), " but the activations are on ",
              device);
  TORCH_CHECK(t.sizes() == shape, "innsteer: ", where, " has shape ", shape_str(t), ", expected ", shape);
  TORCH_CHECK(t.scalar_type() == dtype, "innsteer: ", where, " has dtype ", t.scalar_type(), ", expected ", dtype);
}

// Checks every flow tensor against the activations `x` (shape [..., dim]) and returns the
// flow's dim. Index values are checked only when `check_index_values` (host memory).
inline int64_t check_flow(const at::Tensor& x, const char* x_name, const FlowArgs& f, bool check_index_values) {
  TORCH_CHECK(is_activation_dtype(x.scalar_type()), "innsteer: ", x_name,
              " must be float32, bfloat16, float16 or float64, got ", x.scalar_type());
  TORCH_CHECK(x.dim() >= 1, "innsteer: ", x_name, " must have at least one dimension (..., hidden_size)");
  TORCH_CHECK(f.mean.dim() == 1, "innsteer: mean must be 1-D, got shape ", shape_str(f.mean));
  const int64_t dim = f.mean.size(0);
  TORCH_CHECK(x.size(-1) == dim, "innsteer: ", x_name, " has hidden size ", x.size(-1),
              " but the flow was built for hidden size ", dim);
  const at::Device device = x.device();
  const at::ScalarType acc = accumulate_dtype(x.scalar_type());
  check_param(f.mean, "mean", -1, {dim}, acc, device);
  check_param(f.scale, "scale", -1, {dim}, acc, device);
  TORCH_CHECK(f.clamp >= kMinClamp && f.clamp <= kMaxClamp, "innsteer: clamp must be in [", kMinClamp, ", ",
              kMaxClamp, "] (larger clamps overflow float32 or make the steer NaN), got ", f.clamp);

  const size_t n = f.cond_idx.size();
  TORCH_CHECK(n >= 1, "innsteer: the flow needs at least one coupling");
  TORCH_CHECK(f.trans_idx.size() == n && f.w1.size() == n && f.b1.size() == n && f.w2.size() == n &&
                  f.b2.size() == n,
              "innsteer: cond_idx, trans_idx, w1, b1, w2 and b2 must list the same number of couplings, got ",
              n, ", ", f.trans_idx.size(), ", ", f.w1.size(), ", ", f.b1.size(), ", ", f.w2.size(), ", ",
              f.b2.size());
  TORCH_CHECK(f.w1[0].dim() == 2, "innsteer: w1[0] must be 2-D [n_cond, hidden], got shape ", shape_str(f.w1[0]));
  const int64_t hidden = f.w1[0].size(1);
  const at::ScalarType wdtype = f.w1[0].scalar_type();
  if (acc == at::kDouble) {
    TORCH_CHECK(wdtype == at::kDouble, "innsteer: float64 activations need float64 weights, got ", wdtype);
  } else {
    TORCH_CHECK(wdtype == at::kFloat || wdtype == at::kBFloat16,
                "innsteer: weights must be float32 or bfloat16 for ", x.scalar_type(), " activations, got ", wdtype);
  }
  for (size_t k = 0; k < n; ++k) {
    const int64_t ki = static_cast<int64_t>(k);
    TORCH_CHECK(f.cond_idx[k].dim() == 1 && f.trans_idx[k].dim() == 1,
                "innsteer: cond_idx[", k, "] and trans_idx[", k, "] must be 1-D");
    const int64_t a = f.cond_idx[k].size(0), b = f.trans_idx[k].size(0);
    TORCH_CHECK(a >= 1 && b >= 1 && a + b == dim, "innsteer: coupling ", k, " splits ", a, " + ", b,
                " coordinates, which does not partition hidden size ", dim);
    check_param(f.cond_idx[k], "cond_idx", ki, {a}, at::kLong, device);
    check_param(f.trans_idx[k], "trans_idx", ki, {b}, at::kLong, device);
    check_param(f.w1[k], "w1", ki, {a, hidden}, wdtype, device);
    check_param(f.b1[k], "b1", ki, {hidden}, acc, device);
    check_param(f.w2[k], "w2", ki, {hidden, 2 * b}, wdtype, device);
    check_param(f.b2[k], "b2", ki, {2 * b}, acc, device);
    if (check_index_values) {
      // Every coordinate must appear exactly once across cond and trans, or the coupling
      // is not invertible (and an out-of-range index would read outside the row).
      std::vector<char> seen(static_cast<size_t>(dim), 0);
      for (const at::Tensor* idx : {&f.cond_idx[k], &f.trans_idx[k]}) {
        const at::Tensor c = idx->contiguous();
        const int64_t* p = c.data_ptr<int64_t>();
        for (int64_t i = 0; i < c.numel(); ++i) {
          TORCH_CHECK(p[i] >= 0 && p[i] < dim, "innsteer: coupling ", k, " index ", p[i],
                      " is outside [0, ", dim, ")");
          TORCH_CHECK(!seen[p[i]], "innsteer: coupling ", k, " uses coordinate ", p[i],
                      " twice; cond_idx and trans_idx must partition the hidden size");
          seen[p[i]] = 1;
        }
      }
    }
  }
  return dim;
}

// Contiguous copies (no-ops when already contiguous) kept alive for the raw views.
template <class Acc, class W>
struct FlowHolder {
  std::vector<at::Tensor> keep;
  std::vector<CouplingView<Acc, W>> couplings;
  FlowView<Acc, W> view;

  explicit FlowHolder(const FlowArgs& f) {
    auto hold = [&](const at::Tensor& t) -> const void* {
      keep.push_back(t.contiguous());
      return keep.back().data_ptr();
    };
    const size_t n = f.cond_idx.size();
    keep.reserve(2 + 6 * n);
    couplings.resize(n);
    for (size_t k = 0; k < n; ++k) {
      CouplingView<Acc, W>& c = couplings[k];
      c.n_cond = f.cond_idx[k].size(0);
      c.n_trans = f.trans_idx[k].size(0);
      c.cond_idx = static_cast<const int64_t*>(hold(f.cond_idx[k]));
      c.trans_idx = static_cast<const int64_t*>(hold(f.trans_idx[k]));
      c.w1 = static_cast<const W*>(hold(f.w1[k]));
      c.b1 = static_cast<const Acc*>(hold(f.b1[k]));
      c.w2 = static_cast<const W*>(hold(f.w2[k]));
      c.b2 = static_cast<const Acc*>(hold(f.b2[k]));
    }
    view.dim = f.mean.size(0);
    view.hidden = f.w1[0].size(1);
    view.n_couplings = static_cast<int64_t>(n);
    view.clamp = static_cast<Acc>(f.clamp);
    view.mean = static_cast<const Acc*>(hold(f.mean));
    view.scale = static_cast<const Acc*>(hold(f.scale));
    view.couplings = couplings.data();
  }
};

template <class AccT, class InT, class WT>
struct FlowTypes {
  using Acc = AccT;  // compute type
  using In = InT;    // activation storage type
  using W = WT;      // weight storage type
};

// Calls fn(FlowTypes<Acc, In, W>{}) for the types of an op call: float64 activations compute in
// float64 (with float64 weights); float32/bfloat16/float16 ones in float32 with float32 or
// bfloat16 weights. Shared by the CPU and CUDA glue so both support the same combinations.
template <class Fn>
void dispatch_flow_types(at::ScalarType activations, at::ScalarType weights, Fn&& fn) {
  const bool bf16_weights = weights == at::kBFloat16;
  switch (activations) {
    case at::kDouble:
      return fn(FlowTypes<double, double, double>{});
    case at::kFloat:
      return bf16_weights ? fn(FlowTypes<float, float, bf16_t>{}) : fn(FlowTypes<float, float, float>{});
    case at::kBFloat16:
      return bf16_weights ? fn(FlowTypes<float, bf16_t, bf16_t>{}) : fn(FlowTypes<float, bf16_t, float>{});
    case at::kHalf:
      return bf16_weights ? fn(FlowTypes<float, half_t, bf16_t>{}) : fn(FlowTypes<float, half_t, float>{});
    default:
      TORCH_CHECK(false, "innsteer: unsupported activation dtype ", activations);
  }
}

// alpha must be finite in the dtype the flow computes in: 1e39 is a finite double but inf in float32.
inline void check_alpha(double alpha, at::ScalarType acc) {
  const double largest =
      acc == at::kDouble ? std::numeric_limits<double>::max() : std::numeric_limits<float>::max();
  TORCH_CHECK(std::isfinite(alpha) && std::abs(alpha) <= largest, "innsteer: alpha must be finite in ", acc,
              " (|alpha| <= ", largest, "), got ", alpha);
}

inline void check_steer_args(const at::Tensor& hidden, const c10::optional<at::Tensor>& residual,
                             const at::Tensor& direction, double alpha, int64_t dim) {
  check_alpha(alpha, accumulate_dtype(hidden.scalar_type()));
  check_param(direction, "direction", -1, {dim}, accumulate_dtype(hidden.scalar_type()), hidden.device());
  if (residual.has_value()) {
    const at::Tensor& r = *residual;
    TORCH_CHECK(r.device() == hidden.device(), "innsteer: residual is on ", r.device(), " but hidden is on ",
                hidden.device());
    TORCH_CHECK(r.sizes() == hidden.sizes(), "innsteer: residual has shape ", shape_str(r),
                " but hidden has shape ", shape_str(hidden));
    TORCH_CHECK(r.scalar_type() == hidden.scalar_type(), "innsteer: residual has dtype ", r.scalar_type(),
                " but hidden has dtype ", hidden.scalar_type());
  }
}

// Host memory only (reads the values): direction is finite and alpha * direction fits Acc.
template <class Acc>
void check_latent_shift(const Acc* direction, int64_t n, double alpha) {
  double largest = 0;
  for (int64_t i = 0; i < n; ++i) {
    TORCH_CHECK(std::isfinite(direction[i]), "innsteer: direction contains NaN or Inf");
    largest = std::max(largest, std::abs(static_cast<double>(direction[i])));
  }
  const double limit = static_cast<double>(std::numeric_limits<Acc>::max());
  TORCH_CHECK(alpha == 0 || largest <= limit / std::abs(alpha), "innsteer: alpha * direction overflows ",
              c10::CppTypeToScalarType<Acc>::value, ": alpha = ", alpha, " and the largest |direction| is ",
              largest);
}

// Whether two elements of t may share memory. ATen answers for contiguous and stride-0 layouts;
// otherwise, with the size > 1 dims sorted by stride, each stride must step past all that the
// smaller dims span, which holds for every view made by slicing, transposing or permuting.
inline bool may_overlap_itself(const at::Tensor& t) {
  const at::MemOverlap answer = at::has_internal_overlap(t);
  if (answer != at::MemOverlap::TooHard) return answer == at::MemOverlap::Yes;
  std::vector<std::pair<int64_t, int64_t>> dims;  // (stride, size)
  for (int64_t d = 0; d < t.dim(); ++d) {
    if (t.size(d) > 1) dims.emplace_back(t.stride(d), t.size(d));
  }
  std::sort(dims.begin(), dims.end());
  int64_t span = 0;  // the largest offset the smaller dims reach
  for (const auto& [stride, size] : dims) {
    if (stride <= span) return true;
    span += stride * (size - 1);
  }
  return false;
}

// steer_ writes hidden while it reads the other arguments: hidden must not overlap itself, and no
// other argument may share its memory, except a residual that is hidden itself (each row is read
// before it is written).
inline void check_steer_inplace_memory(const at::Tensor& hidden, const c10::optional<at::Tensor>& residual,
                                       const at::Tensor& direction, const FlowArgs& f) {
  TORCH_CHECK(!may_overlap_itself(hidden), "innsteer: steer_ cannot write hidden in place: several of its elements "
              "share memory (e.g. an expanded tensor, strides ", hidden.strides(), "); steer a clone() or use steer()");
  if (residual.has_value()) {
    TORCH_CHECK(at::get_overlap_status(hidden, *residual) != at::MemOverlapStatus::Partial,
                "innsteer: residual partly overlaps hidden, which steer_ overwrites; pass a clone() of residual");
  }
  auto check_apart = [&](const at::Tensor& t, const std::string& name) {
    const at::MemOverlapStatus status = at::get_overlap_status(hidden, t);
    TORCH_CHECK(status != at::MemOverlapStatus::Full && status != at::MemOverlapStatus::Partial, "innsteer: ", name,
                " shares memory with hidden, which steer_ overwrites; pass a clone() of it");
  };
  check_apart(direction, "direction");
  check_apart(f.mean, "mean");
  check_apart(f.scale, "scale");
  const std::pair<const std::vector<at::Tensor>*, const char*> lists[] = {
      {&f.cond_idx, "cond_idx"}, {&f.trans_idx, "trans_idx"}, {&f.w1, "w1"},
      {&f.b1, "b1"},             {&f.w2, "w2"},               {&f.b2, "b2"}};
  for (const auto& [list, name] : lists) {
    for (size_t k = 0; k < list->size(); ++k) check_apart((*list)[k], std::string(name) + "[" + std::to_string(k) + "]");
  }
}

}  // namespace innsteer
