// A steer GGUF (written by innsteer.export) parsed into an owned flow, plus the steer itself.
// Plain C++: no torch, no ggml. The parser reads from a byte buffer and checks every count, size,
// offset and index it reads against the buffer length, so a truncated or corrupted file is an
// error message, never an out-of-bounds read.
#pragma once

#include <atomic>
#include <cstddef>
#include <cstdint>
#include <string>
#include <vector>

#include "../flow_types.h"

namespace innsteer {
namespace llama_hook {

constexpr uint32_t kSteerFormatVersion = 1;

// One coupling's parameters; weights kept as float32 or bfloat16 as stored in the file.
struct CouplingData {
  std::vector<int64_t> cond_idx, trans_idx;
  std::vector<float> w1_f32, w2_f32;
  std::vector<bf16_t> w1_bf16, w2_bf16;
  std::vector<float> b1, b2;
};

struct SteerModel {
  int64_t dim = 0;
  int64_t mlp_hidden = 0;
  float clamp = 0;
  int32_t layer = 0;
  float alpha = 0;
  bool bf16_weights = false;
  // innsteer.scaling "displacement": x <- x + |alpha| (phi^-1(phi(x) + sign(alpha) v) - x) (see
  // innsteer.core.steerers.inn.SCALINGS); "latent" or absent: x <- phi^-1(phi(x) + alpha v).
  bool displacement = false;
  std::string model_id, model_hint, method, behavior;
  std::vector<float> mean, scale, direction;
  std::vector<CouplingData> couplings;
  // Views into the vectors above (built once after loading; the model must not be copied).
  std::vector<CouplingView<float, float>> views_f32;
  std::vector<CouplingView<float, bf16_t>> views_bf16;

  FlowView<float, float> flow_f32() const;
  FlowView<float, bf16_t> flow_bf16() const;
  int64_t workspace_per_worker() const;
};

// Parses a steer GGUF held in data[0, len). Returns true and fills `model`, or false with `error`.
bool parse_steer_gguf(const uint8_t* data, size_t len, SteerModel& model, std::string& error);

// Steers `rows` rows of model.dim values in place: x <- phi^-1(phi(x) + alpha * direction), or the
// displacement at sign(alpha) lengthened |alpha| times (model.displacement).
// In is float, half_t or bf16_t; workspace holds n_workers * workspace_per_worker() floats. Rows
// of several tiles go to n_workers threads by tiles; one tile (a decode's rows) runs inline, or with
// split_tile its gemms' columns go to n_workers OpenMP threads (the same bits).
template <class In>
void steer_rows(const SteerModel& model, In* rows, int64_t n_rows, float alpha, float* workspace, int n_workers,
                bool split_tile);

}  // namespace llama_hook
}  // namespace innsteer

// The opaque handle of the C API (innsteer_llama_hook.h), reference-counted: the loader's caller
// holds one reference and every hook entry using the steer holds one.
struct innsteer_steer {
  innsteer::llama_hook::SteerModel model;
  std::atomic<int64_t> references{1};

  void retain() { references.fetch_add(1); }
  // Drops one reference; the last one deletes the steer.
  static void release(innsteer_steer* steer) {
    if (steer && steer->references.fetch_sub(1) == 1) delete steer;
  }
};
