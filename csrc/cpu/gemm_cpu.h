// Small-batch matrix products for the CPU flow: y[t, :] += x[t, :] @ w for a tile of tokens.
// Plain C++; the .cpp builds one clone per instruction set and picks one at load time.
#pragma once

#include <cstdint>

#include "../flow_types.h"

namespace innsteer {
namespace cpu {

// Tokens per tile: the tile's accumulators (kTileTokens x kColumnBlock) stay in L1.
constexpr int kTileTokens = 8;
constexpr int64_t kColumnBlock = 256;

// y[t, c] += sum_i x[t, i] * w[i, c]   for t < n_tokens, c < n_cols, i < n_in.
// w is row-major with leading dimension ldw; x and y are row-major with ldx / ldy.
void gemm_accumulate(const float* w, int64_t ldw, const float* x, int64_t ldx, float* y, int64_t ldy,
                     int64_t n_in, int64_t n_cols, int n_tokens);
void gemm_accumulate(const bf16_t* w, int64_t ldw, const float* x, int64_t ldx, float* y, int64_t ldy,
                     int64_t n_in, int64_t n_cols, int n_tokens);
void gemm_accumulate(const double* w, int64_t ldw, const double* x, int64_t ldx, double* y, int64_t ldy,
                     int64_t n_in, int64_t n_cols, int n_tokens);

}  // namespace cpu
}  // namespace innsteer
