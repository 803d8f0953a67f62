/* The C API of the innsteer llama.cpp hook (loaded with ctypes by innsteer.llama_cpp).
 *
 * A steer is a loaded steer GGUF (innsteer.export). A hook holds entries (steer, layer, alpha,
 * enabled) and is installed as llama.cpp's eval callback (llama_context_params.cb_eval, with the
 * hook as cb_eval_user_data). The callback rewrites `l_out-L` in place for every enabled entry at
 * layer L. llama.cpp ignores a callback's failure, so errors are recorded in the hook: call
 * innsteer_hook_begin before and innsteer_hook_end after each llama_decode.
 *
 * Functions returning int return 0 on success, nonzero with a message in err[0, err_len).
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
typedef struct innsteer_steer innsteer_steer;
typedef struct innsteer_hook innsteer_hook;

/* Loading; NULL on failure with the reason in err. */
innsteer_steer* innsteer_steer_load_file(const char* path, char* err, size_t err_len);
innsteer_steer* innsteer_steer_load_buffer(const uint8_t* data, size_t len, char* err, size_t err_len);
void innsteer_steer_free(innsteer_steer* steer);

/* What the file says. key: "model_id", "model_hint", "method", "behavior" (NULL for others). */
int64_t innsteer_steer_hidden_size(const innsteer_steer* steer);
int32_t innsteer_steer_layer(const innsteer_steer* steer);
float innsteer_steer_alpha(const innsteer_steer* steer);
int64_t innsteer_steer_num_couplings(const innsteer_steer* steer);
int64_t innsteer_steer_mlp_hidden(const innsteer_steer* steer);
bool innsteer_steer_bf16_weights(const innsteer_steer* steer);
const char* innsteer_steer_meta(const innsteer_steer* steer, const char* key);

/* Steers n_rows rows of hidden_size float32 values in place (what the callback does to l_out). */
int innsteer_steer_apply(const innsteer_steer* steer, float* rows, int64_t n_rows, float alpha, int n_threads,
                         char* err, size_t err_len);

/* Hooks. An entry borrows its steer: free the hook before the steers it uses. */
innsteer_hook* innsteer_hook_new(void);
void innsteer_hook_free(innsteer_hook* hook);
/* Adds an entry at `layer`; returns its index (>= 0), or -1 with err set. */
int innsteer_hook_add(innsteer_hook* hook, const innsteer_steer* steer, int32_t layer, float alpha, char* err,
                      size_t err_len);
int innsteer_hook_set_alpha(innsteer_hook* hook, int entry, float alpha);
int innsteer_hook_set_enabled(innsteer_hook* hook, int entry, bool enabled);
void innsteer_hook_set_threads(innsteer_hook* hook, int n_threads);
/* Number of l_out tensors rewritten since innsteer_hook_new (to check the hook really ran). */
int64_t innsteer_hook_applied_count(const innsteer_hook* hook);
/* Seconds spent rewriting l_out tensors (read, steer, write) since innsteer_hook_new. */
double innsteer_hook_apply_seconds(const innsteer_hook* hook);

/* Around each decode: begin clears the per-call state and leaves the call's first `first_row`
 * tokens unsteered (0: steer all); end returns nonzero (and the message) if the callback failed or
 * a graph ran in which an enabled entry's tensor `l_out-L` never appeared. */
void innsteer_hook_begin(innsteer_hook* hook, int64_t first_row);
int innsteer_hook_end(innsteer_hook* hook, char* err, size_t err_len);

/* llama.cpp's ggml_backend_sched_eval_callback; user_data is the innsteer_hook*. */
bool innsteer_hook_eval_callback(struct ggml_tensor* t, bool ask, void* user_data);

#ifdef __cplusplus
}
#endif

#endif /* INNSTEER_LLAMA_HOOK_H */
