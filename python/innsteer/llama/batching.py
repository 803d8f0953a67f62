"""Several sequences decoded together in one llama.cpp context, each under its own steering.

    engine = BatchedContext(load_llama(path, n_ctx=2048), n_seq=4)
    inn = engine.add_steer(SteerGGUF.load("steer.gguf"))
    llm = engine.sequence(0)                        # a llama_cpp.Llama that decodes as sequence 0
    llm.steering.set({inn: 4.0}, start=n_prompt - 1)
    llm.create_chat_completion(...)                 # from any thread; one thread per sequence

Each sequence is a ``llama_cpp.Llama`` of its own (its tokens, sampler and generation state, so
llama-cpp-python's completions, chat templates, grammars and stop strings work unchanged) whose
``eval`` hands its tokens to the engine instead of decoding them: the engine's thread gathers what
every sequence has to decode into one ``llama_batch`` per step (a sequence that starts or comes
back joins at the next step), decodes it, and hands each sequence the logits of its last token.
The hook (csrc/llama_hook) steers each row of the batch with its own sequence's alphas
(``innsteer_hook_begin_rows``); control vectors are hook entries too, since llama.cpp's own is one
per context.

A sequence's reply does not depend on the others in its batch, and equals its reply in a
``SteeredLlama`` of the same options, token for token (tests/test_batching.py): each sequence has
its own stream of KV cells, laid out as in a context of its own (in one unified cache, cells freed
by one sequence are refilled by another, and attention, which sums over cells in their order,
rounds differently), and every sequence in a step has the same number of rows, which llama.cpp
then keeps in the batch's order, as the per-row alphas need.
"""

from __future__ import annotations

import contextlib
import ctypes
import threading
import time
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from ..core.errors import ConfigError
from .bindings import (
    ERR_LEN,
    INSTALL_HINT,
    NonFiniteLogitsError,
    SteerGGUF,
    SteerHookError,
    float32_alpha,
    hook_library,
    signed_alpha,
)
from .grammar import guard_grammars
from .patches import eval_callback
from .steering import check_fits, unsteered_until

try:
    import llama_cpp
    from llama_cpp import _internals
except ImportError as _error:  # optional dependency
    raise ImportError(INSTALL_HINT) from _error

__all__ = ["BatchedContext", "SequenceSteering"]

BATCH_TOKENS = 512  # rows per decode step (a longer prompt is decoded over several steps)
# How long a step waits for the sequences of the previous step to hand in their next token: they are
# sampling it (well under a millisecond), or a stream's reader is slow, which this bounds.
JOIN_WAIT_S = 0.004
_TOKEN_DATA = np.dtype([("id", np.int32), ("logit", np.float32), ("p", np.float32)], align=True)


def sample_from_logits(sampler, logits: np.ndarray) -> int:
    """``llama_sampler_sample`` on logits held here: it reads them from the context, whose next batch
    (another sequence's) overwrites them. Applies the chain, then accepts the token, as it does."""
    n_vocab = logits.shape[0]
    data = np.zeros(n_vocab, dtype=_TOKEN_DATA)
    data["id"] = np.arange(n_vocab, dtype=np.int32)
    data["logit"] = logits
    candidates = llama_cpp.llama_token_data_array(
        data=data.ctypes.data_as(ctypes.POINTER(llama_cpp.llama_token_data)),
        size=n_vocab,
        selected=-1,
        sorted=False,
    )
    llama_cpp.llama_sampler_apply(sampler.sampler, ctypes.byref(candidates))
    if not 0 <= candidates.selected < candidates.size:
        raise RuntimeError("the sampler chain selected no token (every token was filtered out)")
    token = int(candidates.data[candidates.selected].id)
    llama_cpp.llama_sampler_accept(sampler.sampler, token)
    return token


@dataclass
class _Entry:
    kind: str  # "steer" (INN: from `start` on) or "vector" (control vector: every position)
    layer: int
    source: object = field(repr=False)  # the SteerGGUF or vector, kept alive with the hook
    sign: int = 0  # 1 / -1: steers only at alpha > 0 / < 0 (a signed steerer's maps); 0: both


@dataclass
class _Request:
    """One ``eval`` of a sequence: ``tokens`` from position ``n_past`` on, under ``alphas``."""

    seq: int
    tokens: list
    n_past: int
    alphas: np.ndarray  # per entry; INN entries from `start` on
    start: int
    taken: int = 0  # tokens decoded so far (a long prompt takes several steps)
    logits: Optional[np.ndarray] = None
    error: Optional[BaseException] = None
    done: threading.Event = field(default_factory=threading.Event)


