// Scalar storage types and the flow description shared by every backend.
// Plain C++ (no torch, no CUDA): the torch CPU op, the llama.cpp hook and the CUDA kernels
// all read a flow through these views, so they agree on layout by construction.
#pragma once

#include <cstdint>
#include <cstring>

namespace innsteer {

// 16-bit storage types; bit-compatible with at::BFloat16 / at::Half and ggml's bf16 / f16.
struct bf16_t { uint16_t bits; };
struct half_t { uint16_t bits; };

inline float to_acc(float v) { return v; }
inline double to_acc(double v) { return v; }

inline float to_acc(bf16_t v) {
  uint32_t u = static_cast<uint32_t>(v.bits) << 16;
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

inline float to_acc(half_t v) {
  const uint32_t h = v.bits;
  const uint32_t sign = (h & 0x8000u) << 16;
  const uint32_t exponent = (h >> 10) & 0x1fu;
  const uint32_t mantissa = h & 0x3ffu;
  uint32_t u;
  if (exponent == 0) {
    // zero or subnormal: value = mantissa * 2^-24
    float f = static_cast<float>(mantissa) * 5.9604644775390625e-8f;
    std::memcpy(&u, &f, sizeof u);
    u |= sign;
  } else if (exponent == 31) {
    u = sign | 0x7f800000u | (mantissa << 13);
  } else {
    u = sign | ((exponent + 112u) << 23) | (mantissa << 13);
  }
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}

template <class T> T from_acc(float v);
template <class T> T from_acc(double v);

template <> inline float from_acc<float>(float v) { return v; }
template <> inline double from_acc<double>(double v) { return v; }

// Round to nearest even, NaN stays NaN (same rounding as torch's bfloat16 cast).
template <> inline bf16_t from_acc<bf16_t>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  if ((u & 0x7fffffffu) > 0x7f800000u) return bf16_t{static_cast<uint16_t>((u >> 16) | 0x40u)};
  u += 0x7fffu + ((u >> 16) & 1u);
  return bf16_t{static_cast<uint16_t>(u >> 16)};
}

// Round to nearest even with overflow to inf (F. Giesen's float_to_half_fast3_rtne).
template <> inline half_t from_acc<half_t>(float v) {
  uint32_t u;
  std::memcpy(&u, &v, sizeof u);
  const uint32_t sign = u & 0x80000000u;
  u ^= sign;
  uint32_t out;
  if (u >= (127u + 16u) << 23) {
    out = u > 0x7f800000u ? 0x7e00u : 0x7c00u;
  } else if (u < (113u << 23)) {
    const uint32_t magic_bits = ((127u - 15u) + (23u - 10u) + 1u) << 23;
    float f, magic;
    std::memcpy(&f, &u, sizeof f);
    std::memcpy(&magic, &magic_bits, sizeof magic);
    f += magic;
    std::memcpy(&u, &f, sizeof u);
    out = u - magic_bits;
  } else {
    const uint32_t mantissa_odd = (u >> 13) & 1u;
    u += (static_cast<uint32_t>(15 - 127) << 23) + 0xfffu;
    u += mantissa_odd;
    out = u >> 13;
  }
  return half_t{static_cast<uint16_t>(out | (sign >> 16))};
}

// One affine coupling: the `cond` coordinates feed an MLP whose output scales and shifts the
// `trans` coordinates.  Weights are stored input-major (w1: [n_cond, hidden], w2: [hidden,
// 2*n_trans]) so a matrix-vector product streams contiguous rows; w2's columns interleave
// (s_j, t_j) so the scale and shift of one output coordinate are adjacent.
template <class Acc, class W>
struct CouplingView {
  int64_t n_cond;
  int64_t n_trans;
  const int64_t* cond_idx;   // [n_cond], each in [0, dim)
  const int64_t* trans_idx;  // [n_trans], each in [0, dim)
  const W* w1;               // [n_cond, hidden]
  const Acc* b1;             // [hidden]
  const W* w2;               // [hidden, 2 * n_trans]
  const Acc* b2;             // [2 * n_trans]
};

// A whole flow: u = (x - mean) / scale, then the couplings in order.
template <class Acc, class W>
struct FlowView {
  int64_t dim;
  int64_t hidden;
  int64_t n_couplings;
  // s = clamp * tanh(raw_s / clamp) keeps exp(s) within [e^-clamp, e^clamp], and
  // t = kShiftClampFactor * clamp * tanh(raw_t / (kShiftClampFactor * clamp)) bounds the shift,
  // so rows far outside the training data (LLMs' massive activations) still invert precisely.
  Acc clamp;
  const Acc* mean;   // [dim]
  const Acc* scale;  // [dim], > 0
  const CouplingView<Acc, W>* couplings;  // [n_couplings]
};

// The shift bound in units of clamp (see FlowView::clamp).
constexpr double kShiftClampFactor = 2.0;

// The clamps every loader accepts (the torch ops, INN(...) in Python, the llama.cpp hook).
// At most kMaxClamp, one coupling scales a coordinate by at most e^20 (~4.9e8) and shifts it by
// at most 40, so neither exp(s) nor a steer of any ordinary activation can overflow float32
// (exp(88.7) already does; a clamp of 1e39 is inf in float32 and makes every steer NaN). At
// least kMinClamp, clamp stays a normal float32 far from 0: s = clamp * tanh(raw_s / clamp) is
// NaN once clamp rounds (or a denormal flushes) to 0. The default clamp is 2.
constexpr double kMinClamp = 1e-3;
constexpr double kMaxClamp = 20.0;

enum class FlowMode { kForward, kInverse, kSteer };

}  // namespace innsteer
