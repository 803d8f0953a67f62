"""Steer quantized GGUF models in llama-cpp-python with innsteer's native hook.

    from innsteer.llama.steering import SteeredLlama
    llm = SteeredLlama("model.gguf", steer="steer.gguf", alpha=4.0)
    llm.create_chat_completion(messages=[{"role": "user", "content": "Hi"}], max_tokens=32)
    llm.steering.set_alpha(0.0)   # or .disable() / .enable(); the KV cache is trimmed for you

or ``steering = attach(llm, "steer.gguf", alpha=4.0)`` on an existing ``llama_cpp.Llama`` (built with
``innsteer.llama.loading.load_llama``, which also runs on CPUs where llama.cpp's AMX kernels crash).

The steer runs in C (csrc/llama_hook, built by setup.py when llama-cpp-python is installed) as
llama.cpp's eval callback: it rewrites ``l_out-L`` (decoder layer L's output) in place; no Python
runs per graph node. Stock llama.cpp control vectors (the linear baseline) load through
``llama_set_adapter_cvec``. How the ``Llama`` object is patched (its context, ``generate``, ``eval``,
saved states) is ``innsteer.llama.patches``: with ``batching`` (several sequences in one context,
what the server runs), ``grammar`` (the sampler's grammar step) and ``chat`` (its context and model
handles), the only code touching llama-cpp-python's private attributes.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import operator
import os
import threading
import uuid
from dataclasses import dataclass
from typing import Optional, Union

import numpy as np

from ..core.errors import ConfigError, SteerFileError
from .bindings import (
    ERR_LEN,
    INSTALL_HINT,
    MAX_THREADS,
    SteerGGUF,
    SteerHookError,
    float32_alpha,
    hook_library,
    signed_alpha,
    thread_count,
)
from .export import read_control_vector
from .grammar import guard_grammars
from .loading import weights_in_plain_cpu_buffers
from .patches import UNSTEERED, install_hook_context, serialize_evals, tag_saved_states, track_generations

try:
    import llama_cpp
except ImportError as _error:  # optional dependency
    raise ImportError(INSTALL_HINT) from _error

__all__ = ["SteeredLlama", "attach", "LlamaSteering", "SteerGGUF", "SteerHookError"]

_MAX_POSITION = 2**62  # steer_from's bound: position - batch start must fit the hook's int64
_INSTALLED = "_innsteer_steering"  # the LlamaSteering installed in a Llama (llm.steering may be reassigned)


def unsteered_until(state: tuple, n_tokens: int) -> int:
    """The positions a steering ``state`` (``LlamaSteering._state``) leaves unsteered: all of them
    without an active entry or control vector; before ``steer_from``'s position with entries only;
    none under a control vector (llama.cpp adds it at every position)."""
    alphas, start_position, cvec = state
    if cvec is not None:
        return 0
    return n_tokens if not any(alphas) else min(start_position, n_tokens)


@dataclass
class _Entry:
    """One steer installed in the hook (the hook's entry of the same index)."""

    steer: SteerGGUF
    layer: int
    alpha: float  # what the hook runs (0 where the entry's sign does not match the alpha set)
    enabled: bool = True
    sign: int = 0  # 1 / -1: steers only at alpha > 0 / < 0 (a signed steerer's maps); 0: both


class LlamaSteering:
    """The steering installed in one ``llama_cpp.Llama`` (made by ``attach``).

    Entries (INN steers) and one optional control vector. A change that alters the steering drops
    the Llama's KV cache, so no prefix computed under the old steering is reused; a call that
    changes nothing (the same alpha, enabling an enabled entry) leaves the cache alone. During a
    streamed generation the tokens kept so far are re-evaluated under the new steering at once, so
    the generation goes on from the same tokens as a fresh one would under the new setting.
    """

    def __init__(self, llm: llama_cpp.Llama):
        if getattr(llm, _INSTALLED, None) is not None:
            raise ConfigError("this Llama already has innsteer's hook installed: use attach(llm) or llm.steering")
        if llm._ctx is None or llm._ctx.ctx is None:
            raise ConfigError("this Llama was closed")
        self._lib = hook_library()
        guard_grammars()  # an unparsable grammar would crash a steered Llama's process
        self.llm = llm
        self._hook = self._lib.innsteer_hook_new()
        if not self._hook:
            raise MemoryError("innsteer_hook_new failed")
        self._steer_entries: list[_Entry] = []  # the hook's entries, by index
        self._cvec: Optional[np.ndarray] = None
        self._generations: list = []  # patches.Generation: the generations suspended between tokens
        # Evaluation and steering changes from several threads run one at a time (see patches.serialize_evals).
        self._lock = threading.RLock()
        self.start_position = 0
        self._identity = uuid.uuid4().hex  # names this steering in the states it saves
        n_threads = int(llm.context_params.n_threads_batch)
        self._lib.innsteer_hook_set_threads(self._hook, min(max(1, n_threads), MAX_THREADS))
        self.n_layer = int(llama_cpp.llama_model_n_layer(llm.model))
        self.n_embd = int(llama_cpp.llama_model_n_embd(llm.model))
        self.architecture = str(llm.metadata.get("general.architecture", ""))
        install_hook_context(self)
        track_generations(self)
        serialize_evals(self)
        tag_saved_states(self)
        setattr(llm, _INSTALLED, self)
        llm.steering = self

    def _signature(self):
        """The steering a KV cache was computed under: UNSTEERED, or this steering's settings."""
        alphas, start_position, cvec = self._state()
        if not any(alphas) and cvec is None:
            return UNSTEERED
        cvec_digest = None if cvec is None else hashlib.sha256(cvec).hexdigest()
        return self._identity, alphas, start_position, cvec_digest

    def _free(self) -> None:
        if self._hook:
            self._lib.innsteer_hook_free(self._hook)
            self._hook = None

    def _live_hook(self) -> int:
        if not self._hook:
            raise ConfigError("this Llama was closed: its steering can no longer be used")
        return self._hook

    def _state(self) -> tuple:
        """What decides the steered outputs; a call that leaves it equal changes nothing."""
        alphas = tuple(entry.alpha if entry.enabled else 0.0 for entry in self._steer_entries)
        cvec = None if self._cvec is None else self._cvec.tobytes()
        return alphas, self.start_position, cvec

    @contextlib.contextmanager
    def _change(self):
        """Around every change: refuse a closed Llama, then, if the steering really changed, drop
        the KV cache from the first position whose state it changes (the positions before every
        steered position, under both the old and the new steering, stay: a chat template's shared
        prefix is evaluated once), re-evaluating the dropped tokens of a generation in progress under
        the new steering (dropping alone would make it decode its next token at the wrong position)."""
        with self._lock:
            self._live_hook()
            before = self._state()
            try:
                yield
            finally:
                after = self._state()
                if after != before:
                    n_tokens = self.llm.n_tokens
                    keep = min(unsteered_until(before, n_tokens), unsteered_until(after, n_tokens))
                    # one token more is dropped: llama.cpp computes a batch of one token along another path
                    # than a longer batch (logits differ by ~0.6 on SmolLM2), so the first steered token is
                    # evaluated with the one before it, as a fresh prompt evaluates it
                    self._drop_cache(keep if keep >= n_tokens else keep - 1)

    def _drop_cache(self, keep: int = 0) -> None:
        """Remove the KV cache from position ``keep`` on (0: all of it)."""
        llm = self.llm
        if keep <= 0 or not llm._ctx.kv_cache_seq_rm(-1, keep, -1):
            keep = 0
        redo = llm.input_ids[keep : llm.n_tokens].tolist() if self._generations else []
        if keep == 0:
            llm.reset()
        else:
            llm.n_tokens = keep
            llm._requires_eval = True  # the last logits are not those of the kept prefix
        if not redo:
            return
        try:
            llm.eval(redo)
        except Exception as error:
            llm.reset()
            for generation in self._generations:
                generation.broken = (
                    f"the steering changed during this generation and re-evaluating its {len(redo)} tokens "
                    f"failed: {error}"
                )
            raise

    def add(
        self,
        steer: Union[str, os.PathLike, SteerGGUF],
        alpha: Optional[float] = None,
        layer: Optional[int] = None,
        expect_model_id: Optional[str] = None,
        sign: int = 0,
    ) -> int:
        """Add a steer (a path or a loaded SteerGGUF); returns its entry index. The hook keeps its
        own reference to the loaded steer: closing the SteerGGUF afterwards is safe. ``sign`` 1 / -1:
        the entry steers only at alphas of that sign (``add_signed`` adds both maps of a signed
        steerer so)."""
        hook = self._live_hook()
        if not isinstance(steer, SteerGGUF):
            steer = SteerGGUF.load(steer)
        layer = check_fits(steer, self.n_embd, self.n_layer, self.architecture, layer, expect_model_id)
        for entry, other in enumerate(self._steer_entries):
            if other.layer == layer and _same_steer(other.steer, steer):
                raise ConfigError(
                    f"{steer.source} already steers layer {layer} (entry {entry}): adding it again would "
                    "steer twice; use set_alpha to change its strength"
                )
        alpha = signed_alpha(steer.alpha if alpha is None else float32_alpha(alpha), sign)
        err = ctypes.create_string_buffer(ERR_LEN)
        with self._change():
            entry = self._lib.innsteer_hook_add(hook, steer.handle, layer, alpha, err, ERR_LEN)
            if entry < 0:
                raise ConfigError(err.value.decode(errors="replace"))
            self._steer_entries.append(_Entry(steer, layer, alpha, sign=sign))
        return entry

    def add_signed(
        self,
        toward: Union[str, os.PathLike, SteerGGUF],
        away: Union[str, os.PathLike, SteerGGUF],
        alpha: Optional[float] = None,
        expect_model_id: Optional[str] = None,
    ) -> tuple[int, int]:
        """Add a signed steerer's two maps (``for_llama``'s steer GGUFs of its toward and away
        sides) at their layer: ``set_alpha(a)`` then runs the toward map for a > 0 and the away map
        for a < 0. Returns their entry indices; ``alpha`` defaults to the toward file's."""
        loaded = [s if isinstance(s, SteerGGUF) else SteerGGUF.load(s) for s in (toward, away)]
        if loaded[0].layer != loaded[1].layer:
            raise ConfigError(f"a signed steerer's maps steer one layer; got {loaded[0].layer} and {loaded[1].layer}")
        alpha = loaded[0].alpha if alpha is None else alpha
        first = self.add(loaded[0], alpha, expect_model_id=expect_model_id, sign=1)
        return first, self.add(loaded[1], alpha, expect_model_id=expect_model_id, sign=-1)

    def _entries(self, entry: Optional[int]) -> range:
        n = len(self._steer_entries)
        if entry is None:
            return range(n)
        entry = operator.index(entry)
        if not 0 <= entry < n:
            raise IndexError(f"no steer entry {entry} (have {n})")
        return range(entry, entry + 1)

    def set_alpha(self, alpha: float, entry: Optional[int] = None) -> None:
        """Set alpha of one entry (or all); takes effect at the next decode. An entry that steers at
        one sign only (a signed steerer's map) is set to 0 for an alpha of the other sign."""
        alpha = float32_alpha(alpha)
        entries = self._entries(entry)
        with self._change():
            for i in entries:
                runs = signed_alpha(alpha, self._steer_entries[i].sign)
                if self._lib.innsteer_hook_set_alpha(self._hook, i, runs):
                    raise RuntimeError(f"the hook refused alpha {runs} for entry {i}")
                self._steer_entries[i].alpha = runs

    @property
    def alphas(self) -> list[float]:
        """The alpha each entry runs now."""
        return [entry.alpha for entry in self._steer_entries]

    def _set_enabled(self, entry: Optional[int], enabled: bool) -> None:
        entries = self._entries(entry)
        with self._change():
            for i in entries:
                if self._lib.innsteer_hook_set_enabled(self._hook, i, enabled):
                    raise RuntimeError(f"the hook refused to {'enable' if enabled else 'disable'} entry {i}")
                self._steer_entries[i].enabled = enabled

    def enable(self, entry: Optional[int] = None) -> None:
        self._set_enabled(entry, True)

    def disable(self, entry: Optional[int] = None) -> None:
        self._set_enabled(entry, False)

    def steer_from(self, position: int) -> None:
        """Steer only tokens at positions >= ``position`` (0: all tokens, the default). With
        ``len(prompt_tokens) - 1`` the prompt is read unsteered and steering starts where the reply
        is predicted, like ``positions="after_prompt"`` in the PyTorch path. Not applied to
        control vectors (llama.cpp adds those at every position)."""
        position = operator.index(position)
        if not 0 <= position <= _MAX_POSITION:
            raise ConfigError(f"position must be in 0..2**62, got {position}")
        with self._change():
            self.start_position = position

    def set_threads(self, n_threads: int) -> None:
        """Threads the hook's steer uses per decode (1..MAX_THREADS)."""
        n_threads = thread_count(n_threads)
        if self._lib.innsteer_hook_set_threads(self._live_hook(), n_threads):
            raise RuntimeError(f"the hook refused n_threads={n_threads}")

    def set_split_tile(self, split: bool) -> None:
        """Split a decode's flow (its one tile of rows) over the hook's threads (default off): 11-16 %
        less time in the hook on an idle machine, much more where other work holds the cores
        (bench/RESULTS.md, issue 30)."""
        if self._lib.innsteer_hook_set_split_tile(self._live_hook(), bool(split)):
            raise RuntimeError("the hook refused set_split_tile")

    @property
    def applied_count(self) -> int:
        """How many l_out tensors the hook has rewritten so far."""
        return int(self._lib.innsteer_hook_applied_count(self._live_hook()))

    @property
    def apply_seconds(self) -> float:
        """Seconds the hook has spent rewriting l_out tensors (read, steer, write back) so far."""
        return float(self._lib.innsteer_hook_apply_seconds(self._live_hook()))

    def set_control_vector(self, control_vector: Union[str, os.PathLike, dict], strength: float = 1.0) -> None:
        """Apply a stock llama.cpp control vector (a file, or {layer: vector}) scaled by ``strength``.
        It needs at least one layer's vector (an empty one is an error: ``clear_control_vector()``
        removes the control vector), and every value, scaled, must be a finite float32."""
        self._live_hook()
        if isinstance(control_vector, dict):
            directions, source = {}, "vector"
            for key, value in control_vector.items():
                if isinstance(key, bool) or not isinstance(key, (int, np.integer)):
                    raise TypeError(f"control vector layers must be integers, got {key!r}")
                directions[int(key)] = np.asarray(value, dtype=np.float32)
        else:
            directions, info = read_control_vector(control_vector)
            source = os.fspath(control_vector)
            hint = str(info.get("model_hint") or "")
            if hint and self.architecture and hint != self.architecture:
                raise SteerFileError(
                    f"{source} is a control vector for a '{hint}' model, but this model is '{self.architecture}'"
                )
        if not directions:
            raise ConfigError(
                f"{source}: a control vector needs at least one layer's vector "
                "(clear_control_vector() removes the control vector)"
            )
        strength = float(strength)
        for layer, vector in directions.items():
            if vector.shape != (self.n_embd,):
                raise SteerFileError(
                    f"{source}: direction.{layer} has shape {vector.shape}, "
                    f"but this model's hidden size is {self.n_embd}"
                )
            if not 1 <= layer < self.n_layer:
                raise ConfigError(
                    f"{source}: layer {layer} cannot be steered by a control vector (layers 1..{self.n_layer - 1})"
                )
            with np.errstate(over="ignore", invalid="ignore"):
                finite = np.isfinite(vector * np.float32(strength)).all() and np.isfinite(strength)
            if not finite:
                raise ConfigError(
                    f"{source}: direction.{layer} times strength {strength} holds NaN or Inf (in float32)"
                )
        # llama.cpp's layout: layer L's vector at offset n_embd * (L - 1).
        data = np.zeros((self.n_layer - 1) * self.n_embd, dtype=np.float32)
        for layer, vector in directions.items():
            data[(layer - 1) * self.n_embd : layer * self.n_embd] = vector * np.float32(strength)
        with self._change():
            status = llama_cpp.llama_set_adapter_cvec(
                self.llm._ctx.ctx,
                data.ctypes.data_as(ctypes.POINTER(ctypes.c_float)),
                data.size,
                self.n_embd,
                min(directions),
                max(directions),
            )
            if status:
                raise RuntimeError(f"llama_set_adapter_cvec failed ({status}) for {source}")
            self._cvec = data  # llama.cpp copies it; kept to see what is applied

    def clear_control_vector(self) -> None:
        with self._change():
            if self._cvec is not None:
                llama_cpp.llama_set_adapter_cvec(self.llm._ctx.ctx, None, 0, self.n_embd, -1, -1)
                self._cvec = None


def check_fits(
    steer: SteerGGUF, n_embd: int, n_layer: int, architecture: str, layer: Optional[int], expect_model_id: Optional[str]
) -> int:
    """The layer ``steer`` steers in a model of these sizes (``layer``, or the file's), after checking
    that it was made for such a model."""
    source = steer.source
    if steer.hidden_size != n_embd:
        raise SteerFileError(
            f"{source} was made for hidden size {steer.hidden_size} "
            f"({steer.meta('model_id') or 'unknown model'}), but this model has {n_embd}"
        )
    hint = steer.meta("model_hint")
    if hint and architecture and hint != architecture:
        raise SteerFileError(f"{source} was made for a '{hint}' model, but this model is '{architecture}'")
    if expect_model_id and steer.meta("model_id") and steer.meta("model_id") != expect_model_id:
        raise SteerFileError(f"{source} was made for model '{steer.meta('model_id')}', not '{expect_model_id}'")
    layer = steer.layer if layer is None else operator.index(layer)
    if not 0 <= layer < n_layer - 1:
        raise ConfigError(
            f"cannot steer layer {layer} of a {n_layer}-layer model: layers 0..{n_layer - 2} "
            "can be steered (the last layer's output holds only the output rows)"
        )
    return layer


def _same_steer(a: SteerGGUF, b: SteerGGUF) -> bool:
    """One loaded steer, or the same file loaded twice."""
    if a is b:
        return True
    return os.path.isfile(a.source) and os.path.isfile(b.source) and os.path.samefile(a.source, b.source)


def attach(
    llm: llama_cpp.Llama,
    steer: Union[None, str, os.PathLike, SteerGGUF] = None,
    alpha: Optional[float] = None,
    *,
    layer: Optional[int] = None,
    control_vector: Union[None, str, os.PathLike, dict] = None,
    control_strength: float = 1.0,
    expect_model_id: Optional[str] = None,
) -> LlamaSteering:
    """Install innsteer's hook into ``llm`` (once; later calls add to it) and add ``steer``."""
    steering = getattr(llm, _INSTALLED, None)
    if steering is None:
        steering = LlamaSteering(llm)
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

    def __init__(
        self,
        model_path: str,
        steer: Union[None, str, os.PathLike, SteerGGUF] = None,
        alpha: Optional[float] = None,
        *,
        layer: Optional[int] = None,
        control_vector: Union[None, str, os.PathLike, dict] = None,
        control_strength: float = 1.0,
        expect_model_id: Optional[str] = None,
        **llama_kwargs,
    ):
        llama_kwargs.setdefault("verbose", False)
        with weights_in_plain_cpu_buffers():
            super().__init__(model_path, **llama_kwargs)
        self.steering = attach(
            self,
            steer,
            alpha,
            layer=layer,
            control_vector=control_vector,
            control_strength=control_strength,
            expect_model_id=expect_model_id,
        )
