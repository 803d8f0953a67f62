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

// An entry is an INN steer (it owns a reference to the steer, so the steer outlives it whatever the
// caller frees) or a vector added to the rows (a control vector, for per-row steering: llama.cpp's own
// control vector is one per context).
struct Entry {
  innsteer_steer* steer;
  const SteerModel* model;
  std::vector<float> vector;
  int32_t layer;
  std::atomic<float> alpha;
  std::atomic<bool> enabled;
  Entry(innsteer_steer* s, int32_t l, float a) : steer(s), model(&s->model), layer(l), alpha(a), enabled(true) {
    steer->retain();
  }
  Entry(std::vector<float> v, int32_t l, float a)
      : steer(nullptr), model(nullptr), vector(std::move(v)), layer(l), alpha(a), enabled(true) {}
  ~Entry() { innsteer_steer::release(steer); }
  Entry(const Entry&) = delete;
  Entry& operator=(const Entry&) = delete;
  bool active() const { return enabled.load() && alpha.load() != 0.0f; }
  int64_t dim() const { return model ? model->dim : static_cast<int64_t>(vector.size()); }
};

template <class In>
void add_vector(const std::vector<float>& vector, In* rows, int64_t n_rows, float alpha) {
  const int64_t dim = static_cast<int64_t>(vector.size());
  for (int64_t r = 0; r < n_rows; ++r) {
    In* row = rows + r * dim;
    for (int64_t i = 0; i < dim; ++i)
      row[i] = innsteer::from_acc<In>(innsteer::to_acc(row[i]) + alpha * vector[i]);
  }
}

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
  // Per-row mode (innsteer_hook_begin_rows): row r's alpha for entry e is row_alphas[r * entries + e],
  // in place of the entries' own alpha, enabled flag and first_row; row_count < 0 outside it.
  std::vector<float> row_alphas;
  int64_t row_count = -1;
  int64_t nodes_asked = 0;
  std::atomic<bool> in_call{false};  // between innsteer_hook_begin and innsteer_hook_end
  std::atomic<int> n_threads{1};
  std::atomic<bool> split_tile{false};  // opt-in: see innsteer_hook_set_split_tile
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

  // Entry e's alpha at row `row` of this call (0: the row is left alone).
  float alpha_at(size_t e, int64_t row) const {
    if (row_count >= 0) return row_alphas[static_cast<size_t>(row) * entries.size() + e];
    return row >= first_row && entries[e]->active() ? entries[e]->alpha.load() : 0.0f;
  }

  // The first row in [begin, end) that an entry at `layer` steers, or end.
  int64_t first_steered(int32_t layer, int64_t begin, int64_t end) const {
    int64_t first = end;
    for (size_t e = 0; e < entries.size(); ++e) {
      if (entries[e]->layer != layer) continue;
      for (int64_t r = begin; r < first; ++r) {
        if (alpha_at(e, r) != 0.0f) {
          first = r;
          break;
        }
      }
    }
    return first;
  }

  // Whether any of the rows of l_out-L being asked about is steered; advances the count.
  bool wants_rows(int32_t layer, int64_t n_rows) {
    tensor_offset[layer] = rows_done[layer];
    rows_done[layer] += n_rows;
    if (row_count >= 0 && rows_done[layer] > row_count) {
      record("innsteer hook: the batch has more rows than the " + std::to_string(row_count) +
             " given to innsteer_hook_begin_rows; nothing was steered");
      return false;
    }
    return first_steered(layer, tensor_offset[layer], rows_done[layer]) < rows_done[layer];
  }

  // Steers rows [0, n_rows) of the tensor, which are this call's rows [offset, offset + n_rows), each
  // run of rows with one alpha at once.
  template <class In>
  void steer_all(int32_t layer, In* data, int64_t offset, int64_t n_rows, int64_t dim) {
    const int workers = std::max(1, n_threads.load());
    for (size_t e = 0; e < entries.size(); ++e) {
      const Entry& entry = *entries[e];
      if (entry.layer != layer) continue;
      for (int64_t begin = 0; begin < n_rows;) {
        const float alpha = alpha_at(e, offset + begin);
        int64_t end = begin + 1;
        while (end < n_rows && alpha_at(e, offset + end) == alpha) ++end;
        if (alpha != 0.0f) {
          In* rows = data + begin * dim;
          if (entry.model) {
            const size_t need = static_cast<size_t>(workers * entry.model->workspace_per_worker());
            if (workspace.size() < need) workspace.resize(need);
            innsteer::llama_hook::steer_rows(*entry.model, rows, end - begin, alpha, workspace.data(), workers,
                                             split_tile.load());
          } else {
            add_vector(entry.vector, rows, end - begin, alpha);
          }
        }
        begin = end;
      }
    }
  }

  // Adds `entry` (checked here: layer, alpha, count); its index, or -1 with err set.
  int add(std::unique_ptr<Entry> entry, char* err, size_t err_len) {
    const int32_t layer = entry->layer;
    if (layer < 0 || layer > INNSTEER_MAX_LAYER) {
      copy_message(err, err_len, "layer " + std::to_string(layer) + " is outside 0.." +
                                     std::to_string(INNSTEER_MAX_LAYER));
      return -1;
    }
    if (!std::isfinite(entry->alpha.load())) {
      copy_message(err, err_len, "alpha must be finite (as a float32)");
      return -1;
    }
    std::lock_guard<std::mutex> lock(mutex);
    if (in_call.load()) {  // the per-row alphas of a call in progress are sized by the entries
      copy_message(err, err_len, "innsteer_hook_add: a decode is running with this hook");
      return -1;
    }
    if (entries.size() >= static_cast<size_t>(INT32_MAX)) {
      copy_message(err, err_len, "innsteer_hook_add: too many entries");
      return -1;
    }
    if (seen.size() <= static_cast<size_t>(layer)) {
      seen.resize(layer + 1, 0);
      rows_done.resize(layer + 1, 0);
      tensor_offset.resize(layer + 1, 0);
    }
    entries.push_back(std::move(entry));
    return static_cast<int>(entries.size() - 1);
  }

  void apply(ggml_tensor* t, int32_t layer) {
    const std::string where = std::string("innsteer hook at ") + t->name;
    if (t->type != GGML_TYPE_F32 && t->type != GGML_TYPE_F16 && t->type != GGML_TYPE_BF16)
      return record(where + ": unsupported tensor type " + ggml_type_name(t->type));
    if (!ggml_is_contiguous(t)) return record(where + ": tensor is not contiguous");
    if (!t->buffer) return record(where + ": tensor has no backend buffer");
    for (const auto& e : entries) {
      if (e->layer == layer && t->ne[0] != e->dim())
        return record(where + ": hidden size " + std::to_string(t->ne[0]) + " but the steer was made for " +
                      std::to_string(e->dim()));
    }
    const size_t n_bytes = ggml_nbytes(t);
    const int64_t n_rows = ggml_nrows(t);
    const int64_t offset = tensor_offset[layer];
    const int64_t skip = first_steered(layer, offset, offset + n_rows) - offset;
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
    const int64_t rest = n_rows - skip, dim = t->ne[0];
    switch (t->type) {
      case GGML_TYPE_F32: steer_all(layer, reinterpret_cast<float*>(first), offset + skip, rest, dim); break;
      case GGML_TYPE_F16: steer_all(layer, reinterpret_cast<half_t*>(first), offset + skip, rest, dim); break;
      default: steer_all(layer, reinterpret_cast<bf16_t*>(first), offset + skip, rest, dim); break;
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
  try {
    return hook->add(std::make_unique<Entry>(steer, layer, alpha), err, err_len);
  } catch (const std::bad_alloc&) {
    copy_message(err, err_len, "innsteer_hook_add: out of memory");
    return -1;
  }
}

int innsteer_hook_add_vector(innsteer_hook* hook, const float* values, int64_t dim, int32_t layer, float alpha,
                             char* err, size_t err_len) {
  if (!hook || !values) {
    copy_message(err, err_len, "innsteer_hook_add_vector: null hook or values");
    return -1;
  }
  if (dim < 1 || dim > INNSTEER_MAX_HIDDEN) {
    copy_message(err, err_len, "vector size " + std::to_string(dim) + " is outside 1.." +
                                   std::to_string(INNSTEER_MAX_HIDDEN));
    return -1;
  }
  if (!std::all_of(values, values + dim, [](float v) { return std::isfinite(v); })) {
    copy_message(err, err_len, "the vector holds NaN or Inf");
    return -1;
  }
  try {
    return hook->add(std::make_unique<Entry>(std::vector<float>(values, values + dim), layer, alpha), err, err_len);
  } catch (const std::bad_alloc&) {
    copy_message(err, err_len, "innsteer_hook_add_vector: out of memory");
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

int innsteer_hook_set_split_tile(innsteer_hook* hook, bool split) {
  if (!hook) return 1;
  hook->split_tile.store(split);
  return 0;
}

int64_t innsteer_hook_applied_count(const innsteer_hook* hook) { return hook ? hook->applied.load() : -1; }

double innsteer_hook_apply_seconds(const innsteer_hook* hook) { return hook ? 1e-9 * hook->apply_ns.load() : -1.0; }

namespace {

// begin's common part; the caller holds hook->mutex and has set in_call.
void start_call(innsteer_hook* hook, int64_t first_row) {
  std::fill(hook->seen.begin(), hook->seen.end(), 0);
  std::fill(hook->rows_done.begin(), hook->rows_done.end(), 0);
  hook->first_row = first_row;
  hook->nodes_asked = 0;
  std::lock_guard<std::mutex> error_lock(hook->error_mutex);
  hook->error.clear();
}

}  // namespace

int innsteer_hook_begin(innsteer_hook* hook, int64_t first_row) {
  if (!hook || first_row < 0) return 1;
  if (hook->in_call.exchange(true)) return 1;  // another decode is between its begin and end
  std::lock_guard<std::mutex> lock(hook->mutex);
  hook->row_count = -1;
  start_call(hook, first_row);
  return 0;
}

int innsteer_hook_begin_rows(innsteer_hook* hook, const float* alphas, int64_t n_rows, int64_t n_entries, char* err,
                             size_t err_len) {
  if (!hook || (!alphas && n_rows > 0)) {
    copy_message(err, err_len, "innsteer_hook_begin_rows: null hook or alphas");
    return 1;
  }
  if (hook->in_call.exchange(true)) {
    copy_message(err, err_len, "innsteer_hook_begin_rows: another decode is running with this hook");
    return 1;
  }
  std::lock_guard<std::mutex> lock(hook->mutex);
  const int64_t have = static_cast<int64_t>(hook->entries.size());
  std::string problem;
  if (n_entries != have)
    problem = "alphas for " + std::to_string(n_entries) + " entries, but the hook has " + std::to_string(have);
  else if (n_rows < 0 || n_rows > INNSTEER_MAX_ROWS)
    problem = "n_rows " + std::to_string(n_rows) + " is outside 0.." + std::to_string(INNSTEER_MAX_ROWS);
  else if (!std::all_of(alphas, alphas + n_rows * n_entries, [](float v) { return std::isfinite(v); }))
    problem = "an alpha is NaN or Inf";
  if (!problem.empty()) {
    hook->in_call.store(false);
    copy_message(err, err_len, "innsteer_hook_begin_rows: " + problem);
    return 1;
  }
  try {
    hook->row_alphas.assign(alphas, alphas + n_rows * n_entries);
  } catch (const std::bad_alloc&) {
    hook->in_call.store(false);
    copy_message(err, err_len, "innsteer_hook_begin_rows: out of memory");
    return 1;
  }
  hook->row_count = n_rows;
  start_call(hook, 0);
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
  const int64_t row_count = hook->row_count;
  hook->row_count = -1;
  if (hook->nodes_asked == 0) return 0;  // nothing was computed (e.g. an empty batch)
  for (size_t i = 0; i < hook->entries.size(); ++i) {
    const Entry& e = *hook->entries[i];
    bool used = e.enabled.load();
    if (row_count >= 0) {
      used = false;
      for (int64_t r = 0; r < row_count && !used; ++r) used = hook->row_alphas[r * hook->entries.size() + i] != 0.0f;
    }
    if (used && !hook->seen[e.layer]) {
      copy_message(err, err_len, "innsteer hook: the graph never produced tensor 'l_out-" + std::to_string(e.layer) +
                                     "' (this architecture does not name layer outputs l_out, or the model has "
                                     "fewer layers); nothing was steered");
      return 1;
    }
    if (used && row_count >= 0 && hook->rows_done[e.layer] != row_count) {
      copy_message(err, err_len, "innsteer hook: the batch had " + std::to_string(hook->rows_done[e.layer]) +
                                     " rows, not the " + std::to_string(row_count) +
                                     " given to innsteer_hook_begin_rows; its steering is wrong");
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
  if (static_cast<size_t>(layer) < hook->seen.size()) {
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
