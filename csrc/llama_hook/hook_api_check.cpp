// Hostile and careless use of the hook's C API, meant to run under AddressSanitizer + UBSan (or
// ThreadSanitizer for the concurrency part). Built by tests/test_llama_hostile.py and linked to
// llama-cpp-python's libggml-base, it drives innsteer_hook_eval_callback with a real ggml tensor
// named l_out-L in a CPU backend buffer, as llama.cpp's scheduler would.
//     hook_api_check STEER.gguf {ownership|arguments|rows|threads}
// Prints one line per failed check and exits nonzero if any failed.
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <string>
#include <thread>
#include <vector>

#include "ggml-alloc.h"
#include "ggml-backend.h"
#include "ggml.h"
#include "innsteer_llama_hook.h"

namespace {

int failures = 0;

void check(bool ok, const std::string& what) {
  if (!ok) {
    std::printf("FAILED: %s\n", what.c_str());
    ++failures;
  }
}

// A tensor `name` of n_rows x dim float32 values in a CPU backend buffer.
struct Activations {
  ggml_context* ctx = nullptr;
  ggml_backend_buffer_t buffer = nullptr;
  ggml_tensor* tensor = nullptr;

  Activations(const char* name, int64_t dim, int64_t n_rows) {
    ggml_init_params params = {ggml_tensor_overhead() * 2, nullptr, true};
    ctx = ggml_init(params);
    tensor = ggml_new_tensor_2d(ctx, GGML_TYPE_F32, dim, n_rows);
    ggml_set_name(tensor, name);
    buffer = ggml_backend_alloc_ctx_tensors_from_buft(ctx, ggml_backend_cpu_buffer_type());
  }
  ~Activations() {
    ggml_backend_buffer_free(buffer);
    ggml_free(ctx);
  }
  void set(const std::vector<float>& rows) { ggml_backend_tensor_set(tensor, rows.data(), 0, rows.size() * 4); }
  std::vector<float> get() const {
    std::vector<float> rows(ggml_nelements(tensor));
    ggml_backend_tensor_get(tensor, rows.data(), 0, rows.size() * 4);
    return rows;
  }
};

std::vector<float> test_rows(int64_t dim, int64_t n_rows) {
  std::vector<float> rows(dim * n_rows);
  for (size_t i = 0; i < rows.size(); ++i) rows[i] = static_cast<float>(i % 13) * 0.5f - 3.0f;
  return rows;
}

// One decode as llama.cpp runs it: begin, ask about the node, hand over the computed node, end.
int decode(innsteer_hook* hook, ggml_tensor* t, std::string* message = nullptr) {
  if (innsteer_hook_begin(hook, 0)) return -1;
  if (innsteer_hook_eval_callback(t, true, hook)) innsteer_hook_eval_callback(t, false, hook);
  char err[512] = "";
  const int status = innsteer_hook_end(hook, err, sizeof err);
  if (message) *message = err;
  return status;
}

innsteer_steer* load(const char* path) {
  char err[512];
  innsteer_steer* steer = innsteer_steer_load_file(path, err, sizeof err);
  if (!steer) {
    std::printf("cannot load %s: %s\n", path, err);
    std::exit(2);
  }
  return steer;
}

// The steer outlives the caller's reference: the entries own theirs.
void ownership(const char* path) {
  innsteer_steer* reference = load(path);
  innsteer_steer* steer = load(path);
  const int64_t dim = innsteer_steer_hidden_size(reference);
  const float alpha = 1.5f;
  std::vector<float> expected = test_rows(dim, 3);
  char err[512];
  check(innsteer_steer_apply(reference, expected.data(), 3, alpha, 1, err, sizeof err) == 0, "reference apply");

  innsteer_hook* hook = innsteer_hook_new();
  innsteer_hook* other = innsteer_hook_new();
  check(innsteer_hook_add(hook, steer, 4, alpha, err, sizeof err) == 0, "add");
  check(innsteer_hook_add(other, steer, 4, alpha, err, sizeof err) == 0, "add to a second hook");
  innsteer_steer_free(steer);  // the caller lets go while both hooks still use it
  Activations act("l_out-4", dim, 3);
  act.set(test_rows(dim, 3));
  check(decode(hook, act.tensor) == 0, "decode after the caller freed the steer");
  check(act.get() == expected, "steered rows after the caller freed the steer equal the reference");
  innsteer_hook_free(hook);  // one owner left
  act.set(test_rows(dim, 3));
  check(decode(other, act.tensor) == 0, "decode through the second hook after the first was freed");
  check(act.get() == expected, "second hook still steers with the steer");
  innsteer_hook_free(other);  // the last reference: LeakSanitizer checks it was freed
  innsteer_steer_free(reference);
}

// NULL pointers, indices, alphas, thread counts and rows out of range: refused, never a crash.
void arguments(const char* path) {
  const float nan = std::numeric_limits<float>::quiet_NaN(), inf = std::numeric_limits<float>::infinity();
  char err[512];
  check(innsteer_steer_load_file(nullptr, err, sizeof err) == nullptr, "load_file(NULL)");
  check(innsteer_steer_load_file("/", err, sizeof err) == nullptr, "load_file(a directory)");
  check(innsteer_steer_load_file("/nonexistent/steer.gguf", err, sizeof err) == nullptr, "load_file(missing)");
  check(innsteer_steer_load_buffer(nullptr, 10, err, sizeof err) == nullptr, "load_buffer(NULL, 10)");
  check(innsteer_steer_load_buffer(nullptr, 0, nullptr, 0) == nullptr, "load_buffer(NULL, 0) without err");
  innsteer_steer_free(nullptr);
  check(innsteer_steer_hidden_size(nullptr) == -1 && innsteer_steer_layer(nullptr) == -1 &&
            std::isnan(innsteer_steer_alpha(nullptr)) && innsteer_steer_num_couplings(nullptr) == -1 &&
            innsteer_steer_mlp_hidden(nullptr) == -1 && !innsteer_steer_bf16_weights(nullptr) &&
            innsteer_steer_meta(nullptr, "model_id") == nullptr,
        "getters on a NULL steer");

  innsteer_steer* steer = load(path);
  const int64_t dim = innsteer_steer_hidden_size(steer);
  check(innsteer_steer_meta(steer, nullptr) == nullptr, "meta(NULL key)");
  std::vector<float> rows = test_rows(dim, 2);
  const std::vector<float> original = rows;
  check(innsteer_steer_apply(nullptr, rows.data(), 2, 1.0f, 1, err, sizeof err) != 0, "apply(NULL steer)");
  check(innsteer_steer_apply(steer, nullptr, 2, 1.0f, 1, err, sizeof err) != 0, "apply(NULL rows)");
  check(innsteer_steer_apply(steer, rows.data(), -1, 1.0f, 1, err, sizeof err) != 0, "apply(n_rows -1)");
  check(innsteer_steer_apply(steer, rows.data(), INT64_MAX, 1.0f, 1, err, sizeof err) != 0, "apply(n_rows max)");
  check(innsteer_steer_apply(steer, rows.data(), 2, nan, 1, err, sizeof err) != 0, "apply(alpha NaN)");
  check(std::strstr(err, "alpha") != nullptr, "apply(alpha NaN) names alpha");
  check(innsteer_steer_apply(steer, rows.data(), 2, -inf, 1, err, sizeof err) != 0, "apply(alpha -inf)");
  std::vector<float> with_nan = rows;
  with_nan[dim + 1] = nan;
  check(innsteer_steer_apply(steer, with_nan.data(), 2, 1.0f, 1, err, sizeof err) != 0, "apply(rows with NaN)");
  check(innsteer_steer_apply(steer, rows.data(), 2, 1.0f, 0, err, sizeof err) != 0, "apply(0 threads)");
  check(innsteer_steer_apply(steer, rows.data(), 2, 1.0f, 1 << 30, err, sizeof err) != 0, "apply(2^30 threads)");
  check(innsteer_steer_apply(steer, rows.data(), 2, 1.0f, 1, nullptr, 0) == 0, "apply without err buffer");
  check(rows != original, "a valid apply steers");
  check(innsteer_steer_apply(steer, rows.data(), 0, 1.0f, INNSTEER_MAX_THREADS, err, sizeof err) == 0,
        "apply(0 rows, max threads)");

  check(innsteer_hook_add(nullptr, steer, 1, 1.0f, err, sizeof err) == -1, "add(NULL hook)");
  innsteer_hook* hook = innsteer_hook_new();
  check(innsteer_hook_add(hook, nullptr, 1, 1.0f, err, sizeof err) == -1, "add(NULL steer)");
  check(innsteer_hook_add(hook, steer, -1, 1.0f, err, sizeof err) == -1, "add(layer -1)");
  check(innsteer_hook_add(hook, steer, INNSTEER_MAX_LAYER + 1, 1.0f, err, sizeof err) == -1, "add(layer max+1)");
  check(innsteer_hook_add(hook, steer, 2, nan, err, sizeof err) == -1, "add(alpha NaN)");
  check(innsteer_hook_add(hook, steer, 2, inf, nullptr, 0) == -1, "add(alpha inf) without err buffer");
  check(innsteer_hook_add(hook, steer, 2, 1.0f, err, sizeof err) == 0, "add");
  check(innsteer_hook_add(hook, steer, 2, 1.0f, err, sizeof err) == 1, "the same steer twice: a second entry");
  for (int entry : {-1, 2, 1 << 30}) {
    check(innsteer_hook_set_alpha(hook, entry, 1.0f) != 0, "set_alpha(entry " + std::to_string(entry) + ")");
    check(innsteer_hook_set_enabled(hook, entry, true) != 0, "set_enabled(entry " + std::to_string(entry) + ")");
  }
  check(innsteer_hook_set_alpha(hook, 0, nan) != 0 && innsteer_hook_set_alpha(hook, 0, inf) != 0,
        "set_alpha(non-finite)");
  check(innsteer_hook_set_alpha(nullptr, 0, 1.0f) != 0 && innsteer_hook_set_enabled(nullptr, 0, true) != 0,
        "set_alpha/set_enabled(NULL hook)");
  for (int n : {0, -3, INNSTEER_MAX_THREADS + 1, 1 << 30})
    check(innsteer_hook_set_threads(hook, n) != 0, "set_threads(" + std::to_string(n) + ")");
  check(innsteer_hook_set_threads(hook, 2) == 0 && innsteer_hook_set_threads(nullptr, 2) != 0, "set_threads");
  check(innsteer_hook_set_split_tile(nullptr, true) != 0, "set_split_tile(NULL hook)");
  check(innsteer_hook_applied_count(nullptr) == -1 && innsteer_hook_apply_seconds(nullptr) < 0,
        "counters of a NULL hook");
  check(innsteer_hook_begin(nullptr, 0) != 0, "begin(NULL hook)");
  check(innsteer_hook_begin(hook, -1) != 0, "begin(first_row -1)");
  check(innsteer_hook_begin(hook, INT64_MIN) != 0, "begin(first_row INT64_MIN)");
  check(innsteer_hook_end(nullptr, err, sizeof err) != 0, "end(NULL hook)");
  check(innsteer_hook_end(hook, nullptr, 0) == 0, "end without begin or err buffer");
  check(!innsteer_hook_eval_callback(nullptr, true, hook) && innsteer_hook_eval_callback(nullptr, false, hook),
        "callback(NULL tensor)");

  Activations act("l_out-2", dim, 2);
  check(!innsteer_hook_eval_callback(act.tensor, true, nullptr) && innsteer_hook_eval_callback(act.tensor, false, nullptr),
        "callback(NULL user data)");
  // Both entries (the same steer twice) steer in turn: steer(steer(x)).
  std::vector<float> twice = test_rows(dim, 2);
  check(innsteer_steer_apply(steer, twice.data(), 2, 1.0f, 1, err, sizeof err) == 0 &&
            innsteer_steer_apply(steer, twice.data(), 2, 1.0f, 1, err, sizeof err) == 0,
        "apply twice");
  act.set(test_rows(dim, 2));
  check(decode(hook, act.tensor) == 0, "decode with two entries");
  const std::vector<float> got = act.get();
  float worst = 0;
  for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::fabs(got[i] - twice[i]));
  check(worst < 1e-4f, "two entries of one steer steer twice (2 threads vs 1)");
  check(innsteer_hook_applied_count(hook) == 1, "applied_count counts the tensor once");

