"""Steer quantized GGUF models in llama-cpp-python with innsteer's native hook.

    from innsteer.llama_cpp import SteeredLlama
    llm = SteeredLlama("model.gguf", steer="steer.gguf", alpha=4.0)
    llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=32)
    llm.steering.set_alpha(0.0)   # or .disable() / .enable(); the KV cache is reset for you

or ``steering = attach(llm, "steer.gguf", alpha=4.0)`` on an existing ``llama_cpp.Llama``.

The steer runs in C (csrc/llama_hook, built by setup.py when llama-cpp-python is installed) as
llama.cpp's eval callback: it rewrites ``l_out-L`` (decoder layer L's output) in place; no Python
runs per graph node. Stock llama.cpp control vectors (the linear baseline) load through
``llama_set_adapter_cvec``. This module is named like the ``llama_cpp`` package it wraps and uses
absolute imports only.
"""
from __future__ import annotations

import contextlib
import ctypes
import glob
import importlib.util
import os
from typing import Optional, Sequence, Union

import numpy as np

from innsteer.export import read_control_vector
from innsteer.steerer import SteerFileError

try:
    import llama_cpp
    from llama_cpp import _internals
except ImportError as _error:  # optional dependency
    raise ImportError(
        "innsteer.llama_cpp needs llama-cpp-python 0.3.36: `pip install 'innsteer[llama]'` "
        "(or `pip install llama-cpp-python==0.3.36`), then rebuild innsteer "
        "(`pip install --no-build-isolation -e .`) so its llama.cpp hook is compiled"
    ) from _error

__all__ = ["SteeredLlama", "attach", "LlamaSteering", "SteerGGUF", "SteerHookError", "behaviour_scores",
           "continuation_logprobs"]

_ERR_LEN = 1024
_lib = None


class SteerHookError(RuntimeError):
    """The native hook failed during a llama.cpp call (its logits must not be used)."""


