// Device code shared by the two kernels that evaluate one coupling layer (gemv_layer.cuh for
// decode, mma_layer.cuh for prefill): the launch arguments, dtype conversions, how a layer reads
// and writes the coordinates of the flow, the split-K reduction and the fused epilogues.
//
// One coupling = two launches: layer 1, hidden = tanh(u[cond] @ w1 + b1); layer 2,
// (s, t) = hidden @ w2 + b2, both soft-clamped, then u[trans] = u[trans] * e^s + t. A block owns
// 64 output columns of its layer; in layer 2 those are 32 interleaved (s, t) pairs, so the clamps,
// exp, affine step, output conversion and the block's log-det partial all stay in the block.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "../flow_types.h"

namespace innsteer {
namespace cuda {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
constexpr int kTileCols = 64;  // output columns per block (layer 2: 32 (s, t) pairs)

// Where a coupling reads the coordinates it conditions on / transforms, and where it writes them.
enum class Source : int {
  kU,          // the flow's float scratch u [tokens, dim]
  kInputStd,   // (input (+ residual, rounded to In) - mean) / scale: first forward coupling
  kInputRaw,   // input as is: first coupling of coupling_inverse
  kUShifted,   // u + alpha * direction: first inverse coupling of steer
};
enum class Dest : int {
  kU,            // back into u
  kOutput,       // the op's output, converted to In (coupling_forward's z)
  kOutputDestd,  // u * scale + mean, converted to In (inverse / steer output)
};

template <class Acc, class In, class W>
struct LayerArgs {
  int64_t tokens;
  int64_t dim;
  int layer;      // 1: hidden = tanh(u[cond] @ w1 + b1); 2: (s, t) = hidden @ w2 + b2 and the affine step
  int64_t rows;   // rows of w (layer 1: n_cond, layer 2: hidden size)
  int64_t cols;   // columns of w (layer 1: hidden size, layer 2: 2 * n_trans)
  const W* w;
  const Acc* b;
  bool vec;       // cols % 8 == 0 and w is 16-byte aligned: 16-byte weight loads
  bool prefetch;  // pull this block's weights into L2 before waiting for the previous kernel
  const int64_t* cond_idx;
  int64_t n_cond;
  const int64_t* trans_idx;
  int64_t n_trans;
  Acc clamp;
  bool inverse;
  Source src;
  Dest dst;
  const In* input;
  const In* residual;  // nullable
  In* output;          // may alias input (the chain's first and last launches differ)
  Acc* u;              // [tokens, dim]
  Acc* hidden;         // [tokens, hidden size]
  const Acc* mean;
  const Acc* scale;
  const Acc* direction;
  Acc alpha;
  int64_t split_rows;  // rows of w per split (gridDim.y splits); partial sums meet in the last block
  Acc* partials;       // [chunks, tiles, splits, tokens per block, 64] when split
  unsigned* counters;  // [chunks, tiles], zero on entry, left zero on exit
  Acc* logdet_part;    // layer 2 of coupling_forward: [tiles, tokens] sums of s; else null
};

// ---- dtype conversions (bit-compatible with flow_types.h's bf16_t / half_t) ----

__device__ __forceinline__ float load_acc(float v) { return v; }
__device__ __forceinline__ double load_acc(double v) { return v; }
__device__ __forceinline__ float load_acc(bf16_t v) { return __bfloat162float(__ushort_as_bfloat16(v.bits)); }
__device__ __forceinline__ float load_acc(half_t v) { return __half2float(__ushort_as_half(v.bits)); }

template <class T>
struct Convert;
template <>
struct Convert<float> {
  static __device__ __forceinline__ float from(float v) { return v; }
};
template <>
struct Convert<double> {
  static __device__ __forceinline__ double from(double v) { return v; }
};
template <>
struct Convert<bf16_t> {  // round to nearest even, like torch's bfloat16 cast
  static __device__ __forceinline__ bf16_t from(float v) { return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(v))}; }
};
template <>
struct Convert<half_t> {
  static __device__ __forceinline__ half_t from(float v) { return half_t{__half_as_ushort(__float2half_rn(v))}; }
};

__device__ __forceinline__ float exp_(float v) { return expf(v); }
__device__ __forceinline__ double exp_(double v) { return exp(v); }
__device__ __forceinline__ float tanh_(float v) { return tanhf(v); }
__device__ __forceinline__ double tanh_(double v) { return tanh(v); }
__device__ __forceinline__ float log_(float v) { return logf(v); }
__device__ __forceinline__ double log_(double v) { return log(v); }

