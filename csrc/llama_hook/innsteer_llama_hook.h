/* The C API of the innsteer llama.cpp hook (loaded with ctypes by innsteer.llama_cpp).
 *
 * A steer is a loaded steer GGUF (innsteer.export). A hook holds entries (steer, layer, alpha,
 * enabled) and is installed as llama.cpp's eval callback (llama_context_params.cb_eval, with the
 * hook as cb_eval_user_data). The callback rewrites `l_out-L` in place for every enabled entry at
 * layer L. llama.cpp ignores a callback's failure, so errors are recorded in the hook: call
 * innsteer_hook_begin before and innsteer_hook_end after each llama_decode.
 *
 * Functions returning int return 0 on success, nonzero (with a message in err[0, err_len) where
 * they take err) on failure. Every function checks its pointer arguments: a NULL steer or hook is a
 * failure (getters return -1, NaN, false or NULL), never a crash.
 *
 * Ownership: a steer is reference-counted. Loading returns it with one reference (the caller's);
 * innsteer_hook_add takes one more for the entry, released when the hook is freed. So
 * innsteer_steer_free (which drops the caller's reference) is safe at any time, also while hooks
 * still use the steer.
 */
#ifndef INNSTEER_LLAMA_HOOK_H
#define INNSTEER_LLAMA_HOOK_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#ifdef __cplusplus
extern "C" {
#endif

struct ggml_tensor;

/* n_threads accepted by innsteer_steer_apply and innsteer_hook_set_threads: 1..INNSTEER_MAX_THREADS. */
#define INNSTEER_MAX_THREADS 256
/* Layers accepted by innsteer_hook_add: 0..INNSTEER_MAX_LAYER. */
#define INNSTEER_MAX_LAYER 65536
/* Vector sizes accepted by innsteer_hook_add_vector: 1..INNSTEER_MAX_HIDDEN. */
#define INNSTEER_MAX_HIDDEN (1 << 20)
/* Rows accepted by innsteer_hook_begin_rows: 0..INNSTEER_MAX_ROWS. */
#define INNSTEER_MAX_ROWS (1 << 24)
typedef struct innsteer_steer innsteer_steer;
typedef struct innsteer_hook innsteer_hook;

/* Loading; NULL on failure with the reason in err. */
innsteer_steer* innsteer_steer_load_file(const char* path, char* err, size_t err_len);
innsteer_steer* innsteer_steer_load_buffer(const uint8_t* data, size_t len, char* err, size_t err_len);
/* Drops the caller's reference (see Ownership); NULL is ignored. */
void innsteer_steer_free(innsteer_steer* steer);

/* What the file says. key: "model_id", "model_hint", "method", "behavior", "scaling" (NULL for others). */
int64_t innsteer_steer_hidden_size(const innsteer_steer* steer);
int32_t innsteer_steer_layer(const innsteer_steer* steer);
float innsteer_steer_alpha(const innsteer_steer* steer);
int64_t innsteer_steer_num_couplings(const innsteer_steer* steer);
int64_t innsteer_steer_mlp_hidden(const innsteer_steer* steer);
bool innsteer_steer_bf16_weights(const innsteer_steer* steer);
const char* innsteer_steer_meta(const innsteer_steer* steer, const char* key);

/* Steers n_rows rows of hidden_size float32 values in place (what the callback does to l_out; with
 * n_threads > 1 up to 8 rows split their columns over the threads, as a hook with split_tile on).
 * alpha must be finite, n_rows >= 0, n_threads in 1..INNSTEER_MAX_THREADS. */
int innsteer_steer_apply(const innsteer_steer* steer, float* rows, int64_t n_rows, float alpha, int n_threads,
                         char* err, size_t err_len);

/* Hooks. An entry owns a reference to its steer (see Ownership); the hook's own functions may be
 * called from several threads (entries are guarded by a mutex). */
innsteer_hook* innsteer_hook_new(void);
/* Frees the hook and releases its entries' steers. Must not run during a decode that uses it. */
void innsteer_hook_free(innsteer_hook* hook);
/* Adds an entry at `layer` (0..INNSTEER_MAX_LAYER) with a finite alpha, taking a reference to the
 * steer; returns the entry's index (>= 0), or -1 with err set. */
int innsteer_hook_add(innsteer_hook* hook, innsteer_steer* steer, int32_t layer, float alpha, char* err,
                      size_t err_len);
/* Adds an entry that adds alpha * values[0, dim) to the rows of `l_out-layer` (a control vector, per
 * row; dim in 1..INNSTEER_MAX_HIDDEN, finite values; copied); its index, or -1 with err set. Entries
 * cannot be added while a decode is between begin and end. */
int innsteer_hook_add_vector(innsteer_hook* hook, const float* values, int64_t dim, int32_t layer, float alpha,
                             char* err, size_t err_len);
/* Nonzero (and nothing changed) for a NULL hook, an entry index out of range or a non-finite alpha. */
int innsteer_hook_set_alpha(innsteer_hook* hook, int entry, float alpha);
int innsteer_hook_set_enabled(innsteer_hook* hook, int entry, bool enabled);
/* Nonzero (and nothing changed) for a NULL hook or n_threads outside 1..INNSTEER_MAX_THREADS. */
int innsteer_hook_set_threads(innsteer_hook* hook, int n_threads);
/* Whether a decode's rows (one tile, up to 8) split their gemms' columns over the n_threads (default
 * off): 11-16 % less time in the hook on an idle 2-core machine, but OpenMP threads stall when other
 * work holds the cores (bench/RESULTS.md). Nonzero for a NULL hook. */
int innsteer_hook_set_split_tile(innsteer_hook* hook, bool split);
/* Number of l_out tensors rewritten since innsteer_hook_new (to check the hook really ran); -1 for NULL. */
int64_t innsteer_hook_applied_count(const innsteer_hook* hook);
/* Seconds spent rewriting l_out tensors (read, steer, write) since innsteer_hook_new; -1 for NULL. */
double innsteer_hook_apply_seconds(const innsteer_hook* hook);

/* Around each decode: begin clears the per-call state and leaves the call's first `first_row`
 * tokens unsteered (0: steer all); end returns nonzero (and the message) if the callback failed or
 * a graph ran in which an enabled entry's tensor `l_out-L` never appeared, and ends the call.
 * begin returns nonzero (and the decode must not run) for a NULL hook, a negative first_row, or
 * while another call on this hook is between its begin and end (concurrent decodes); so call end
 * after every successful begin, also when the decode fails. */
int innsteer_hook_begin(innsteer_hook* hook, int64_t first_row);
/* begin for a batch of several sequences: row r of the batch (its r-th token, in the batch's order;
 * llama.cpp keeps that order in the ubatches of a unified KV cache) gets alpha alphas[r * n_entries + e]
 * for entry e, in place of the entries' alpha and enabled flag (0: not steered). n_entries must equal
 * the hook's entry count, n_rows the batch's token count (end fails otherwise); alphas are copied.
 * Nonzero with err set (and no call begun) for bad arguments or a call in progress. */
int innsteer_hook_begin_rows(innsteer_hook* hook, const float* alphas, int64_t n_rows, int64_t n_entries, char* err,
                             size_t err_len);
int innsteer_hook_end(innsteer_hook* hook, char* err, size_t err_len);

/* llama.cpp's ggml_backend_sched_eval_callback; user_data is the innsteer_hook*. */
bool innsteer_hook_eval_callback(struct ggml_tensor* t, bool ask, void* user_data);

#ifdef __cplusplus
}
#endif

#endif /* INNSTEER_LLAMA_HOOK_H */