def hook_library() -> ctypes.CDLL:
    """The compiled hook (innsteer_ext/_llama_hook*.so), loaded once with its C signatures."""
    global _lib
    if _lib is not None:
        return _lib
    spec = importlib.util.find_spec("innsteer_ext")  # locates the package without loading torch's extension
    dirs = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    candidates = [p for d in dirs for p in glob.glob(os.path.join(d, "_llama_hook*.so"))]
    if not candidates:
        raise ImportError(
            "innsteer's llama.cpp hook is not built (no innsteer_ext/_llama_hook*.so): it is compiled only "
            "when llama-cpp-python==0.3.36 is installed before innsteer. Install it, then rebuild innsteer "
            "with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)"
        )
    lib = ctypes.CDLL(candidates[0])
    c = ctypes
    steer_p, hook_p, err_t = c.c_void_p, c.c_void_p, c.c_char_p
    signatures = {
        "innsteer_steer_load_file": ([c.c_char_p, err_t, c.c_size_t], steer_p),
        "innsteer_steer_load_buffer": ([c.c_char_p, c.c_size_t, err_t, c.c_size_t], steer_p),
        "innsteer_steer_free": ([steer_p], None),
        "innsteer_steer_hidden_size": ([steer_p], c.c_int64),
        "innsteer_steer_layer": ([steer_p], c.c_int32),
        "innsteer_steer_alpha": ([steer_p], c.c_float),
        "innsteer_steer_num_couplings": ([steer_p], c.c_int64),
        "innsteer_steer_mlp_hidden": ([steer_p], c.c_int64),
        "innsteer_steer_bf16_weights": ([steer_p], c.c_bool),
        "innsteer_steer_meta": ([steer_p, c.c_char_p], c.c_char_p),
        "innsteer_steer_apply": ([steer_p, c.c_void_p, c.c_int64, c.c_float, c.c_int, err_t, c.c_size_t], c.c_int),
        "innsteer_hook_new": ([], hook_p),
        "innsteer_hook_free": ([hook_p], None),
        "innsteer_hook_add": ([hook_p, steer_p, c.c_int32, c.c_float, err_t, c.c_size_t], c.c_int),
        "innsteer_hook_set_alpha": ([hook_p, c.c_int, c.c_float], c.c_int),
        "innsteer_hook_set_enabled": ([hook_p, c.c_int, c.c_bool], c.c_int),
        "innsteer_hook_set_threads": ([hook_p, c.c_int], None),
        "innsteer_hook_applied_count": ([hook_p], c.c_int64),
        "innsteer_hook_apply_seconds": ([hook_p], c.c_double),
        "innsteer_hook_begin": ([hook_p, c.c_int64], None),
        "innsteer_hook_end": ([hook_p, err_t, c.c_size_t], c.c_int),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    _lib = lib
    return lib


class SteerGGUF:
    """A steer GGUF loaded and validated by the C loader (every size and index bounds-checked)."""

    def __init__(self, handle: int, source: str):
        self._lib = hook_library()
        self._handle = handle
        self.source = source

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> "SteerGGUF":
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no steer file at {path}")
        lib, err = hook_library(), ctypes.create_string_buffer(_ERR_LEN)
        handle = lib.innsteer_steer_load_file(os.fsencode(path), err, _ERR_LEN)
        if not handle:
            raise SteerFileError(f"{path}: {err.value.decode(errors='replace')}")
        return cls(handle, path)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> "SteerGGUF":
        lib, err = hook_library(), ctypes.create_string_buffer(_ERR_LEN)
        handle = lib.innsteer_steer_load_buffer(data, len(data), err, _ERR_LEN)
        if not handle:
            raise SteerFileError(f"{source}: {err.value.decode(errors='replace')}")
        return cls(handle, source)

    def close(self) -> None:
        if self._handle:
            self._lib.innsteer_steer_free(self._handle)
            self._handle = None

    def __del__(self):
        self.close()

    @property
    def handle(self) -> int:
        if not self._handle:
            raise ValueError(f"steer file {self.source} is closed")
        return self._handle

    hidden_size = property(lambda self: int(self._lib.innsteer_steer_hidden_size(self.handle)))
    layer = property(lambda self: int(self._lib.innsteer_steer_layer(self.handle)))
    alpha = property(lambda self: float(self._lib.innsteer_steer_alpha(self.handle)))
    num_couplings = property(lambda self: int(self._lib.innsteer_steer_num_couplings(self.handle)))
    mlp_hidden = property(lambda self: int(self._lib.innsteer_steer_mlp_hidden(self.handle)))
    bf16_weights = property(lambda self: bool(self._lib.innsteer_steer_bf16_weights(self.handle)))

    def meta(self, key: str) -> str:
        value = self._lib.innsteer_steer_meta(self.handle, key.encode())
        if value is None:
            raise KeyError(key)
        return value.decode(errors="replace")

    def apply(self, rows: np.ndarray, alpha: Optional[float] = None, n_threads: int = 1) -> np.ndarray:
        """What the hook does to l_out, on float32 rows [n, hidden_size]: returns the steered copy."""
        out = np.array(rows, dtype=np.float32, order="C", copy=True)
        if out.ndim != 2 or out.shape[1] != self.hidden_size:
            raise ValueError(f"rows must have shape [n, {self.hidden_size}], got {out.shape}")
        alpha = self.alpha if alpha is None else float(alpha)
        err = ctypes.create_string_buffer(_ERR_LEN)
        if self._lib.innsteer_steer_apply(self.handle, out.ctypes.data, out.shape[0], alpha, n_threads, err, _ERR_LEN):
            raise SteerHookError(err.value.decode(errors="replace"))
        return out


class LlamaSteering:
    """The steering installed in one ``llama_cpp.Llama`` (made by ``attach``).

    Entries (INN steers) and one optional control vector. Every change resets the Llama's KV
    cache, so no prefix computed under the old steering is reused.
    """

    def __init__(self, llm: "llama_cpp.Llama"):
        self._lib = hook_library()
        self.llm = llm
        self._hook = self._lib.innsteer_hook_new()
        if not self._hook:
            raise MemoryError("innsteer_hook_new failed")
        self._steers: list[SteerGGUF] = []  # the hook borrows these: keep them alive
        self._alphas: list[float] = []
        self.start_position = 0
        self._lib.innsteer_hook_set_threads(self._hook, int(llm.context_params.n_threads_batch))
        self.n_layer = int(llama_cpp.llama_model_n_layer(llm.model))
        self.n_embd = int(llama_cpp.llama_model_n_embd(llm.model))
        self.architecture = str(llm.metadata.get("general.architecture", ""))
        self._install()

    def _install(self) -> None:
        """Recreate the Llama's context with the hook as its eval callback (llama.cpp reads
        cb_eval only at context creation), and check the hook after every decode."""
        llm = self.llm
        params = llm.context_params
        self._callback = llama_cpp.ggml_backend_sched_eval_callback(
            ctypes.cast(self._lib.innsteer_hook_eval_callback, ctypes.c_void_p).value)
        params.cb_eval = self._callback
        params.cb_eval_user_data = ctypes.c_void_p(self._hook)
        new_ctx = _internals.LlamaContext(model=llm._model, params=params, verbose=llm.verbose)
        old_ctx, llm._ctx = llm._ctx, llm._stack.enter_context(contextlib.closing(new_ctx))
        old_ctx.close()
        if getattr(llm, "_lora_adapter", None) is not None:
            adapters = (llama_cpp.llama_adapter_lora_p_ctypes * 1)(llm._lora_adapter)
            scales = (ctypes.c_float * 1)(llm.lora_scale)
            if llama_cpp.llama_set_adapters_lora(llm._ctx.ctx, adapters, 1, scales):
                raise RuntimeError("failed to re-apply the LoRA adapter to the steered context")
        llm.reset()

        lib, hook, decode = self._lib, self._hook, new_ctx.decode

        def checked_decode(batch):
            # Llama's batches hold one sequence at consecutive positions: row i is position pos[0] + i.
            first_row = self.start_position - batch.batch.pos[0] if batch.batch.n_tokens > 0 else 0
            lib.innsteer_hook_begin(hook, max(0, first_row))
            decode(batch)
            err = ctypes.create_string_buffer(_ERR_LEN)
            if lib.innsteer_hook_end(hook, err, _ERR_LEN):
                llm.reset()  # the cache now holds unsteered or broken states
                raise SteerHookError(err.value.decode(errors="replace"))

        new_ctx.decode = checked_decode
        llm._stack.callback(self._free)  # when the Llama closes; nothing decodes after that

    def _free(self) -> None:
        if self._hook:
            self._lib.innsteer_hook_free(self._hook)
            self._hook = None

    def add(self, steer: Union[str, os.PathLike, SteerGGUF], alpha: Optional[float] = None,
            layer: Optional[int] = None, expect_model_id: Optional[str] = None) -> int:
        """Add a steer (a path or a loaded SteerGGUF); returns its entry index."""
        if not isinstance(steer, SteerGGUF):
            steer = SteerGGUF.load(steer)
        source = steer.source
        if steer.hidden_size != self.n_embd:
            raise SteerFileError(f"{source} was made for hidden size {steer.hidden_size} "
                                 f"({steer.meta('model_id') or 'unknown model'}), but this model has {self.n_embd}")
        hint = steer.meta("model_hint")
        if hint and self.architecture and hint != self.architecture:
            raise SteerFileError(f"{source} was made for a '{hint}' model, but this model is '{self.architecture}'")
        if expect_model_id and steer.meta("model_id") and steer.meta("model_id") != expect_model_id:
            raise SteerFileError(f"{source} was made for model '{steer.meta('model_id')}', not '{expect_model_id}'")
        layer = steer.layer if layer is None else int(layer)
        if not 0 <= layer < self.n_layer - 1:
            raise ValueError(f"cannot steer layer {layer} of a {self.n_layer}-layer model: layers 0..{self.n_layer - 2} "
                             "can be steered (the last layer's output holds only the output rows)")
        alpha = steer.alpha if alpha is None else float(alpha)
        err = ctypes.create_string_buffer(_ERR_LEN)
        entry = self._lib.innsteer_hook_add(self._hook, steer.handle, layer, alpha, err, _ERR_LEN)
        if entry < 0:
            raise ValueError(err.value.decode(errors="replace"))
        self._steers.append(steer)
        self._alphas.append(alpha)
        self.llm.reset()
        return entry

    def _entries(self, entry: Optional[int]) -> range:
        n = len(self._steers)
        if entry is None:
            return range(n)
        if not 0 <= entry < n:
            raise IndexError(f"no steer entry {entry} (have {n})")
        return range(entry, entry + 1)

    def set_alpha(self, alpha: float, entry: Optional[int] = None) -> None:
        """Set alpha of one entry (or all); takes effect at the next call, with a fresh KV cache."""
        alpha = float(alpha)
        if not np.isfinite(alpha):
            raise ValueError(f"alpha must be finite, got {alpha}")
        for i in self._entries(entry):
            self._lib.innsteer_hook_set_alpha(self._hook, i, alpha)
            self._alphas[i] = alpha
        self.llm.reset()

    @property
    def alphas(self) -> list[float]:
        """The current alpha of each entry."""
        return list(self._alphas)

    def enable(self, entry: Optional[int] = None) -> None:
        for i in self._entries(entry):
            self._lib.innsteer_hook_set_enabled(self._hook, i, True)
        self.llm.reset()

    def disable(self, entry: Optional[int] = None) -> None:
        for i in self._entries(entry):
            self._lib.innsteer_hook_set_enabled(self._hook, i, False)
        self.llm.reset()

    def steer_from(self, position: int) -> None:
        """Steer only tokens at positions >= ``position`` (0: all tokens, the default). With
        ``len(prompt_tokens) - 1`` the prompt is read unsteered and steering starts where the reply
        is predicted, like ``positions="after_prompt"`` in the PyTorch path. Not applied to
        control vectors (llama.cpp adds those at every position)."""
        if int(position) < 0:
            raise ValueError(f"position must be >= 0, got {position}")
        self.start_position = int(position)
        self.llm.reset()

    def set_threads(self, n_threads: int) -> None:
        self._lib.innsteer_hook_set_threads(self._hook, int(n_threads))

    @property
    def applied_count(self) -> int:
        """How many l_out tensors the hook has rewritten so far."""
        return int(self._lib.innsteer_hook_applied_count(self._hook))

    @property
    def apply_seconds(self) -> float:
        """Seconds the hook has spent rewriting l_out tensors (read, steer, write back) so far."""
        return float(self._lib.innsteer_hook_apply_seconds(self._hook))

    def set_control_vector(self, control_vector: Union[str, os.PathLike, dict], strength: float = 1.0) -> None:
        """Apply a stock llama.cpp control vector (a file, or {layer: vector}) scaled by ``strength``."""
        if isinstance(control_vector, dict):
            directions, source = {int(k): np.asarray(v, dtype=np.float32) for k, v in control_vector.items()}, "vector"
        else:
            directions, info = read_control_vector(control_vector)
            source = os.fspath(control_vector)
            hint = str(info.get("model_hint") or "")
            if hint and self.architecture and hint != self.architecture:
                raise SteerFileError(f"{source} is a control vector for a '{hint}' model, "
                                     f"but this model is '{self.architecture}'")
        for layer, vector in directions.items():
            if vector.shape != (self.n_embd,):
                raise SteerFileError(f"{source}: direction.{layer} has {vector.shape[0]} values, "
                                     f"but this model's hidden size is {self.n_embd}")
            if not 1 <= layer < self.n_layer:
                raise ValueError(f"{source}: layer {layer} cannot be steered by a control vector "
                                 f"(layers 1..{self.n_layer - 1})")
        # llama.cpp's layout: layer L's vector at offset n_embd * (L - 1).
        data = np.zeros((self.n_layer - 1) * self.n_embd, dtype=np.float32)
        for layer, vector in directions.items():
            data[(layer - 1) * self.n_embd: layer * self.n_embd] = vector * float(strength)
        self._cvec = data  # llama.cpp copies it, but keep it for inspection
        status = llama_cpp.llama_set_adapter_cvec(
            self.llm._ctx.ctx, data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), data.size, self.n_embd,
            min(directions), max(directions))
        if status:
            raise RuntimeError(f"llama_set_adapter_cvec failed ({status}) for {source}")
        self.llm.reset()

    def clear_control_vector(self) -> None:
        llama_cpp.llama_set_adapter_cvec(self.llm._ctx.ctx, None, 0, self.n_embd, -1, -1)
        self._cvec = None
        self.llm.reset()


