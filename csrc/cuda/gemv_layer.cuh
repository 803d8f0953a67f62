// Decode path: one coupling layer for up to kTok tokens per block on CUDA cores.
// Memory-bound, so the weights are spread thin: a block reads a [split_rows x 64] slice of w with
// 16-byte loads (8 columns per thread, 32 row lanes), and the grid (64-column tiles x row splits
// x token chunks) is sized by the host to >= 2 blocks per SM.
#pragma once

#include "layer.cuh"

namespace innsteer {
namespace cuda {

constexpr int kGemvMaxSplitRows = 512;  // rows of x staged in shared memory per block

template <class Acc, class In, class W, int kTok>
__global__ void __launch_bounds__(kThreads) gemv_layer_kernel(const LayerArgs<Acc, In, W> p) {
  __shared__ Acc xs[kTok][kGemvMaxSplitRows];
  __shared__ Acc red[kWarps][kTok][kTileCols];
  __shared__ Acc cs[kTok][kTileCols];

  const int64_t tile = blockIdx.x, c0 = tile * kTileCols;
  const int64_t r0 = static_cast<int64_t>(blockIdx.y) * p.split_rows;
  const int n_rows = static_cast<int>(p.rows - r0 < p.split_rows ? p.rows - r0 : p.split_rows);
  const int64_t t0 = static_cast<int64_t>(blockIdx.z) * kTok;
  const int ntok = static_cast<int>(p.tokens - t0 < kTok ? p.tokens - t0 : kTok);
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int tc = lane % 8;                 // column group: columns c0 + 8 * tc .. + 8
  const int tr = warp * 4 + lane / 8;      // row lane 0..31
  const int64_t col = c0 + 8 * tc;

  if (p.prefetch) prefetch_weights(p.w, p.cols, r0, n_rows, c0);
  wait_for_previous_kernel();
  allow_next_kernel();
  if (p.layer == 2 && blockIdx.y == 0) pass_through(p, tile, gridDim.x, t0, ntok);

  for (int i = threadIdx.x; i < kTok * n_rows; i += kThreads) {
    const int t = i / n_rows, r = i % n_rows;
    Acc v = 0;
    if (t < ntok) {
      v = p.layer == 1 ? read_coord(p, t0 + t, p.cond_idx[r0 + r]) : p.hidden[(t0 + t) * p.rows + r0 + r];
    }
    xs[t][r] = v;
  }
  __syncthreads();

  Acc acc[kTok][8];
#pragma unroll
  for (int t = 0; t < kTok; ++t) {
#pragma unroll
    for (int c = 0; c < 8; ++c) acc[t][c] = 0;
  }
  const int64_t n_valid = p.cols - col;
#pragma unroll 4
  for (int r = tr; r < n_rows; r += 32) {
    Acc w[8];
    load8(p.w + (r0 + r) * p.cols + col, n_valid, p.vec, w);
#pragma unroll
    for (int t = 0; t < kTok; ++t) {
      const Acc x = xs[t][r];
#pragma unroll
      for (int c = 0; c < 8; ++c) acc[t][c] += x * w[c];
    }
  }

  // Sum the 32 row lanes: the 4 in a warp by shuffles, then the 8 warps through shared memory.
#pragma unroll
  for (int t = 0; t < kTok; ++t) {
#pragma unroll
    for (int c = 0; c < 8; ++c) {
      acc[t][c] += __shfl_xor_sync(0xffffffffu, acc[t][c], 8);
      acc[t][c] += __shfl_xor_sync(0xffffffffu, acc[t][c], 16);
    }
  }
  if (lane < 8) {
#pragma unroll
    for (int t = 0; t < kTok; ++t) {
#pragma unroll
      for (int c = 0; c < 8; ++c) red[warp][t][8 * tc + c] = acc[t][c];
    }
  }
  __syncthreads();
  for (int i = threadIdx.x; i < kTok * kTileCols; i += kThreads) {
    const int t = i / kTileCols, c = i % kTileCols;
    Acc sum = 0;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) sum += red[w][t][c];
    cs[t][c] = sum;
  }
  __syncthreads();

  if (!reduce_splits(p, &cs[0][0], kTileCols, kTok)) return;
  layer_epilogue(p, &cs[0][0], kTileCols, t0, ntok, c0);
}

}  // namespace cuda
}  // namespace innsteer
