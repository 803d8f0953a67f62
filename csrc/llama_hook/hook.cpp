// The eval callback: finds `l_out-L` among the graph nodes (in C, ~1 us per node matters at ~900
// nodes a token), then reads the tensor from its backend buffer, steers it and writes it back
// before any consumer runs (see the notes on ggml_backend_sched's compute_splits).
#include <algorithm>
#include <atomic>
#include <chrono>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <string>
#include <vector>

#include "../cpu/flow_cpu.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "innsteer_llama_hook.h"
#include "steer_file.h"

namespace {

using innsteer::bf16_t;
using innsteer::half_t;
using innsteer::llama_hook::SteerModel;

// An entry owns a reference to its steer, so the steer outlives it whatever the caller frees.
struct Entry {
  innsteer_steer* steer;
  const SteerModel* model;
  int32_t layer;
  std::atomic<float> alpha;
  std::atomic<bool> enabled;
  Entry(innsteer_steer* s, int32_t l, float a) : steer(s), model(&s->model), layer(l), alpha(a), enabled(true) {
    steer->retain();
  }
  ~Entry() { innsteer_steer::release(steer); }
  Entry(const Entry&) = delete;
  Entry& operator=(const Entry&) = delete;
  bool active() const { return enabled.load() && alpha.load() != 0.0f; }
};

// "l_out-<digits>" -> layer, else -1.
int32_t lout_layer(const char* name) {
  if (std::strncmp(name, "l_out-", 6) != 0) return -1;
  const char* p = name + 6;
  if (*p < '0' || *p > '9') return -1;
  int64_t v = 0;
  for (; *p >= '0' && *p <= '9'; ++p) {
    v = v * 10 + (*p - '0');
    if (v > (1 << 20)) return -1;
  }
  return *p == '\0' ? static_cast<int32_t>(v) : -1;
}

void copy_message(char* err, size_t err_len, const std::string& message) {
  if (err && err_len) std::snprintf(err, err_len, "%s", message.c_str());
}

}  // namespace

struct innsteer_hook {
  // Guards entries and the per-layer vectors below: the API may add entries from another thread
  // while the callback runs (ctypes releases the GIL during llama_decode).
  std::mutex mutex;
  std::vector<std::unique_ptr<Entry>> entries;
  // Per call, by layer: whether l_out-L appeared, rows of l_out-L seen so far (a call may run
  // several ubatches) and the row offset of the tensor being computed.
  std::vector<uint8_t> seen;
  std::vector<int64_t> rows_done, tensor_offset;
  int64_t first_row = 0;  // rows (tokens) of this call before it are left unsteered
  int64_t nodes_asked = 0;
  std::atomic<bool> in_call{false};  // between innsteer_hook_begin and innsteer_hook_end
  std::atomic<int> n_threads{1};
  std::atomic<int64_t> applied{0};
  std::atomic<int64_t> apply_ns{0};  // time spent reading, steering and writing l_out tensors
  std::mutex error_mutex;
  std::string error;
  std::vector<uint8_t> rows;  // the tensor's bytes, reused across calls
  std::vector<float> workspace;

  void record(const std::string& message) {
    std::lock_guard<std::mutex> lock(error_mutex);
    if (error.empty()) error = message;
  }

  bool wants(int32_t layer) const {
    for (const auto& e : entries) {
      if (e->layer == layer && e->active()) return true;
    }
    return false;
  }

  // Whether the rows of l_out-L being asked about include any at or after first_row; advances the count.
  bool wants_rows(int32_t layer, int64_t n_rows) {
    tensor_offset[layer] = rows_done[layer];
    rows_done[layer] += n_rows;
    return rows_done[layer] > first_row && wants(layer);
  }

  template <class In>
  void steer_all(int32_t layer, In* data, int64_t n_rows) {
    const int workers = std::max(1, n_threads.load());
    for (const auto& e : entries) {
      if (e->layer != layer || !e->active()) continue;
      const size_t need = static_cast<size_t>(workers * e->model->workspace_per_worker());
      if (workspace.size() < need) workspace.resize(need);
      innsteer::llama_hook::steer_rows(*e->model, data, n_rows, e->alpha.load(), workspace.data(), workers);
    }
  }