def attach(llm: "llama_cpp.Llama", steer: Union[None, str, os.PathLike, SteerGGUF] = None,
           alpha: Optional[float] = None, *, layer: Optional[int] = None,
           control_vector: Union[None, str, os.PathLike, dict] = None, control_strength: float = 1.0,
           expect_model_id: Optional[str] = None) -> LlamaSteering:
    """Install innsteer's hook into ``llm`` (once; later calls add to it) and add ``steer``."""
    steering = getattr(llm, "steering", None)
    if not isinstance(steering, LlamaSteering):
        steering = LlamaSteering(llm)
        llm.steering = steering
    if steer is not None:
        steering.add(steer, alpha=alpha, layer=layer, expect_model_id=expect_model_id)
    if control_vector is not None:
        steering.set_control_vector(control_vector, control_strength)
    return steering


class SteeredLlama(llama_cpp.Llama):
    """A ``llama_cpp.Llama`` with innsteer's hook installed; ``.steering`` controls it.

    ``SteeredLlama(model_path, steer="steer.gguf", alpha=4.0, **llama_kwargs)``; ``alpha`` defaults to
    the file's. ``control_vector=`` loads a stock llama.cpp control vector too.
    """

    def __init__(self, model_path: str, steer: Union[None, str, os.PathLike, SteerGGUF] = None,
                 alpha: Optional[float] = None, *, layer: Optional[int] = None,
                 control_vector: Union[None, str, os.PathLike, dict] = None, control_strength: float = 1.0,
                 expect_model_id: Optional[str] = None, **llama_kwargs):
        llama_kwargs.setdefault("verbose", False)
        super().__init__(model_path, **llama_kwargs)
        self.steering = attach(self, steer, alpha, layer=layer, control_vector=control_vector,
                               control_strength=control_strength, expect_model_id=expect_model_id)


