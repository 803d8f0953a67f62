// Prefill path: one coupling layer on bf16 tensor cores (wmma m16n16k16, float accumulators),
// for 16-bit activations once there are more tokens than the decode path takes.
// "Swap AB": weights are the M side (64 output columns per block), tokens the N side (128 per
// block), so the layer-2 epilogue keeps each token's 32 (s, t) pairs in one block, as in decode.
// Tiles of the K (row) dimension are double-buffered through registers: the next tile's global
// loads are in flight while the tensor cores work on the current one.
#pragma once

#include <mma.h>

#include "layer.cuh"

namespace innsteer {
namespace cuda {

constexpr int kMmaTokens = 128;  // N per block
constexpr int kMmaK = 32;        // K per pipeline stage

__device__ __forceinline__ uint32_t pack_bf16x2(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

template <class In, class W>
__global__ void __launch_bounds__(kThreads) mma_layer_kernel(const LayerArgs<float, In, W> p) {
  using namespace nvcuda;
  constexpr int BM = kTileCols, BN = kMmaTokens, BK = kMmaK;
  constexpr int LDA = BM + 8, LDB = BK + 8, LDC = BM + 4;  // padded rows (16-byte multiples)
  constexpr int kStageA = BK * LDA, kStageB = BN * LDB;    // bf16 elements per stage
  constexpr int kPipeBytes = 2 * (kStageA + kStageB) * 2;
  constexpr int kOutBytes = BN * LDC * 4;
  __shared__ __align__(128) unsigned char smem[kPipeBytes > kOutBytes ? kPipeBytes : kOutBytes];
  __nv_bfloat16* As = reinterpret_cast<__nv_bfloat16*>(smem);  // [2][BK][LDA]: A(m, k) = w[k][m]
  __nv_bfloat16* Bs = As + 2 * kStageA;                         // [2][BN][LDB]: B(k, n) = x[n][k]
  float* Cs = reinterpret_cast<float*>(smem);                   // [BN][LDC], reused after the main loop

  const int64_t tile = blockIdx.x, c0 = tile * BM;
  const int64_t k_begin = static_cast<int64_t>(blockIdx.y) * p.split_rows;
  const int64_t k_end = p.rows - k_begin < p.split_rows ? p.rows : k_begin + p.split_rows;
  const int64_t t0 = static_cast<int64_t>(blockIdx.z) * BN;
  const int ntok = static_cast<int>(p.tokens - t0 < BN ? p.tokens - t0 : BN);
  const int tid = threadIdx.x, warp = tid / 32;
  const int wm = warp % 2, wn = warp / 2;  // warp tile: 32 columns x 32 tokens

  wait_for_previous_kernel();
  allow_next_kernel();
  if (p.layer == 2 && blockIdx.y == 0) pass_through(p, tile, gridDim.x, t0, ntok);

  // Staging: A, 8 columns of one row per thread; B, 16 rows of one token per thread.
  const int a_k = tid / 8, a_c = (tid % 8) * 8;
  const int b_n = tid / 2, b_k = (tid % 2) * 16;
  float a_reg[8], b_reg[16];
  auto load_stage = [&](int64_t k0) {
    const int64_t k = k0 + a_k;
    load8(p.w + k * p.cols + c0 + a_c, k < k_end ? p.cols - (c0 + a_c) : 0, p.vec, a_reg);
    const int64_t t = t0 + b_n;
#pragma unroll
    for (int j = 0; j < 16; ++j) {
      const int64_t kk = k0 + b_k + j;
      float v = 0.f;
      if (b_n < ntok && kk < k_end) {
        v = p.layer == 1 ? read_coord(p, t, p.cond_idx[kk]) : p.hidden[t * p.rows + kk];
      }
      b_reg[j] = v;
    }
  };
  auto store_stage = [&](int stage) {
    uint4 a;
    a.x = pack_bf16x2(a_reg[0], a_reg[1]), a.y = pack_bf16x2(a_reg[2], a_reg[3]);
    a.z = pack_bf16x2(a_reg[4], a_reg[5]), a.w = pack_bf16x2(a_reg[6], a_reg[7]);
    *reinterpret_cast<uint4*>(As + stage * kStageA + a_k * LDA + a_c) = a;
    uint4* b = reinterpret_cast<uint4*>(Bs + stage * kStageB + b_n * LDB + b_k);
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const float* v = b_reg + 8 * h;
      b[h] = make_uint4(pack_bf16x2(v[0], v[1]), pack_bf16x2(v[2], v[3]), pack_bf16x2(v[4], v[5]),
                        pack_bf16x2(v[6], v[7]));
    }
  };

  wmma::fragment<wmma::accumulator, 16, 16, 16, float> acc[2][2];
#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) wmma::fill_fragment(acc[i][j], 0.f);
  }

  const int64_t n_k = (k_end - k_begin + BK - 1) / BK;
  load_stage(k_begin);
  store_stage(0);
  __syncthreads();
  for (int64_t kt = 0; kt < n_k; ++kt) {
    const int stage = static_cast<int>(kt & 1);
    if (kt + 1 < n_k) load_stage(k_begin + (kt + 1) * BK);
#pragma unroll
    for (int kk = 0; kk < BK; kk += 16) {
      wmma::fragment<wmma::matrix_a, 16, 16, 16, __nv_bfloat16, wmma::col_major> a[2];
      wmma::fragment<wmma::matrix_b, 16, 16, 16, __nv_bfloat16, wmma::col_major> b[2];
#pragma unroll
      for (int i = 0; i < 2; ++i) wmma::load_matrix_sync(a[i], As + stage * kStageA + kk * LDA + wm * 32 + i * 16, LDA);
#pragma unroll
      for (int j = 0; j < 2; ++j) wmma::load_matrix_sync(b[j], Bs + stage * kStageB + (wn * 32 + j * 16) * LDB + kk, LDB);
#pragma unroll
      for (int i = 0; i < 2; ++i) {
#pragma unroll
        for (int j = 0; j < 2; ++j) wmma::mma_sync(acc[i][j], a[i], b[j], acc[i][j]);
      }
    }
    // The other stage was last read in the previous iteration, which the barrier below closed.
    if (kt + 1 < n_k) store_stage(stage ^ 1);
    __syncthreads();
  }

#pragma unroll
  for (int i = 0; i < 2; ++i) {
#pragma unroll
    for (int j = 0; j < 2; ++j) {
      wmma::store_matrix_sync(Cs + (wn * 32 + j * 16) * LDC + wm * 32 + i * 16, acc[i][j], LDC, wmma::mem_col_major);
    }
  }
  __syncthreads();

  if (!reduce_splits(p, Cs, LDC, BN)) return;
  layer_epilogue(p, Cs, LDC, t0, ntok, c0);
}

}  // namespace cuda
}  // namespace innsteer
