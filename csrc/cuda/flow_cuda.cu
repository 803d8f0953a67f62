// The CUDA flow driver: plans each coupling layer's grid, carves the caller's scratch and
// enqueues the chain of kernels on the caller's stream.
//
// Launch structure (why not one cooperative kernel): each coupling's layer 2 needs the whole
// hidden vector of layer 1, and the next coupling needs every coordinate layer 2 wrote, so there
// is a grid-wide dependency after every layer. Two plain launches per coupling express that
// directly; on sm_90 they are chained with programmatic dependent launch, so a kernel's blocks
// start early and pull their weights into L2 while the previous kernel finishes, which buys most
// of what a grid-sync megakernel would, stays graph-capturable, needs no co-residency guarantee
// and lets decode and prefill pick different kernels per layer. The standardization, the latent
// shift +alpha*v, the residual add and the output conversion ride along inside the first and last
// layers, so steer is exactly 4K launches (plus one memset of the split-K counters), forward 2K+1
// (the +1 sums the per-block log-det partials in a fixed order: deterministic, no atomics on
// floats), inverse 2K.
#include "flow_cuda.h"

#include <algorithm>
#include <type_traits>
#include <vector>

#include "gemv_layer.cuh"
#include "mma_layer.cuh"

namespace innsteer {
namespace cuda {
namespace {

constexpr int kGemvMaxTokens = 8;  // above this, 16-bit activations go to the tensor cores
constexpr int kMaxGrid = 65535;    // gridDim.y / gridDim.z limit

template <class Acc, class In>
constexpr bool uses_mma() {
  return std::is_same<Acc, float>::value && (std::is_same<In, bf16_t>::value || std::is_same<In, half_t>::value);
}

// Tokens per GEMV block: enough to cover the batch, at most 8 (4 in float64: register budget).
template <class Acc>
int gemv_tokens(int64_t tokens) {
  const int cap = std::is_same<Acc, double>::value ? 4 : kGemvMaxTokens;
  int tok = 1;
  while (tok < cap && tok < tokens) tok *= 2;
  return tok;
}

struct LayerPlan {
  bool mma;
  int tok;             // tokens per block
  int64_t tiles;       // 64-column tiles (gridDim.x)
  int64_t split;       // row splits (gridDim.y)
  int64_t chunks;      // token chunks (gridDim.z)
  int64_t split_rows;
  size_t partial_elems() const { return split > 1 ? static_cast<size_t>(tiles * chunks * split * tok * kTileCols) : 0; }
  size_t counters() const { return split > 1 ? static_cast<size_t>(tiles * chunks) : 0; }
};

template <class Acc, class In>
LayerPlan plan_layer(int64_t rows, int64_t cols, int64_t tokens, const DeviceInfo& dev) {
  LayerPlan plan;
  plan.mma = uses_mma<Acc, In>() && tokens > kGemvMaxTokens;
  plan.tok = plan.mma ? kMmaTokens : gemv_tokens<Acc>(tokens);
  plan.tiles = (cols + kTileCols - 1) / kTileCols;
  plan.chunks = (tokens + plan.tok - 1) / plan.tok;
  // Split the rows until there are >= 2 blocks per SM, keeping enough rows per block to amortize
  // the split's reduction (and, for the GEMV, few enough to stage x in shared memory).
  const int64_t min_rows = plan.mma ? 4 * kMmaK : 64;
  const int64_t align = plan.mma ? kMmaK : 1;
  const int64_t target = 2 * static_cast<int64_t>(std::max(dev.num_sms, 1));
  int64_t split = (target + plan.tiles * plan.chunks - 1) / (plan.tiles * plan.chunks);
  split = std::min(split, (rows + min_rows - 1) / min_rows);
  if (!plan.mma) split = std::max(split, (rows + kGemvMaxSplitRows - 1) / kGemvMaxSplitRows);
  split = std::max<int64_t>(split, 1);
  plan.split_rows = ((rows + split - 1) / split + align - 1) / align * align;
  plan.split = (rows + plan.split_rows - 1) / plan.split_rows;
  return plan;
}

size_t align_up(size_t n) { return (n + 255) / 256 * 256; }

struct Scratch {
  size_t u, hidden, partials, counters, logdet_parts, total;  // byte offsets
  size_t n_counters;
};

template <class Acc, class In, class W>
Scratch carve(const FlowView<Acc, W>& f, FlowMode mode, int64_t rows, const DeviceInfo& dev) {
  size_t partial_elems = 0, counters = 0, logdet_parts = 0;
  for (int64_t k = 0; k < f.n_couplings; ++k) {
    const CouplingView<Acc, W>& c = f.couplings[k];
    const LayerPlan l1 = plan_layer<Acc, In>(c.n_cond, f.hidden, rows, dev);
    const LayerPlan l2 = plan_layer<Acc, In>(f.hidden, 2 * c.n_trans, rows, dev);
    partial_elems = std::max({partial_elems, l1.partial_elems(), l2.partial_elems()});
    counters = std::max({counters, l1.counters(), l2.counters()});
    if (mode == FlowMode::kForward) logdet_parts += static_cast<size_t>(l2.tiles * rows);
  }
  Scratch s;
  s.u = 0;
  s.hidden = align_up(s.u + sizeof(Acc) * rows * f.dim);
  s.partials = align_up(s.hidden + sizeof(Acc) * rows * f.hidden);
  s.logdet_parts = align_up(s.partials + sizeof(Acc) * partial_elems);
  s.counters = align_up(s.logdet_parts + sizeof(Acc) * logdet_parts);
  s.total = align_up(s.counters + sizeof(unsigned) * counters);
  s.n_counters = counters;
  return s;
}

template <class... Params, class... Args>
cudaError_t launch(void (*kernel)(Params...), dim3 grid, bool dependent, cudaStream_t stream, const Args&... args) {
  cudaLaunchConfig_t config = {};
  config.gridDim = grid;
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = 0;
  config.stream = stream;
  cudaLaunchAttribute attribute[1];
  attribute[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attribute[0].val.programmaticStreamSerializationAllowed = 1;
  config.attrs = attribute;
  config.numAttrs = dependent ? 1 : 0;
  return cudaLaunchKernelEx(&config, kernel, args...);
}

template <class Acc, class In, class W>
cudaError_t launch_layer(const LayerArgs<Acc, In, W>& args, const LayerPlan& plan, bool dependent, cudaStream_t stream) {
  if (plan.split > kMaxGrid || plan.chunks > kMaxGrid) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(plan.tiles), static_cast<unsigned>(plan.split),
                  static_cast<unsigned>(plan.chunks));
  if constexpr (uses_mma<Acc, In>()) {
    if (plan.mma) return launch(mma_layer_kernel<In, W>, grid, dependent, stream, args);
  }
  switch (plan.tok) {
    case 1: return launch(gemv_layer_kernel<Acc, In, W, 1>, grid, dependent, stream, args);
    case 2: return launch(gemv_layer_kernel<Acc, In, W, 2>, grid, dependent, stream, args);
    case 4: return launch(gemv_layer_kernel<Acc, In, W, 4>, grid, dependent, stream, args);
    default:
      if constexpr (std::is_same<Acc, double>::value) return cudaErrorInvalidConfiguration;
      else return launch(gemv_layer_kernel<Acc, In, W, kGemvMaxTokens>, grid, dependent, stream, args);
  }
}

// alpha == 0 steer: h = hidden (+ residual, rounded to In), bit for bit.
template <class In>
__global__ void __launch_bounds__(kThreads) residual_add_kernel(const In* input, const In* residual, In* output,
                                                               int64_t n) {
  wait_for_previous_kernel();
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    output[i] = residual ? Convert<In>::from(load_acc(input[i]) + load_acc(residual[i])) : input[i];
  }
}

// logdet[t] = -sum(log scale) + the per-(coupling, tile) partial sums of s, in a fixed order.
template <class Acc>
__global__ void __launch_bounds__(kThreads) logdet_kernel(const Acc* scale, int64_t dim, const Acc* parts,
                                                          int64_t n_parts, int64_t tokens, Acc* logdet) {
  __shared__ Acc warp_sums[kWarps];
  wait_for_previous_kernel();
  Acc s = 0;
  for (int64_t i = threadIdx.x; i < dim; i += kThreads) s += log_(scale[i]);
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) s += __shfl_xor_sync(0xffffffffu, s, o);
  if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = s;
  __syncthreads();
  Acc base = 0;
#pragma unroll
  for (int w = 0; w < kWarps; ++w) base -= warp_sums[w];
  const int64_t t = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x;
  if (t >= tokens) return;
  Acc v = base;
  for (int64_t q = 0; q < n_parts; ++q) v += parts[q * tokens + t];
  logdet[t] = v;
}

struct Step {
  int64_t k;
  bool inverse;
  Source src;
  Dest dst;
};

std::vector<Step> chain(FlowMode mode, int64_t n_couplings) {
  std::vector<Step> steps;
  if (mode != FlowMode::kInverse) {
    for (int64_t k = 0; k < n_couplings; ++k) {
      const bool last = mode == FlowMode::kForward && k == n_couplings - 1;
      steps.push_back({k, false, k == 0 ? Source::kInputStd : Source::kU, last ? Dest::kOutput : Dest::kU});
    }
  }
  if (mode != FlowMode::kForward) {
    for (int64_t k = n_couplings - 1; k >= 0; --k) {
      const bool first = k == n_couplings - 1;
      const Source src = !first ? Source::kU : mode == FlowMode::kSteer ? Source::kUShifted : Source::kInputRaw;
      steps.push_back({k, true, src, k == 0 ? Dest::kOutputDestd : Dest::kU});
    }
  }
  return steps;
}

}  // namespace

