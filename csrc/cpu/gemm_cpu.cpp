#include "gemm_cpu.h"

#include <cmath>
#include <cstring>
#include <type_traits>

#include "vector_math.h"

// On x86-64, build a Haswell (AVX2 + FMA) clone beside the baseline one; the dynamic loader picks
// the best one for the running CPU, so the library stays portable without -march=native.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__)
#define INNSTEER_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define INNSTEER_CLONES
#endif

namespace innsteer {
namespace cpu {
namespace {

typedef uint16_t v8u16 __attribute__((vector_size(16)));
typedef uint32_t v8u32 __attribute__((vector_size(32)));
typedef uint16_t v16u16 __attribute__((vector_size(32)));

__attribute__((always_inline)) inline v8f load8(const float* p) {
  v8f v;
  std::memcpy(&v, p, sizeof v);
  return v;
}

__attribute__((always_inline)) inline v8f load8(const bf16_t* p) {
  v8u16 half;
  std::memcpy(&half, p, sizeof half);
#if (defined(__clang__) || __GNUC__ >= 12) && __BYTE_ORDER__ == __ORDER_LITTLE_ENDIAN__
  // (0, b0, 0, b1, ...) read as eight uint32 is b_i << 16, each bfloat16's float32 bits: one
  // unpack, where widening then shifting compiled to up to five instructions per eight weights
  // (callgrind: 3.9M -> 2.6M instructions per d = 576 steer with bfloat16 weights).
  const v8u16 zero = {0, 0, 0, 0, 0, 0, 0, 0};
  const v16u16 wide = __builtin_shufflevector(zero, half, 0, 8, 0, 9, 0, 10, 0, 11, 0, 12, 0, 13, 0, 14, 0, 15);
#else
  const v8u32 wide = __builtin_convertvector(half, v8u32) << 16;
#endif
  v8f v;
  std::memcpy(&v, &wide, sizeof v);
  return v;
}

__attribute__((always_inline)) inline void store8(float* p, v8f v) { std::memcpy(p, &v, sizeof v); }

// Streams w row-major (long contiguous runs, which the hardware prefetcher follows at full
// bandwidth: decode is bound by reading the weights), four rows at a time so each y vector
// is loaded and stored once per four FMAs; a column block of y stays in L1 across tokens.
constexpr int64_t kColumnBlock = 256;

// y[t, 0:nc] += x[t, 0:4] @ w[0:4, 0:nc] for every token (nv = nc rounded down to 8).
template <class W>
__attribute__((always_inline)) inline void gemm_rows4(const W* __restrict w0, int64_t ldw, const float* __restrict x,
                                                      int64_t ldx, float* __restrict y, int64_t ldy, int64_t nc,
                                                      int64_t nv, int n_tokens) {
  for (int t = 0; t < n_tokens; ++t) {
    const float* xt = x + t * ldx;
    const float x0 = xt[0], x1 = xt[1], x2 = xt[2], x3 = xt[3];
    float* yt = y + t * ldy;
    for (int64_t c = 0; c < nv; c += 8) {
      v8f acc = load8(yt + c);
      acc += load8(w0 + c) * x0 + load8(w0 + ldw + c) * x1 + load8(w0 + 2 * ldw + c) * x2 +
             load8(w0 + 3 * ldw + c) * x3;
      store8(yt + c, acc);
    }
    for (int64_t c = nv; c < nc; ++c)
      yt[c] += to_acc(w0[c]) * x0 + to_acc(w0[ldw + c]) * x1 + to_acc(w0[2 * ldw + c]) * x2 +
               to_acc(w0[3 * ldw + c]) * x3;
  }
}

template <class W>
__attribute__((always_inline)) inline void gemm_float(const W* __restrict w, int64_t ldw, const float* __restrict x,
                                                      int64_t ldx, float* __restrict y, int64_t ldy, int64_t n_in,
                                                      int64_t n_cols, int n_tokens) {
  for (int64_t c0 = 0; c0 < n_cols; c0 += kColumnBlock) {
    const int64_t nc = n_cols - c0 < kColumnBlock ? n_cols - c0 : kColumnBlock;
    const int64_t nv = nc / 8 * 8;
    int64_t i = 0;
    float converted[4 * kColumnBlock];
    for (; i + 4 <= n_in; i += 4) {
      const W* w_rows = w + i * ldw + c0;
      if (!std::is_same<W, float>::value && n_tokens > 1) {
        // 16-bit weights: widen the four row segments once, not once per token
        for (int r = 0; r < 4; ++r) {
          for (int64_t c = 0; c < nv; c += 8) store8(converted + r * kColumnBlock + c, load8(w_rows + r * ldw + c));
          for (int64_t c = nv; c < nc; ++c) converted[r * kColumnBlock + c] = to_acc(w_rows[r * ldw + c]);
        }
        gemm_rows4(converted, kColumnBlock, x + i, ldx, y + c0, ldy, nc, nv, n_tokens);
        continue;
      }
      gemm_rows4(w_rows, ldw, x + i, ldx, y + c0, ldy, nc, nv, n_tokens);
    }
    for (; i < n_in; ++i) {
      const W* wi = w + i * ldw + c0;
      for (int t = 0; t < n_tokens; ++t) {
        const float xv = x[t * ldx + i];
        float* yt = y + t * ldy + c0;
        for (int64_t c = 0; c < nv; c += 8) store8(yt + c, load8(yt + c) + load8(wi + c) * xv);
        for (int64_t c = nv; c < nc; ++c) yt[c] += to_acc(wi[c]) * xv;
      }
    }
  }
}

}  // namespace

INNSTEER_CLONES void gemm_accumulate(const float* w, int64_t ldw, const float* x, int64_t ldx, float* y,
                                     int64_t ldy, int64_t n_in, int64_t n_cols, int n_tokens) {
  gemm_float(w, ldw, x, ldx, y, ldy, n_in, n_cols, n_tokens);
}

INNSTEER_CLONES void gemm_accumulate(const bf16_t* w, int64_t ldw, const float* x, int64_t ldx, float* y,
                                     int64_t ldy, int64_t n_in, int64_t n_cols, int n_tokens) {
  gemm_float(w, ldw, x, ldx, y, ldy, n_in, n_cols, n_tokens);
}

// float64 is the testing path (gradcheck): plain loops.
void gemm_accumulate(const double* w, int64_t ldw, const double* x, int64_t ldx, double* y, int64_t ldy,
                     int64_t n_in, int64_t n_cols, int n_tokens) {
  for (int t = 0; t < n_tokens; ++t)
    for (int64_t i = 0; i < n_in; ++i) {
      const double xv = x[t * ldx + i];
      for (int64_t c = 0; c < n_cols; ++c) y[t * ldy + c] += w[i * ldw + c] * xv;
    }
}

INNSTEER_CLONES void tanh_inplace(float* x, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    v8f v;
    std::memcpy(&v, x + i, sizeof v);
    v = fast_tanh(v);
    std::memcpy(x + i, &v, sizeof v);
  }
  if (i < n) {  // the tail through a zero-padded copy
    v8f v = splat(0.0f);
    std::memcpy(&v, x + i, sizeof(float) * (n - i));
    v = fast_tanh(v);
    std::memcpy(x + i, &v, sizeof(float) * (n - i));
  }
}

void tanh_inplace(double* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) x[i] = std::tanh(x[i]);
}