  void apply(ggml_tensor* t, int32_t layer) {
    const std::string where = std::string("innsteer hook at ") + t->name;
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16 && t->type != GGML_TYPE_BF16)
      return record(where + ": unsupported tensor type " + ggml_type_name(t->type));
    if (!ggml_is_contiguous(t)) return record(where + ": tensor is not contiguous");
    if (!t->buffer) return record(where + ": tensor has no backend buffer");
    for (const auto& e : entries) {
      if (e->layer == layer && e->active() && t->ne[0] != e->model->dim)
        return record(where + ": hidden size " + std::to_string(t->ne[0]) + " but the steer file was made for " +
                      std::to_string(e->model->dim));
    }
    const size_t n_bytes = ggml_nbytes(t);
    const int64_t n_rows = ggml_nrows(t);
    const int64_t skip = std::min(n_rows, std::max<int64_t>(0, first_row - tensor_offset[layer]));
    const size_t skip_bytes = static_cast<size_t>(skip) * t->nb[1];
    rows.resize(n_bytes);
    ggml_backend_tensor_get(t, rows.data(), 0, n_bytes);
    const int64_t n = n_rows * t->ne[0];
    bool finite = true;
    switch (t->type) {
      case GGML_TYPE_F32: finite = innsteer::cpu::all_finite(reinterpret_cast<float*>(rows.data()), n); break;
      case GGML_TYPE_F16: finite = innsteer::cpu::all_finite(reinterpret_cast<half_t*>(rows.data()), n); break;
      default: finite = innsteer::cpu::all_finite(reinterpret_cast<bf16_t*>(rows.data()), n); break;
    }
    if (!finite) return record(where + ": activations contain NaN or Inf; left unsteered");
    uint8_t* first = rows.data() + skip_bytes;
    switch (t->type) {
      case GGML_TYPE_F32: steer_all(layer, reinterpret_cast<float*>(first), n_rows - skip); break;
      case GGML_TYPE_F16: steer_all(layer, reinterpret_cast<half_t*>(first), n_rows - skip); break;
      default: steer_all(layer, reinterpret_cast<bf16_t*>(first), n_rows - skip); break;
    }
    ggml_backend_tensor_set(t, first, skip_bytes, n_bytes - skip_bytes);
    applied.fetch_add(1);
  }
};