template <class Acc, class In, class W>
size_t scratch_bytes(const FlowView<Acc, W>& f, FlowMode mode, int64_t rows, Acc alpha, const DeviceInfo& dev) {
  if (rows == 0 || (mode == FlowMode::kSteer && alpha == Acc(0))) return 0;
  return carve<Acc, In, W>(f, mode, rows, dev).total;
}

template <class Acc, class In, class W>
cudaError_t run_flow(const FlowView<Acc, W>& f, FlowMode mode, const In* input, const In* residual, In* output,
                     Acc* logdet, int64_t rows, Acc alpha, const Acc* direction, void* scratch,
                     const DeviceInfo& dev, cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  if (mode == FlowMode::kSteer && alpha == Acc(0)) {
    const int64_t n = rows * f.dim;
    const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 8 * static_cast<int64_t>(dev.num_sms));
    residual_add_kernel<In><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(input, residual, output, n);
    return cudaGetLastError();
  }

  const Scratch layout = carve<Acc, In, W>(f, mode, rows, dev);
  char* base = static_cast<char*>(scratch);
  Acc* u = reinterpret_cast<Acc*>(base + layout.u);
  Acc* hidden = reinterpret_cast<Acc*>(base + layout.hidden);
  Acc* partials = reinterpret_cast<Acc*>(base + layout.partials);
  Acc* logdet_parts = reinterpret_cast<Acc*>(base + layout.logdet_parts);
  unsigned* counters = reinterpret_cast<unsigned*>(base + layout.counters);
  if (layout.n_counters > 0) {
    const cudaError_t err = cudaMemsetAsync(counters, 0, sizeof(unsigned) * layout.n_counters, stream);
    if (err != cudaSuccess) return err;
  }

  LayerArgs<Acc, In, W> args = {};
  args.tokens = rows;
  args.dim = f.dim;
  args.clamp = f.clamp;
  args.input = input;
  args.residual = residual;
  args.output = output;
  args.u = u;
  args.hidden = hidden;
  args.mean = f.mean;
  args.scale = f.scale;
  args.direction = direction;
  args.alpha = alpha;
  args.partials = partials;
  args.counters = counters;

  bool first_launch = true;  // the chain's first kernel waits for whatever wrote its input, fully
  int64_t n_logdet_parts = 0;
  for (const Step& step : chain(mode, f.n_couplings)) {
    const CouplingView<Acc, W>& c = f.couplings[step.k];
    args.cond_idx = c.cond_idx;
    args.n_cond = c.n_cond;
    args.trans_idx = c.trans_idx;
    args.n_trans = c.n_trans;
    args.inverse = step.inverse;
    args.src = step.src;
    args.dst = step.dst;
    for (int layer = 1; layer <= 2; ++layer) {
      const int64_t n_in = layer == 1 ? c.n_cond : f.hidden;
      const int64_t n_out = layer == 1 ? f.hidden : 2 * c.n_trans;
      const LayerPlan plan = plan_layer<Acc, In>(n_in, n_out, rows, dev);
      args.layer = layer;
      args.rows = n_in;
      args.cols = n_out;
      args.w = layer == 1 ? c.w1 : c.w2;
      args.b = layer == 1 ? c.b1 : c.b2;
      args.vec = n_out % 8 == 0 && reinterpret_cast<uintptr_t>(args.w) % 16 == 0;
      const bool dependent = dev.dependent_launch && !first_launch;
      args.prefetch = dependent && !plan.mma;
      args.split_rows = plan.split_rows;
      args.logdet_part = nullptr;
      if (layer == 2 && mode == FlowMode::kForward) {
        args.logdet_part = logdet_parts + n_logdet_parts * rows;
        n_logdet_parts += plan.tiles;
      }
      const cudaError_t err = launch_layer(args, plan, dependent, stream);
      if (err != cudaSuccess) return err;
      first_launch = false;
    }
  }
  if (mode == FlowMode::kForward) {
    const dim3 grid(static_cast<unsigned>((rows + kThreads - 1) / kThreads));
    const cudaError_t err = launch(logdet_kernel<Acc>, grid, dev.dependent_launch, stream,
                                   f.scale, f.dim, static_cast<const Acc*>(logdet_parts), n_logdet_parts, rows, logdet);
    if (err != cudaSuccess) return err;
  }
  return cudaGetLastError();
}

#define INNSTEER_INSTANTIATE(Acc, In, W)                                                                        \
  template size_t scratch_bytes<Acc, In, W>(const FlowView<Acc, W>&, FlowMode, int64_t, Acc, const DeviceInfo&); \
  template cudaError_t run_flow<Acc, In, W>(const FlowView<Acc, W>&, FlowMode, const In*, const In*, In*, Acc*,   \
                                            int64_t, Acc, const Acc*, void*, const DeviceInfo&, cudaStream_t);

INNSTEER_INSTANTIATE(double, double, double)
INNSTEER_INSTANTIATE(float, float, float)
INNSTEER_INSTANTIATE(float, float, bf16_t)
INNSTEER_INSTANTIATE(float, bf16_t, float)
INNSTEER_INSTANTIATE(float, bf16_t, bf16_t)
INNSTEER_INSTANTIATE(float, half_t, float)
INNSTEER_INSTANTIATE(float, half_t, bf16_t)

}  // namespace cuda
}  // namespace innsteer