class SequenceSteering:
    """The steering of one sequence: an alpha per engine entry (absent: off) and the first position
    INN steers steer (control vectors steer every position). A change removes the sequence's KV
    cache from the first position it alters, as ``LlamaSteering`` does (one token earlier: see there)."""

    def __init__(self, engine: BatchedContext, llm: llama_cpp.Llama):
        self._engine, self._llm = engine, llm
        self.alphas: dict[int, float] = {}
        self.start = 0

    def _state(self) -> tuple:
        """``LlamaSteering._state``'s form, for ``unsteered_until``."""
        kinds = self._engine.kinds
        inn = tuple(sorted((e, a) for e, a in self.alphas.items() if kinds[e] == "steer" and a))
        vectors = tuple(sorted((e, a) for e, a in self.alphas.items() if kinds[e] == "vector" and a))
        return inn, self.start, (vectors or None)

    def set(self, alphas: dict[int, float], start: int = 0) -> None:
        """Steer with ``alphas`` ({entry: alpha}) from position ``start`` on."""
        n = len(self._engine.kinds)
        for entry in alphas:
            if not 0 <= entry < n:
                raise IndexError(f"no entry {entry} (the engine has {n})")
        if not 0 <= start <= 2**62:
            raise ConfigError(f"start must be in 0..2**62, got {start}")
        signs = self._engine.signs
        new = {int(e): signed_alpha(float32_alpha(a), signs[int(e)]) for e, a in alphas.items()}
        before = self._state()
        self.alphas, self.start = new, int(start)
        after = self._state()
        llm = self._llm
        keep = min(unsteered_until(before, llm.n_tokens), unsteered_until(after, llm.n_tokens))
        if after != before and keep < llm.n_tokens:  # (one token earlier: see LlamaSteering._change)
            keep = max(0, keep - 1)
            llm._ctx.kv_cache_seq_rm(-1, keep, -1)
            llm.n_tokens = keep
            llm._requires_eval = True

    @property
    def applied_count(self) -> int:
        """How many l_out tensors the engine's hook has rewritten so far (for every sequence)."""
        return self._engine.applied_count

    def row_alphas(self, n_entries: int) -> np.ndarray:
        alphas = np.zeros(n_entries, dtype=np.float32)
        for entry, alpha in self.alphas.items():
            alphas[entry] = alpha
        return alphas


class _SequenceContext:
    """What a sequence's Llama calls on its ``_ctx``: cache removals act on its own sequence; its
    last logits are the ones the engine handed it. ``ctx`` is the host Llama's own context (whose
    size is a sequence's: llama-cpp-python names it in its 'exceed context window' error)."""

    def __init__(self, engine: BatchedContext, seq: int, host_ctx):
        self._engine, self.seq, self._host = engine, seq, host_ctx
        self.logits: Optional[np.ndarray] = None

    @property
    def ctx(self):
        return self._host.ctx

    def n_ctx(self) -> int:
        return self._engine.n_ctx

    def kv_cache_seq_rm(self, seq_id: int, p0: int, p1: int) -> bool:
        if seq_id not in (-1, self.seq):
            raise ConfigError(f"sequence {self.seq} cannot remove the cache of sequence {seq_id}")
        return self._engine.remove(self.seq, p0, p1)

    def kv_cache_clear(self) -> None:
        self._engine.remove(self.seq, 0, -1)

    def reset_timings(self) -> None:  # llama-cpp-python's verbose timings: the context's, not a sequence's
        pass

    def print_timings(self) -> None:
        pass