// Deinterleaves (s, t) into blocks of eight so both go through the vector exp/tanh.
INNSTEER_CLONES float scale_shift_inplace(float* st, int64_t n_pairs, float clamp, float shift_clamp,
                                          bool inverse) {
  const float sign = inverse ? -1.0f : 1.0f;
  v8f s_sum = splat(0.0f);
  for (int64_t j0 = 0; j0 < n_pairs; j0 += 8) {
    const int64_t n = n_pairs - j0 < 8 ? n_pairs - j0 : 8;
    v8f raw_s = splat(0.0f), raw_t = splat(0.0f);
    for (int64_t j = 0; j < n; ++j) {
      raw_s[j] = st[2 * (j0 + j)];
      raw_t[j] = st[2 * (j0 + j) + 1];
    }
    const v8f s = clamp * fast_tanh(raw_s / clamp);  // padded lanes give s = 0
    const v8f factor = fast_exp(s * sign);
    const v8f shift = shift_clamp * fast_tanh(raw_t / shift_clamp);
    s_sum += s;
    for (int64_t j = 0; j < n; ++j) {
      st[2 * (j0 + j)] = factor[j];
      st[2 * (j0 + j) + 1] = shift[j];
    }
  }
  float total = 0;
  for (int j = 0; j < 8; ++j) total += s_sum[j];
  return total;
}

double scale_shift_inplace(double* st, int64_t n_pairs, double clamp, double shift_clamp, bool inverse) {
  const double sign = inverse ? -1.0 : 1.0;
  double s_sum = 0;
  for (int64_t j = 0; j < n_pairs; ++j) {
    const double s = clamp * std::tanh(st[2 * j] / clamp);
    s_sum += s;
    st[2 * j] = std::exp(sign * s);
    st[2 * j + 1] = shift_clamp * std::tanh(st[2 * j + 1] / shift_clamp);
  }
  return s_sum;
}

}  // namespace cpu
}  // namespace innsteer