  Activations wide("l_out-2", dim + 1, 2);  // a tensor of another hidden size: an error, not an overrun
  std::string message;
  check(decode(hook, wide.tensor, &message) != 0 && message.find("hidden size") != std::string::npos,
        "a tensor of another hidden size is refused: " + message);
  Activations absent("l_out-3", dim, 2);  // layer 2 never appears in this graph
  check(decode(hook, absent.tensor, &message) != 0 && message.find("l_out-2") != std::string::npos,
        "a missing l_out tensor is reported: " + message);

  check(innsteer_hook_begin(hook, 0) == 0, "begin");
  check(innsteer_hook_begin(hook, 0) != 0, "a second begin before end (concurrent decode) is refused");
  check(innsteer_hook_end(hook, err, sizeof err) == 0 && innsteer_hook_begin(hook, 0) == 0,
        "begin works again after end");
  innsteer_hook_end(hook, err, sizeof err);
  innsteer_hook_free(hook);
  innsteer_hook_free(nullptr);
  innsteer_steer_free(steer);
}

// Per-row steering (a batch of several sequences): each row under its own alphas, vectors added per
// row, and the row count checked both ways.
void rows(const char* path) {
  innsteer_steer* steer = load(path);
  const int64_t dim = innsteer_steer_hidden_size(steer), n_rows = 4;
  const float nan = std::numeric_limits<float>::quiet_NaN();
  char err[512];
  innsteer_hook* hook = innsteer_hook_new();
  check(innsteer_hook_set_threads(hook, 2) == 0 && innsteer_hook_set_split_tile(hook, true) == 0,
        "2 threads, one tile split");  // the rows below are one tile
  std::vector<float> vector(dim);
  for (int64_t i = 0; i < dim; ++i) vector[i] = 0.01f * static_cast<float>(i % 7) - 0.03f;
  check(innsteer_hook_add(hook, steer, 2, 0.0f, err, sizeof err) == 0, "add");
  check(innsteer_hook_add_vector(hook, vector.data(), dim, 2, 0.0f, err, sizeof err) == 1, "add_vector");
  check(innsteer_hook_add_vector(nullptr, vector.data(), dim, 2, 1.0f, err, sizeof err) == -1, "add_vector(NULL hook)");
  check(innsteer_hook_add_vector(hook, nullptr, dim, 2, 1.0f, err, sizeof err) == -1, "add_vector(NULL values)");
  check(innsteer_hook_add_vector(hook, vector.data(), 0, 2, 1.0f, err, sizeof err) == -1, "add_vector(dim 0)");
  check(innsteer_hook_add_vector(hook, vector.data(), INT64_MAX, 2, 1.0f, err, sizeof err) == -1,
        "add_vector(dim max)");
  check(innsteer_hook_add_vector(hook, vector.data(), dim, -1, 1.0f, err, sizeof err) == -1, "add_vector(layer -1)");
  check(innsteer_hook_add_vector(hook, vector.data(), dim, 2, nan, err, sizeof err) == -1, "add_vector(alpha NaN)");

  // row r: (INN alpha, vector alpha)
  const float alphas[n_rows][2] = {{1.5f, 0.0f}, {0.0f, 0.0f}, {-2.0f, 3.0f}, {0.0f, 2.0f}};
  std::vector<float> expected = test_rows(dim, n_rows);
  for (int64_t r = 0; r < n_rows; ++r) {
    float* row = expected.data() + r * dim;
    if (alphas[r][0] != 0.0f) check(innsteer_steer_apply(steer, row, 1, alphas[r][0], 1, err, sizeof err) == 0, "apply");
    for (int64_t i = 0; i < dim; ++i) row[i] += alphas[r][1] * vector[i];
  }
  Activations act("l_out-2", dim, n_rows);
  act.set(test_rows(dim, n_rows));
  check(innsteer_hook_begin_rows(hook, &alphas[0][0], n_rows, 2, err, sizeof err) == 0, "begin_rows");
  if (innsteer_hook_eval_callback(act.tensor, true, hook)) innsteer_hook_eval_callback(act.tensor, false, hook);
  check(innsteer_hook_end(hook, err, sizeof err) == 0, std::string("end after per-row steering: ") + err);
  const std::vector<float> got = act.get();
  float worst = 0;
  for (size_t i = 0; i < got.size(); ++i) worst = std::max(worst, std::fabs(got[i] - expected[i]));
  check(worst < 1e-4f, "each row steered under its own alphas");

  check(innsteer_hook_begin_rows(hook, nullptr, n_rows, 2, err, sizeof err) != 0, "begin_rows(NULL alphas)");
  check(innsteer_hook_begin_rows(hook, &alphas[0][0], n_rows, 3, err, sizeof err) != 0, "begin_rows(3 entries)");
  check(innsteer_hook_begin_rows(hook, &alphas[0][0], -1, 2, err, sizeof err) != 0, "begin_rows(-1 rows)");
  check(innsteer_hook_begin_rows(hook, &alphas[0][0], INT64_MAX / 2, 2, err, sizeof err) != 0,
        "begin_rows(too many rows)");
  const float with_nan[2] = {nan, 0.0f};
  check(innsteer_hook_begin_rows(hook, with_nan, 1, 2, err, sizeof err) != 0, "begin_rows(NaN alpha)");
  // the tensor has 4 rows: alphas for 3 are refused when the fourth is asked about, for 5 at the end
  check(innsteer_hook_begin_rows(hook, &alphas[0][0], 3, 2, err, sizeof err) == 0, "begin_rows(3)");
  check(!innsteer_hook_eval_callback(act.tensor, true, hook), "more rows than given are not steered");
  check(innsteer_hook_end(hook, err, sizeof err) != 0 && std::strstr(err, "more rows") != nullptr,
        std::string("more rows than given: ") + err);
  std::vector<float> five(5 * 2, 1.0f);
  check(innsteer_hook_begin_rows(hook, five.data(), 5, 2, err, sizeof err) == 0, "begin_rows(5)");
  if (innsteer_hook_eval_callback(act.tensor, true, hook)) innsteer_hook_eval_callback(act.tensor, false, hook);
  check(innsteer_hook_end(hook, err, sizeof err) != 0 && std::strstr(err, "not the 5") != nullptr,
        std::string("fewer rows than given: ") + err);
  innsteer_hook_free(hook);
  innsteer_steer_free(steer);
}