// ---- programmatic dependent launch (no-ops below sm_90 or when launched without it) ----

// Everything before this may touch only data no earlier kernel writes (the weights).
__device__ __forceinline__ void wait_for_previous_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Lets the next kernel of the chain start its blocks (they prefetch weights, then wait on this one).
__device__ __forceinline__ void allow_next_kernel() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// ---- weights ----

// w[0..8) as Acc; elements at or past n_valid read as 0 (and are not touched).
template <class Acc>
__device__ __forceinline__ void load8(const bf16_t* w, int64_t n_valid, bool vec, Acc (&out)[8]) {
  if (vec && n_valid >= 8) {
    const uint4 v = __ldg(reinterpret_cast<const uint4*>(w));
    const unsigned words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      out[2 * i] = __uint_as_float(words[i] << 16);
      out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = i < n_valid ? Acc(load_acc(w[i])) : Acc(0);
}

template <class Acc>
__device__ __forceinline__ void load8(const float* w, int64_t n_valid, bool vec, Acc (&out)[8]) {
  if (vec && n_valid >= 8) {
    const float4 a = __ldg(reinterpret_cast<const float4*>(w));
    const float4 b = __ldg(reinterpret_cast<const float4*>(w) + 1);
    out[0] = a.x, out[1] = a.y, out[2] = a.z, out[3] = a.w;
    out[4] = b.x, out[5] = b.y, out[6] = b.z, out[7] = b.w;
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = i < n_valid ? Acc(__ldg(w + i)) : Acc(0);
}

template <class Acc>
__device__ __forceinline__ void load8(const double* w, int64_t n_valid, bool vec, Acc (&out)[8]) {
  if (vec && n_valid >= 8) {
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const double2 v = __ldg(reinterpret_cast<const double2*>(w) + i);
      out[2 * i] = v.x, out[2 * i + 1] = v.y;
    }
    return;
  }
#pragma unroll
  for (int i = 0; i < 8; ++i) out[i] = i < n_valid ? Acc(__ldg(w + i)) : Acc(0);
}

// Issues L2 prefetches for rows [r0, r0 + n_rows) x columns [c0, c0 + 64) of w.
template <class W>
__device__ __forceinline__ void prefetch_weights(const W* w, int64_t cols, int64_t r0, int64_t n_rows, int64_t c0) {
  constexpr int kPerLine = 128 / static_cast<int>(sizeof(W));
  constexpr int kLinesPerRow = (kTileCols + kPerLine - 1) / kPerLine;
  for (int64_t i = threadIdx.x; i < n_rows * kLinesPerRow; i += kThreads) {
    const int64_t c = c0 + (i % kLinesPerRow) * kPerLine;
    if (c < cols) asm volatile("prefetch.global.L2 [%0];" ::"l"(w + (r0 + i / kLinesPerRow) * cols + c));
  }
}

// ---- the flow's coordinates ----

template <class Acc, class In, class W>
__device__ __forceinline__ Acc read_coord(const LayerArgs<Acc, In, W>& p, int64_t t, int64_t i) {
  const int64_t o = t * p.dim + i;
  switch (p.src) {
    case Source::kU:
      return p.u[o];
    case Source::kUShifted:
      return p.u[o] + p.alpha * p.direction[i];
    default: {
      Acc v = load_acc(p.input[o]);
      // Round the residual add to In, like an eager `hidden + residual` would.
      if (p.residual) v = load_acc(Convert<In>::from(v + load_acc(p.residual[o])));
      return p.src == Source::kInputStd ? (v - p.mean[i]) / p.scale[i] : v;
    }
  }
}

template <class Acc, class In, class W>
__device__ __forceinline__ void write_coord(const LayerArgs<Acc, In, W>& p, int64_t t, int64_t i, Acc v) {
  const int64_t o = t * p.dim + i;
  switch (p.dst) {
    case Dest::kU:
      p.u[o] = v;
      break;
    case Dest::kOutput:
      p.output[o] = Convert<In>::from(v);
      break;
    case Dest::kOutputDestd:
      p.output[o] = Convert<In>::from(v * p.scale[i] + p.mean[i]);
      break;
  }
}

// Layer 2 only: moves the coupling's untouched (conditioning) coordinates from the source to the
// destination when they differ, a slice per column tile. Nothing else in layer 2 reads them.
template <class Acc, class In, class W>
__device__ void pass_through(const LayerArgs<Acc, In, W>& p, int64_t tile, int64_t n_tiles, int64_t t0, int ntok) {
  if (p.src == Source::kU && p.dst == Dest::kU) return;
  const int64_t per_tile = (p.n_cond + n_tiles - 1) / n_tiles;
  const int64_t j0 = tile * per_tile;
  const int64_t n = (p.n_cond < j0 + per_tile ? p.n_cond : j0 + per_tile) - j0;
  if (n <= 0) return;
  for (int64_t i = threadIdx.x; i < ntok * n; i += kThreads) {
    const int64_t t = t0 + i / n;
    const int64_t c = p.cond_idx[j0 + i % n];
    write_coord(p, t, c, read_coord(p, t, c));
  }
}

// ---- split-K: every split of a tile leaves its partial tile in global memory; the last one to
// finish sums them in split order (deterministic) and runs the epilogue. ----

// cs: [tok_per_block][ldc] partial sums of this block. Returns false in all but the last block.
template <class Acc, class In, class W>
__device__ bool reduce_splits(const LayerArgs<Acc, In, W>& p, Acc* cs, int ldc, int tok_per_block) {
  const int n_split = gridDim.y;
  if (n_split == 1) return true;
  __shared__ bool is_last;
  const int64_t slot = static_cast<int64_t>(blockIdx.z) * gridDim.x + blockIdx.x;
  const int n_vals = tok_per_block * kTileCols;
  Acc* slabs = p.partials + slot * n_split * n_vals;
  Acc* mine = slabs + static_cast<int64_t>(blockIdx.y) * n_vals;
  for (int i = threadIdx.x; i < n_vals; i += kThreads) mine[i] = cs[(i / kTileCols) * ldc + i % kTileCols];
  __threadfence();
  __syncthreads();
  if (threadIdx.x == 0) {
    const unsigned done = atomicAdd(p.counters + slot, 1u);
    is_last = done == static_cast<unsigned>(n_split - 1);
    if (is_last) atomicExch(p.counters + slot, 0u);  // ready for the next launch
  }
  __syncthreads();
  if (!is_last) return false;
  __threadfence();
  for (int i = threadIdx.x; i < n_vals; i += kThreads) {
    Acc sum = 0;
    for (int s = 0; s < n_split; ++s) sum += __ldcg(slabs + static_cast<int64_t>(s) * n_vals + i);
    cs[(i / kTileCols) * ldc + i % kTileCols] = sum;
  }
  __syncthreads();
  return true;
}

// ---- epilogues: cs[t][c] = sum over rows of x[t0 + t] * w[:, c0 + c] (no bias yet) ----

template <class Acc, class In, class W>
__device__ void layer_epilogue(const LayerArgs<Acc, In, W>& p, const Acc* cs, int ldc, int64_t t0, int ntok,
                               int64_t c0) {
  if (p.layer == 1) {
    for (int i = threadIdx.x; i < ntok * kTileCols; i += kThreads) {
      const int t = i / kTileCols, c = i % kTileCols;
      const int64_t col = c0 + c;
      if (col < p.cols) {
        p.hidden[(t0 + t) * p.cols + col] = tanh_(cs[t * ldc + c] + p.b[col]);
      }
    }
    return;
  }
  // Layer 2: one warp per token, one lane per (s, t) pair of the tile.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t j = c0 / 2 + lane;
  const Acc shift_clamp = static_cast<Acc>(kShiftClampFactor) * p.clamp;
  for (int t = warp; t < ntok; t += kWarps) {
    Acc s = 0;
    if (j < p.n_trans) {
      s = p.clamp * tanh_((cs[t * ldc + 2 * lane] + p.b[2 * j]) / p.clamp);
      const Acc shift = shift_clamp * tanh_((cs[t * ldc + 2 * lane + 1] + p.b[2 * j + 1]) / shift_clamp);
      const int64_t i = p.trans_idx[j];
      const Acc x = read_coord(p, t0 + t, i);
      write_coord(p, t0 + t, i, p.inverse ? (x - shift) * exp_(-s) : x * exp_(s) + shift);
    }
    if (p.logdet_part) {
#pragma unroll
      for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
      if (lane == 0) p.logdet_part[static_cast<int64_t>(blockIdx.x) * p.tokens + t0 + t] = s;
    }
  }
}

}  // namespace cuda
}  // namespace innsteer