extern "C" {

innsteer_hook* innsteer_hook_new(void) {
  try {
    return new innsteer_hook();
  } catch (...) {
    return nullptr;
  }
}

void innsteer_hook_free(innsteer_hook* hook) { delete hook; }

int innsteer_hook_add(innsteer_hook* hook, innsteer_steer* steer, int32_t layer, float alpha, char* err,
                      size_t err_len) {
  if (!hook || !steer) {
    copy_message(err, err_len, "innsteer_hook_add: null hook or steer");
    return -1;
  }
  if (layer < 0 || layer > INNSTEER_MAX_LAYER) {
    copy_message(err, err_len, "layer " + std::to_string(layer) + " is outside 0.." +
                                   std::to_string(INNSTEER_MAX_LAYER));
    return -1;
  }
  if (!std::isfinite(alpha)) {
    copy_message(err, err_len, "alpha must be finite (as a float32)");
    return -1;
  }
  try {
    std::lock_guard<std::mutex> lock(hook->mutex);
    if (hook->entries.size() >= static_cast<size_t>(INT32_MAX)) {
      copy_message(err, err_len, "innsteer_hook_add: too many entries");
      return -1;
    }
    if (hook->seen.size() <= static_cast<size_t>(layer)) {
      hook->seen.resize(layer + 1, 0);
      hook->rows_done.resize(layer + 1, 0);
      hook->tensor_offset.resize(layer + 1, 0);
    }
    hook->entries.push_back(std::make_unique<Entry>(steer, layer, alpha));
    return static_cast<int>(hook->entries.size() - 1);
  } catch (const std::bad_alloc&) {
    copy_message(err, err_len, "innsteer_hook_add: out of memory");
    return -1;
  }
}

int innsteer_hook_set_alpha(innsteer_hook* hook, int entry, float alpha) {
  if (!hook || !std::isfinite(alpha)) return 1;
  std::lock_guard<std::mutex> lock(hook->mutex);
  if (entry < 0 || static_cast<size_t>(entry) >= hook->entries.size()) return 1;
  hook->entries[entry]->alpha.store(alpha);
  return 0;
}

int innsteer_hook_set_enabled(innsteer_hook* hook, int entry, bool enabled) {
  if (!hook) return 1;
  std::lock_guard<std::mutex> lock(hook->mutex);
  if (entry < 0 || static_cast<size_t>(entry) >= hook->entries.size()) return 1;
  hook->entries[entry]->enabled.store(enabled);
  return 0;
}

int innsteer_hook_set_threads(innsteer_hook* hook, int n_threads) {
  if (!hook || n_threads < 1 || n_threads > INNSTEER_MAX_THREADS) return 1;
  hook->n_threads.store(n_threads);
  return 0;
}

int64_t innsteer_hook_applied_count(const innsteer_hook* hook) { return hook ? hook->applied.load() : -1; }

double innsteer_hook_apply_seconds(const innsteer_hook* hook) { return hook ? 1e-9 * hook->apply_ns.load() : -1.0; }

int innsteer_hook_begin(innsteer_hook* hook, int64_t first_row) {
  if (!hook || first_row < 0) return 1;
  if (hook->in_call.exchange(true)) return 1;  // another decode is between its begin and end
  std::lock_guard<std::mutex> lock(hook->mutex);
  std::fill(hook->seen.begin(), hook->seen.end(), 0);
  std::fill(hook->rows_done.begin(), hook->rows_done.end(), 0);
  hook->first_row = first_row;
  hook->nodes_asked = 0;
  std::lock_guard<std::mutex> error_lock(hook->error_mutex);
  hook->error.clear();
  return 0;
}

int innsteer_hook_end(innsteer_hook* hook, char* err, size_t err_len) {
  if (!hook) {
    copy_message(err, err_len, "innsteer_hook_end: null hook");
    return 1;
  }
  struct EndCall {
    innsteer_hook* hook;
    ~EndCall() { hook->in_call.store(false); }
  } end_call{hook};
  {
    std::lock_guard<std::mutex> lock(hook->error_mutex);
    if (!hook->error.empty()) {
      copy_message(err, err_len, hook->error);
      return 1;
    }
  }
  std::lock_guard<std::mutex> lock(hook->mutex);
  if (hook->nodes_asked == 0) return 0;  // nothing was computed (e.g. an empty batch)
  for (const auto& e : hook->entries) {
    if (e->enabled.load() && !hook->seen[e->layer]) {
      copy_message(err, err_len, "innsteer hook: the graph never produced tensor 'l_out-" + std::to_string(e->layer) +
                                     "' (this architecture does not name layer outputs l_out, or the model has "
                                     "fewer layers); nothing was steered");
      return 1;
    }
  }
  return 0;
}

bool innsteer_hook_eval_callback(struct ggml_tensor* t, bool ask, void* user_data) {
  innsteer_hook* hook = static_cast<innsteer_hook*>(user_data);
  if (!hook || !t) return !ask;  // nothing to observe; never abandon the graph
  const int32_t layer = lout_layer(t->name);
  if (ask) {
    ++hook->nodes_asked;
    if (layer < 0) return false;
    std::lock_guard<std::mutex> lock(hook->mutex);
    if (static_cast<size_t>(layer) >= hook->seen.size()) return false;
    hook->seen[layer] = 1;
    return hook->wants_rows(layer, ggml_nrows(t));
  }
  if (layer < 0) return true;
  std::lock_guard<std::mutex> lock(hook->mutex);
  if (hook->wants(layer)) {
    const auto start = std::chrono::steady_clock::now();
    try {
      hook->apply(t, layer);
    } catch (const std::exception& e) {
      hook->record(std::string("innsteer hook: ") + e.what());
    }
    hook->apply_ns.fetch_add(
        std::chrono::duration_cast<std::chrono::nanoseconds>(std::chrono::steady_clock::now() - start).count());
  }
  return true;  // false would abandon the rest of the graph; errors are raised by innsteer_hook_end
}

}  // extern "C"