def continuation_logprobs(llm: "llama_cpp.Llama", tokenizer, prompts: Sequence[str],
                          continuations: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log-probs, number of tokens) of each continuation after its prompt, through llama.cpp.

    Mirrors ``innsteer.evaluate.continuation_logprobs``: each text is tokenized whole by the model's
    Hugging Face tokenizer (the same vocabulary as the GGUF) and, when ``llm`` is steered, steering
    acts from the last prompt token onward.
    """
    from innsteer.encoding import encode_spans

    steering = getattr(llm, "steering", None)
    old_start = steering.start_position if steering is not None else 0
    total, count = np.zeros(len(prompts)), np.zeros(len(prompts))
    try:
        for i, (prompt, continuation) in enumerate(zip(prompts, continuations)):
            batch = encode_spans(tokenizer, [prompt + continuation], [(len(prompt), len(prompt) + len(continuation))])
            ids = batch.input_ids[0].tolist()
            start, end = int(batch.span_start[0]), int(batch.span_end[0])
            if start < 1:
                raise ValueError("a continuation starts at the first token: it has no context to be scored from")
            if steering is not None:
                steering.steer_from(start - 1)
            llm.reset()
            llm.eval(ids[:start])
            for t in range(start, end):  # token t is predicted from the logits after t - 1
                logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1),
                                               shape=(llm.n_vocab(),)).astype(np.float64)
                top = logits.max()
                total[i] += logits[ids[t]] - top - np.log(np.exp(logits - top).sum())
                count[i] += 1
                if t + 1 < end:
                    llm.eval([ids[t]])
    finally:
        if steering is not None:
            steering.steer_from(old_start)
    return total, count


def behaviour_scores(llm: "llama_cpp.Llama", tokenizer, items, metric: str = "letter") -> np.ndarray:
    """p_match per A/B item through llama.cpp, as ``innsteer.evaluate.behaviour_scores`` computes it
    ('letter': p(matching letter) against p(non-matching); 'answer': mean per-token log-prob)."""
    from innsteer.data import format_prompt, reply_separator

    if metric not in ("letter", "answer"):
        raise ValueError(f"unknown metric '{metric}'; choose 'letter' or 'answer'")
    prompt = [format_prompt(tokenizer, item.question) + reply_separator(tokenizer) for item in items]
    if metric == "letter":
        conts = [f"({item.matching}" for item in items] + [f"({item.not_matching}" for item in items]
    else:
        conts = [item.matching_text for item in items] + [item.not_matching_text for item in items]
    total, count = continuation_logprobs(llm, tokenizer, prompt + prompt, conts)
    score = total if metric == "letter" else total / count
    n = len(items)
    return 1.0 / (1.0 + np.exp(-(score[:n] - score[n:])))
