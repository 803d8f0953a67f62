"""How innsteer's steering is installed into a ``llama_cpp.Llama`` object: the context rebuilt with the
hook as its eval callback and every decode checked, ``generate`` tracked, ``eval`` serialized, saved
states tagged. Each function patches the Llama of one ``LlamaSteering`` (``innsteer.llama.steering``)
and reads that steering's state; with ``batching``, ``grammar`` and ``chat``, the only code that
touches llama-cpp-python's private attributes (``_ctx``, ``_model``, ``_stack``, ``_internals``).
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
from typing import Optional

import numpy as np

from ..core.errors import ConfigError
from .bindings import ERR_LEN, INSTALL_HINT, NonFiniteLogitsError, SteerHookError

try:
    import llama_cpp
    from llama_cpp import _internals
except ImportError as _error:  # optional dependency
    raise ImportError(INSTALL_HINT) from _error

UNSTEERED = "unsteered"  # the steering of a state saved with no active entry and no control vector


def finite_last_logits(ctx, n_vocab: int) -> bool:
    """Whether the last row of logits a decode produced is finite (~20 us for 50k tokens)."""
    logits = llama_cpp.llama_get_logits_ith(ctx, -1)
    return not logits or bool(np.isfinite(np.ctypeslib.as_array(logits, shape=(n_vocab,))).all())


class Generation:
    """One running ``Llama.generate`` (see ``track_generations``)."""

    def __init__(self):
        self.broken: Optional[str] = None  # why it cannot go on, once re-evaluating its tokens failed


def eval_callback(lib):
    """The hook's C eval callback as llama.cpp's ``cb_eval`` (keep it referenced while a context uses it)."""
    return llama_cpp.ggml_backend_sched_eval_callback(
        ctypes.cast(lib.innsteer_hook_eval_callback, ctypes.c_void_p).value
    )


def install_hook_context(steering) -> None:
    """Recreate the Llama's context with the hook as its eval callback (llama.cpp reads
    cb_eval only at context creation), and check the hook after every decode."""
    llm = steering.llm
    params = llm.context_params
    steering._callback = eval_callback(steering._lib)
    params.cb_eval = steering._callback
    params.cb_eval_user_data = ctypes.c_void_p(steering._hook)
    new_ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=llm.verbose)
    old_ctx, llm._ctx = llm._ctx, llm._stack.enter_context(contextlib.closing(new_ctx))
    old_ctx.close()
    if getattr(llm, "_lora_adapter", None) is not None:
        adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
        scales = (ctypes.c_float * 1)(llm.lora_scale)
        if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, scales):
            raise RuntimeError("failed to re-apply the LoRA adapter to the steered context")
    llm.reset()

    lib, decode = steering._lib, new_ctx.decode
    n_vocab = int(llama_cpp.llama_vocab_n_tokens(llama_cpp.llama_model_get_vocab(llm.model)))

    def checked_decode(batch):
        hook = steering._live_hook()
        first_row = 0
        n_rows = batch.batch.n_tokens
        if n_rows > 0 and steering.start_position > batch.batch.pos[0]:
            # The hook skips whole rows: that needs row i at position pos[0] + i, as in eval's
            # batches; embed() packs several sequences, each from position 0.
            positions = np.ctypeslib.as_array(batch.batch.pos, shape=(n_rows,))
            if np.any(positions != positions[0] + np.arange(n_rows)):
                raise SteerHookError(
                    f"steer_from({steering.start_position}) needs one sequence at consecutive positions per batch; "
                    "this batch packs several (embed several texts one by one, or steer_from(0))"
                )
            first_row = steering.start_position - int(positions[0])
        if lib.innsteer_hook_begin(hook, first_row):
            raise RuntimeError("another decode is running with this Llama's steering hook (concurrent use)")
        err = ctypes.create_string_buffer(ERR_LEN)
        try:
            decode(batch)
        finally:
            failed = lib.innsteer_hook_end(hook, err, ERR_LEN)
        if failed:
            llm.reset()  # the cache now holds unsteered or broken states
            raise SteerHookError(err.value.decode(errors="replace"))
        if n_rows > 0 and batch.batch.logits[n_rows - 1] and not finite_last_logits(new_ctx.ctx, n_vocab):
            llm.reset()
            raise NonFiniteLogitsError()

    new_ctx.decode = checked_decode
    llm._stack.callback(steering._free)  # when the Llama closes; nothing decodes after that


def track_generations(steering) -> None:
    """Wrap the Llama's ``generate`` (which ``create_completion`` and chat calls use) so that the
    steering knows when a generation is suspended between tokens (a partly read stream)."""
    generate = steering.llm.generate

    @functools.wraps(generate)
    def tracked_generate(*args, **kwargs):
        generation = Generation()
        inner = generate(*args, **kwargs)
        steering._generations.append(generation)
        try:
            sent = None  # Llama.generate takes tokens sent into it: pass them on
            while True:
                try:
                    token = inner.send(sent)
                except StopIteration:
                    return
                sent = yield token
                if generation.broken:
                    raise SteerHookError(generation.broken)
        finally:
            steering._generations.remove(generation)
            inner.close()

    steering.llm.generate = tracked_generate


def serialize_evals(steering) -> None:
    """Two threads evaluating with one Llama at once would decode into the same cache positions
    and batch (ctypes releases the GIL during llama_decode), and a steering change would reset
    the cache under a running decode: both wait for the eval in progress instead."""
    evaluate = steering.llm.eval

    @functools.wraps(evaluate)
    def serialized_eval(tokens):
        with steering._lock:
            steering._live_hook()  # a closed Llama's eval would crash in llama.cpp
            evaluate(tokens)

    steering.llm.eval = serialized_eval


def tag_saved_states(steering) -> None:
    """A saved state (``save_state``, and the states ``Llama.cache`` keeps per prompt) holds a KV
    cache computed under the steering of its time: tag it, and refuse to load it under other
    steering, where it would silently mix two settings."""
    save_state, load_state = steering.llm.save_state, steering.llm.load_state

    @functools.wraps(save_state)
    def tagged_save_state():
        with steering._lock:
            state = save_state()
            state.innsteer_steering = steering._signature()
        return state

    @functools.wraps(load_state)
    def checked_load_state(state):
        with steering._lock:
            steering._live_hook()
            if getattr(state, "innsteer_steering", UNSTEERED) != steering._signature():
                raise ConfigError(
                    "this saved state was computed under other steering than this Llama's now: restore that "
                    "steering first, or, for states kept by Llama.cache, clear the cache (llm.set_cache(None))"
                )
            load_state(state)

    steering.llm.save_state, steering.llm.load_state = tagged_save_state, checked_load_state
