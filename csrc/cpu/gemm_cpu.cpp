#include "gemm_cpu.h"

#include <algorithm>

// On x86-64, build a Haswell (AVX2 + FMA) clone beside the baseline one; the dynamic loader picks
// the best one for the running CPU, so the library stays portable without -march=native.
#if defined(__x86_64__) && defined(__GNUC__) && defined(__ELF__)
#define INNSTEER_CLONES __attribute__((target_clones("arch=haswell", "default")))
#else
#define INNSTEER_CLONES
#endif

namespace innsteer {
namespace cpu {
namespace {

// Rows of w are streamed once per tile; each row updates all tokens' accumulators, so the
// inner loop is a plain vectorizable axpy (no reduction, hence no -ffast-math needed).
template <class Acc, class W>
__attribute__((always_inline)) inline void gemm_accumulate_impl(
    const W* __restrict w, int64_t ldw, const Acc* __restrict x, int64_t ldx, Acc* __restrict y, int64_t ldy,
    int64_t n_in, int64_t n_cols, int n_tokens) {
  Acc row[kColumnBlock];
  for (int64_t c0 = 0; c0 < n_cols; c0 += kColumnBlock) {
    const int64_t nc = std::min(kColumnBlock, n_cols - c0);
    for (int64_t i = 0; i < n_in; ++i) {
      const W* __restrict wi = w + i * ldw + c0;
      for (int64_t c = 0; c < nc; ++c) row[c] = to_acc(wi[c]);
      for (int t = 0; t < n_tokens; ++t) {
        const Acc xv = x[t * ldx + i];
        Acc* __restrict yt = y + t * ldy + c0;
        for (int64_t c = 0; c < nc; ++c) yt[c] += row[c] * xv;
      }
    }
  }
}

}  // namespace

INNSTEER_CLONES void gemm_accumulate(const float* w, int64_t ldw, const float* x, int64_t ldx, float* y,
                                     int64_t ldy, int64_t n_in, int64_t n_cols, int n_tokens) {
  gemm_accumulate_impl<float, float>(w, ldw, x, ldx, y, ldy, n_in, n_cols, n_tokens);
}

INNSTEER_CLONES void gemm_accumulate(const bf16_t* w, int64_t ldw, const float* x, int64_t ldx, float* y,
                                     int64_t ldy, int64_t n_in, int64_t n_cols, int n_tokens) {
  gemm_accumulate_impl<float, bf16_t>(w, ldw, x, ldx, y, ldy, n_in, n_cols, n_tokens);
}

INNSTEER_CLONES void gemm_accumulate(const double* w, int64_t ldw, const double* x, int64_t ldx, double* y,
                                     int64_t ldy, int64_t n_in, int64_t n_cols, int n_tokens) {
  gemm_accumulate_impl<double, double>(w, ldw, x, ldx, y, ldy, n_in, n_cols, n_tokens);
}

}  // namespace cpu
}  // namespace innsteer
