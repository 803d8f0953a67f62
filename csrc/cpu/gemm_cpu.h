// The CPU flow's inner loops: small-batch matrix products (y[t, :] += x[t, :] @ w for a tile
// of tokens) and the vectorized activation / affine-coefficient passes. Plain C++; the .cpp
// builds one clone per instruction set and the loader picks one for the running CPU.
#pragma once

#include <cstdint>

#include "../flow_types.h"

namespace innsteer {
namespace cpu {

// Rows (tokens) per tile: a tile's column block of outputs (8 x 256 floats) stays in L1 while
// the weights stream past (see gemm_cpu.cpp).
constexpr int kTileTokens = 8;

// y[t, c] += sum_i x[t, i] * w[i, c]   for t < n_tokens, c < n_cols, i < n_in.
// w is row-major with leading dimension ldw; x and y are row-major with ldx / ldy.
void gemm_accumulate(const float* w, int64_t ldw, const float* x, int64_t ldx, float* y, int64_t ldy,
                     int64_t n_in, int64_t n_cols, int n_tokens);
void gemm_accumulate(const bf16_t* w, int64_t ldw, const float* x, int64_t ldx, float* y, int64_t ldy,
                     int64_t n_in, int64_t n_cols, int n_tokens);
void gemm_accumulate(const double* w, int64_t ldw, const double* x, int64_t ldx, double* y, int64_t ldy,
                     int64_t n_in, int64_t n_cols, int n_tokens);

// x[i] = tanh(x[i]) for i < n.
void tanh_inplace(float* x, int64_t n);
void tanh_inplace(double* x, int64_t n);

// st holds n_pairs interleaved raw (s, t). Rewrites each pair in place to
// (exp(+-s), t) with s = clamp * tanh(raw_s / clamp) (exp(-s) when inverse) and
// t = shift_clamp * tanh(raw_t / shift_clamp); returns sum(s).
float scale_shift_inplace(float* st, int64_t n_pairs, float clamp, float shift_clamp, bool inverse);
double scale_shift_inplace(double* st, int64_t n_pairs, double clamp, double shift_clamp, bool inverse);

}  // namespace cpu
}  // namespace innsteer
