// The torch- and ggml-free half of the C API: loading steer files and steering rows.
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <fstream>
#include <memory>
#include <new>
#include <string>
#include <vector>

#include "../cpu/flow_cpu.h"
#include "innsteer_llama_hook.h"
#include "steer_file.h"

namespace {

constexpr size_t kMaxFileBytes = size_t(1) << 32;  // 4 GiB: far above any steer file

void set_error(char* err, size_t err_len, const std::string& message) {
  if (err && err_len) std::snprintf(err, err_len, "%s", message.c_str());
}

}  // namespace

extern "C" {

innsteer_steer* innsteer_steer_load_buffer(const uint8_t* data, size_t len, char* err, size_t err_len) {
  if (!data && len) {
    set_error(err, err_len, "no data");
    return nullptr;
  }
  try {
    auto steer = std::make_unique<innsteer_steer>();
    std::string error;
    if (!innsteer::llama_hook::parse_steer_gguf(data, len, steer->model, error)) {
      set_error(err, err_len, error);
      return nullptr;
    }
    return steer.release();
  } catch (const std::bad_alloc&) {
    set_error(err, err_len, "out of memory while loading the steer file");
    return nullptr;
  }
}

innsteer_steer* innsteer_steer_load_file(const char* path, char* err, size_t err_len) {
  if (!path) {
    set_error(err, err_len, "no path");
    return nullptr;
  }
  std::ifstream file(path, std::ios::binary | std::ios::ate);
  if (!file) {
    set_error(err, err_len, std::string("cannot open ") + path);
    return nullptr;
  }
  const std::streamoff size = file.tellg();
  if (size < 0 || static_cast<uint64_t>(size) > kMaxFileBytes) {
    set_error(err, err_len, std::string("cannot read the size of ") + path + " or it exceeds 4 GiB");
    return nullptr;
  }
  std::vector<uint8_t> bytes(static_cast<size_t>(size));
  file.seekg(0);
  if (size > 0 && !file.read(reinterpret_cast<char*>(bytes.data()), size)) {
    set_error(err, err_len, std::string("cannot read ") + path);
    return nullptr;
  }
  return innsteer_steer_load_buffer(bytes.data(), bytes.size(), err, err_len);
}

void innsteer_steer_free(innsteer_steer* steer) { innsteer_steer::release(steer); }

int64_t innsteer_steer_hidden_size(const innsteer_steer* s) { return s ? s->model.dim : -1; }
int32_t innsteer_steer_layer(const innsteer_steer* s) { return s ? s->model.layer : -1; }
float innsteer_steer_alpha(const innsteer_steer* s) { return s ? s->model.alpha : std::nanf(""); }
int64_t innsteer_steer_num_couplings(const innsteer_steer* s) {
  return s ? static_cast<int64_t>(s->model.couplings.size()) : -1;
}
int64_t innsteer_steer_mlp_hidden(const innsteer_steer* s) { return s ? s->model.mlp_hidden : -1; }
bool innsteer_steer_bf16_weights(const innsteer_steer* s) { return s && s->model.bf16_weights; }

const char* innsteer_steer_meta(const innsteer_steer* s, const char* key) {
  if (!s || !key) return nullptr;
  if (!std::strcmp(key, "model_id")) return s->model.model_id.c_str();
  if (!std::strcmp(key, "model_hint")) return s->model.model_hint.c_str();
  if (!std::strcmp(key, "method")) return s->model.method.c_str();
  if (!std::strcmp(key, "behavior")) return s->model.behavior.c_str();
  if (!std::strcmp(key, "scaling")) return s->model.displacement ? "displacement" : "latent";
  return nullptr;
}

int innsteer_steer_apply(const innsteer_steer* s, float* rows, int64_t n_rows, float alpha, int n_threads, char* err,
                         size_t err_len) {
  if (!s) {
    set_error(err, err_len, "innsteer_steer_apply: null steer");
    return 1;
  }
  if (n_rows < 0 || (n_rows > 0 && !rows) || n_rows > INT64_MAX / s->model.dim) {
    set_error(err, err_len, "innsteer_steer_apply: bad rows (n_rows " + std::to_string(n_rows) + ")");
    return 1;
  }
  if (!std::isfinite(alpha)) {
    set_error(err, err_len, "alpha must be finite (as a float32)");
    return 1;
  }
  if (!innsteer::cpu::all_finite(rows, n_rows * s->model.dim)) {  // the hook leaves such rows unsteered too
    set_error(err, err_len, "rows contain NaN or Inf");
    return 1;
  }
  if (n_threads < 1 || n_threads > INNSTEER_MAX_THREADS) {
    set_error(err, err_len, "n_threads " + std::to_string(n_threads) + " is outside 1.." +
                                std::to_string(INNSTEER_MAX_THREADS));
    return 1;
  }
  try {
    std::vector<float> workspace(n_threads * s->model.workspace_per_worker());
    innsteer::llama_hook::steer_rows(s->model, rows, n_rows, alpha, workspace.data(), n_threads,
                                     /*split_tile=*/true);
  } catch (const std::exception& e) {
    set_error(err, err_len, e.what());
    return 1;
  }
  return 0;
}

}  // extern "C"