// Entries added and changed from another thread while decodes run (ctypes releases the GIL).
void threads(const char* path) {
  innsteer_steer* steer = load(path);
  const int64_t dim = innsteer_steer_hidden_size(steer);
  innsteer_hook* hook = innsteer_hook_new();
  char err[512];
  check(innsteer_hook_add(hook, steer, 1, 0.5f, err, sizeof err) == 0, "add");
  Activations act("l_out-1", dim, 2);
  std::thread writer([&] {
    char writer_err[512];
    for (int i = 0; i < 200; ++i) {
      innsteer_hook_add(hook, steer, 100 + i, 0.5f, writer_err, sizeof writer_err);  // grows every vector
      innsteer_hook_set_alpha(hook, i, 0.25f);
      innsteer_hook_set_enabled(hook, i, i % 2 == 0);
    }
  });
  std::thread second_decoder([&] {
    Activations mine("l_out-1", dim, 2);
    for (int i = 0; i < 200; ++i) decode(hook, mine.tensor);  // refused while the other decode runs
  });
  for (int i = 0; i < 200; ++i) {
    act.set(test_rows(dim, 2));
    decode(hook, act.tensor);
  }
  writer.join();
  second_decoder.join();
  innsteer_hook_free(hook);
  innsteer_steer_free(steer);
}

}  // namespace

int main(int argc, char** argv) {
  if (argc != 3) {
    std::fprintf(stderr, "usage: %s STEER.gguf {ownership|arguments|rows|threads}\n", argv[0]);
    return 2;
  }
  const std::string part = argv[2];
  if (part == "ownership") {
    ownership(argv[1]);
  } else if (part == "arguments") {
    arguments(argv[1]);
  } else if (part == "threads") {
    threads(argv[1]);
  } else if (part == "rows") {
    rows(argv[1]);
  } else {
    std::fprintf(stderr, "unknown part %s\n", argv[2]);
    return 2;
  }
  std::printf("hook_api_check %s: %d failed\n", part.c_str(), failures);
  return failures ? 1 : 0;
}