class BatchedContext:
    """``n_seq`` sequences of up to ``host.n_ctx()`` tokens each, decoded together (see the module).

    ``host`` is a loaded ``llama_cpp.Llama`` (``load_llama``) with the model, tokenizer and chat
    format; its own context is not used for decoding. Add every entry (``add_steer``,
    ``add_vector``) before the first decode. ``close()`` stops the engine and frees the context; the
    caller closes the host.
    """

    def __init__(self, host: llama_cpp.Llama, n_seq: int, *, n_threads: Optional[int] = None):
        if host._logits_all:
            raise ConfigError("a batched context returns the last token's logits only (logits_all=False)")
        if not 1 <= n_seq <= int(llama_cpp.llama_max_parallel_sequences()):
            raise ConfigError(f"n_seq must be in 1..{llama_cpp.llama_max_parallel_sequences()}, got {n_seq}")
        self._lib = hook_library()
        guard_grammars()  # an unparsable grammar would crash the process
        self._hook = self._lib.innsteer_hook_new()
        if not self._hook:
            raise MemoryError("innsteer_hook_new failed")
        self.host, self.n_seq, self.n_ctx = host, n_seq, host.n_ctx()
        self.n_embd = int(llama_cpp.llama_model_n_embd(host.model))
        self.n_layer = int(llama_cpp.llama_model_n_layer(host.model))
        self.architecture = str(host.metadata.get("general.architecture", ""))
        self._n_vocab = host.n_vocab()
        threads = int(n_threads or host.context_params.n_threads)
        self._lib.innsteer_hook_set_threads(self._hook, max(1, min(threads, 256)))
        params = llama_cpp.llama_context_default_params()
        params.n_ctx = n_seq * self.n_ctx
        params.n_batch = params.n_ubatch = BATCH_TOKENS
        params.n_seq_max = n_seq
        params.kv_unified = False  # a stream of cells per sequence (see the module's notes)
        params.flash_attn_type = host.context_params.flash_attn_type
        params.n_threads = params.n_threads_batch = threads
        self._callback = eval_callback(self._lib)
        params.cb_eval = self._callback
        params.cb_eval_user_data = ctypes.c_void_p(self._hook)
        self._ctx = _internals.LlamaContext(model=host._model, params=params, verbose=False)
        self._memory = llama_cpp.llama_get_memory(self._ctx.ctx)
        self._batch = llama_cpp.llama_batch_init(BATCH_TOKENS, 0, 1)
        self.kinds: list[str] = []
        self.signs: list[int] = []  # each entry's sign (``add_steer``)
        self._entries: list[_Entry] = []
        self._cond = threading.Condition()
        self._decoding = threading.Lock()  # held by a decode and by every other change of the cache
        self._pending: dict[int, _Request] = {}
        self._generating: set[int] = set()  # sequences inside a generation
        self._last_step: set[int] = set()
        self._prompt_turn = False  # whether the last step was a longer eval's
        self.steps = 0  # decode steps so far, and the sequences they decoded (their mean width)
        self.sequences_decoded = 0
        self._closed = False
        self._sequences: dict[int, llama_cpp.Llama] = {}
        self._thread = threading.Thread(target=self._run, name="innsteer-batch", daemon=True)
        self._thread.start()

    # -- entries -------------------------------------------------------------------------------
    def _add(self, entry: _Entry, index: int, err) -> int:
        if index < 0:
            raise ConfigError(err.value.decode(errors="replace"))
        self._entries.append(entry)
        self.kinds.append(entry.kind)
        self.signs.append(entry.sign)
        return index

    def add_steer(
        self, steer: SteerGGUF, layer: Optional[int] = None, expect_model_id: Optional[str] = None, sign: int = 0
    ) -> int:
        """An INN steer at ``layer`` (the file's by default); its entry index. ``sign`` 1 / -1: it
        steers only at alphas of that sign (a signed steerer's two maps are two such entries, given
        the same alpha; ``innsteer.llama.bindings.signed_alpha``)."""
        signed_alpha(0.0, sign)  # checks the sign
        layer = check_fits(steer, self.n_embd, self.n_layer, self.architecture, layer, expect_model_id)
        err = ctypes.create_string_buffer(ERR_LEN)
        with self._cond:
            index = self._lib.innsteer_hook_add(self._hook, steer.handle, layer, 0.0, err, ERR_LEN)
            return self._add(_Entry("steer", layer, steer, sign), index, err)

    def add_vector(self, vector: np.ndarray, layer: int) -> int:
        """A control vector's direction for ``layer`` (llama.cpp's numbering: 1..n_layer-1), added
        times the sequence's alpha at every position; its entry index."""
        values = np.ascontiguousarray(vector, dtype=np.float32)
        if values.shape != (self.n_embd,):
            raise ConfigError(
                f"direction.{layer} has shape {values.shape}, but this model's hidden size is {self.n_embd}"
            )
        if not 1 <= layer < self.n_layer:
            raise ConfigError(f"layer {layer} cannot be steered by a control vector (layers 1..{self.n_layer - 1})")
        err = ctypes.create_string_buffer(ERR_LEN)
        with self._cond:
            index = self._lib.innsteer_hook_add_vector(
                self._hook, values.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), values.size, int(layer), 0.0,
                err, ERR_LEN,
            )  # fmt: skip
            return self._add(_Entry("vector", int(layer), values), index, err)

    @property
    def applied_count(self) -> int:
        """How many l_out tensors the hook has rewritten so far."""
        return int(self._lib.innsteer_hook_applied_count(self._hook))

    # -- sequences -----------------------------------------------------------------------------
    def sequence(self, seq: int) -> llama_cpp.Llama:
        """The ``llama_cpp.Llama`` that decodes as sequence ``seq`` (one per sequence; its
        ``.steering`` is a ``SequenceSteering``). Use each from one thread at a time."""
        if not 0 <= seq < self.n_seq:
            raise IndexError(f"no sequence {seq} (have {self.n_seq})")
        if seq in self._sequences:
            return self._sequences[seq]
        host = self.host
        llm = object.__new__(type(host))  # the host's attributes, with its own generation state
        llm.__dict__.update(host.__dict__)
        llm._stack = contextlib.ExitStack()  # the host owns the model and context: closing a sequence frees nothing
        llm._ctx = _SequenceContext(self, seq, host._ctx)
        llm.input_ids = np.zeros(self.n_ctx, dtype=np.intc)
        llm.scores = np.zeros((1, self._n_vocab), dtype=np.single)
        llm.n_tokens, llm._requires_eval, llm._sampler, llm.cache = 0, True, None, None
        llm.steering = SequenceSteering(self, llm)
        engine = self

        def evaluate(tokens):
            engine._eval(llm, seq, list(tokens))

        def sample(idx=None, **options):
            if idx is not None and idx != llm.n_tokens - 1:
                raise ConfigError("a batched sequence keeps the logits of its last token only")
            sampler = llm._sampler or llm._init_sampler(**options)
            return sample_from_logits(sampler, llm._ctx.logits)

        generate = llm.generate

        def generate_in_batches(*args, **kwargs):
            with engine._generation(seq):
                yield from generate(*args, **kwargs)

        def refuse_states(*_args, **_kwargs):
            raise ConfigError("a batched sequence's state lives in a shared context: it cannot be saved or loaded")

        llm.eval, llm.sample, llm.generate = evaluate, sample, generate_in_batches
        llm.save_state = llm.load_state = refuse_states
        self._sequences[seq] = llm
        return llm

    @contextlib.contextmanager
    def _generation(self, seq: int):
        """While a sequence generates, a step waits (briefly) for its next token before decoding."""
        with self._cond:
            self._generating.add(seq)
        try:
            yield
        finally:
            with self._cond:
                self._generating.discard(seq)
                self._cond.notify_all()

    def remove(self, seq: int, p0: int, p1: int) -> bool:
        """Remove sequence ``seq``'s cache cells in positions [p0, p1) (p1 < 0: to the end); waits
        for a decode in progress, which allocates cells in the same cache."""
        with self._decoding:
            return bool(llama_cpp.llama_memory_seq_rm(self._memory, seq, p0, p1))

    def _eval(self, llm, seq: int, tokens: list) -> None:
        """Decode ``tokens`` of sequence ``seq`` in the engine's next steps (blocking); as ``Llama.eval``."""
        if self._closed:
            raise ConfigError("this batched context was closed")
        if not tokens:
            return
        if llm.n_tokens + len(tokens) > self.n_ctx:
            raise ValueError(f"{llm.n_tokens + len(tokens)} tokens exceed context window of {self.n_ctx}")
        steering = llm.steering
        request = _Request(seq, tokens, llm.n_tokens, steering.row_alphas(len(self.kinds)), steering.start)
        with self._cond:
            self._pending[seq] = request
            self._cond.notify_all()
        request.done.wait()
        if request.error is not None:
            llm.reset()
            raise request.error
        llm.input_ids[request.n_past : request.n_past + len(tokens)] = tokens
        llm.n_tokens = request.n_past + len(tokens)
        llm._ctx.logits = request.logits
        llm._requires_eval = False

    # -- the engine's thread -------------------------------------------------------------------
    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._closed:
                    self._cond.wait()
                if self._closed:
                    for request in list(self._pending.values()):
                        self._finish(request, ConfigError("this batched context was closed"))
                    return
                deadline = time.monotonic() + JOIN_WAIT_S
                while not self._closed:  # the sequences of the last step that still generate: let them join
                    missing = (self._last_step & self._generating) - self._pending.keys()
                    left = deadline - time.monotonic()
                    if not missing or left <= 0:
                        break
                    self._cond.wait(left)
                requests = self._next_step()
            try:
                self._step(requests)
            except Exception as error:  # the engine must outlive one bad step: its requests fail, not hang
                with self._cond:
                    for request in requests:
                        if self._pending.get(request.seq) is request:
                            self._finish(request, error)

    def _next_step(self) -> list[_Request]:
        """The requests of the next step: every sequence that decodes one token, or, every other step
        while there are any, the next chunk of one longer eval (a prompt). Every sequence of a step
        then has the same number of rows, which llama.cpp puts in one ubatch in the batch's order
        (with a stream per sequence it splits a batch into equal shares per sequence)."""
        requests = [self._pending[seq] for seq in sorted(self._pending)]
        singles = [r for r in requests if len(r.tokens) - r.taken == 1]
        longer = [r for r in requests if len(r.tokens) - r.taken > 1]
        self._prompt_turn = bool(longer) and (not singles or not self._prompt_turn)
        return longer[:1] if self._prompt_turn else singles

    def _step(self, requests: list[_Request]) -> None:
        """Decode the next tokens of ``requests`` (up to BATCH_TOKENS rows) as one batch."""
        batch, n_entries = self._batch, len(self.kinds)
        vectors = np.array([kind == "vector" for kind in self.kinds], dtype=bool)
        token = np.ctypeslib.as_array(batch.token, shape=(BATCH_TOKENS,))
        pos = np.ctypeslib.as_array(batch.pos, shape=(BATCH_TOKENS,))
        n_seq_id = np.ctypeslib.as_array(batch.n_seq_id, shape=(BATCH_TOKENS,))
        wants_logits = np.ctypeslib.as_array(batch.logits, shape=(BATCH_TOKENS,))
        row_alphas = np.zeros((BATCH_TOKENS, n_entries), dtype=np.float32)
        rows, last_rows, taken = 0, {}, {}
        for request in requests:
            if request.taken == 0:  # what the sequence held from here on is stale (Llama.eval does the same)
                self.remove(request.seq, request.n_past, -1)
            n = min(len(request.tokens) - request.taken, BATCH_TOKENS - rows)
            if n <= 0:
                break
            chunk = slice(rows, rows + n)
            positions = request.n_past + np.arange(request.taken, request.taken + n)
            token[chunk] = request.tokens[request.taken : request.taken + n]
            pos[chunk] = positions
            n_seq_id[chunk] = 1
            for row in range(rows, rows + n):
                batch.seq_id[row][0] = request.seq
            wants_logits[chunk] = 0
            if request.taken + n == len(request.tokens):
                wants_logits[rows + n - 1] = 1
            steered = vectors[None, :] | (positions >= request.start)[:, None]
            row_alphas[chunk] = np.where(steered, request.alphas[None, :], 0.0)
            rows += n
            taken[request.seq] = n
            last_rows[request.seq] = rows - 1
        batch.n_tokens = rows
        row_alphas = np.ascontiguousarray(row_alphas[:rows])
        err = ctypes.create_string_buffer(ERR_LEN)
        error: Optional[BaseException] = None
        if self._lib.innsteer_hook_begin_rows(
            self._hook, row_alphas.ctypes.data_as(ctypes.POINTER(ctypes.c_float)), rows, n_entries, err, ERR_LEN
        ):
            error = SteerHookError(err.value.decode(errors="replace"))
        else:
            try:
                with self._decoding:
                    status = llama_cpp.llama_decode(self._ctx.ctx, batch)
            finally:
                failed = self._lib.innsteer_hook_end(self._hook, err, ERR_LEN)
            if failed:
                error = SteerHookError(err.value.decode(errors="replace"))
            elif status != 0:
                error = RuntimeError(f"llama_decode failed ({status}) on a batch of {rows} tokens")
        with self._cond:
            self._last_step = set(taken)
            self.steps += 1
            self.sequences_decoded += len(taken)
            for request in requests:
                if request.seq not in taken:
                    continue
                if error is not None:
                    self._finish(request, error)
                    continue
                request.taken += taken[request.seq]
                if request.taken < len(request.tokens):
                    continue
                pointer = llama_cpp.llama_get_logits_ith(self._ctx.ctx, last_rows[request.seq])
                logits = np.ctypeslib.as_array(pointer, shape=(self._n_vocab,)).copy()
                if not np.isfinite(logits).all():
                    self._finish(request, NonFiniteLogitsError())
                    continue
                request.logits = logits
                self._finish(request, None)

    def _finish(self, request: _Request, error: Optional[BaseException]) -> None:
        """Hand ``request`` back (the caller holds the lock); a failed one leaves no cache behind."""
        if error is not None:
            self.remove(request.seq, 0, -1)
            request.error = error
        del self._pending[request.seq]
        request.done.set()

    def close(self) -> None:
        """Stop the engine (a pending eval fails) and free the context and hook."""
        with self._cond:
            if self._closed:
                return
            self._closed = True
            self._cond.notify_all()
        self._thread.join()
        llama_cpp.llama_batch_free(self._batch)
        self._ctx.close()
        self._lib.innsteer_hook_free(self._hook)
        self._hook = None
