"""The sequences that serve requests (slots) and the bounded queue in front of them.

The server decodes every slot's sequence in one llama.cpp context (``innsteer.llama.batching``):
each step decodes the next token of every running request at once, each row under its own
request's steering. A request holds its slot from the moment its steering is set until its
generation ends (streamed or not), so its steering cannot change under it; setting another steering
removes the slot's KV cache from the first position it alters, so no prefix computed under one
setting is reused under another.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable, Iterator
from typing import Any, Optional

from ..core.errors import SteerFileError
from ..llama.batching import BatchedContext
from ..llama.loading import load_llama
from .steers import INN, NO_STEERING, NamedSteer, Setting, SteerCatalog


def open_engine(
    model_path: str, catalog: SteerCatalog, *, model_id: str, n_seq: int, n_ctx: int, n_threads: Optional[int]
) -> tuple[BatchedContext, dict[str, list[int]]]:
    """The batched context of ``n_seq`` sequences with every steer of the catalog as entries: {name:
    its entry indices} (an INN steer is one entry, a signed one two, a control vector one per layer)."""
    threads = {} if n_threads is None else {"n_threads": n_threads, "n_threads_batch": n_threads}
    # the host's own context only names the context size in llama-cpp-python's errors: a small batch
    # keeps its compute buffers small
    host = load_llama(model_path, n_ctx=n_ctx, n_batch=32, verbose=False, **threads)
    try:
        engine = BatchedContext(host, n_seq)
    except BaseException:
        host.close()
        raise
    try:
        entries = {steer.name: _install(engine, steer, model_id) for steer in catalog.steers.values()}
    except BaseException:
        engine.close()
        host.close()
        raise
    return engine, entries


def _install(engine: BatchedContext, steer: NamedSteer, model_id: str) -> list[int]:
    try:
        if steer.kind == INN and steer.away_gguf is not None:  # each map runs at its sign of the alpha
            return [engine.add_steer(gguf, expect_model_id=model_id, sign=sign)
                    for gguf, sign in ((steer.gguf, 1), (steer.away_gguf, -1))]  # fmt: skip
        if steer.kind == INN:
            return [engine.add_steer(steer.gguf, expect_model_id=model_id)]
        architecture = engine.architecture
        if steer.model_hint and architecture and steer.model_hint != architecture:
            raise SteerFileError(f"it is a control vector for a '{steer.model_hint}' model, not '{architecture}'")
        return [engine.add_vector(vector, layer) for layer, vector in sorted(steer.directions.items())]
    except ValueError as error:  # another model's steer (SteerFileError), a layer it cannot steer
        raise SteerFileError(f"steer '{steer.name}' ({steer.source}) does not fit this model: {error}") from None


class Slot:
    """One sequence of the batched context, with the engine's entries for the catalog's steers.

    ``steer_prompt`` False steers INN steers from the last prompt token on (the reply, as
    ``innsteer generate``); control vectors always steer every position (as llama.cpp adds them).
    """

    def __init__(self, index: int, engine: BatchedContext, entries: dict[str, list[int]], *, steer_prompt: bool):
        self.index = index
        self.llm = engine.sequence(index)
        self.steering = self.llm.steering
        self.entries = entries
        self._inn = {name for name, indices in entries.items() if engine.kinds[indices[0]] == "steer"}
        self.setting: Setting = NO_STEERING
        self._alphas: dict[int, float] = {}  # the setting's alphas by engine entry
        self.stream: Optional[Iterator] = None
        self.cancel = threading.Event()  # set from the event loop: the running generation ends at its next token
        self.context_full = False  # the last generation reached the end of the context
        self._reply_only = not steer_prompt
        self._wrap_generate()

    def _wrap_generate(self) -> None:
        """The steering starts at the last prompt token, whose position (after the chat template and
        the BOS rules of llama-cpp-python) is known exactly only when ``generate`` receives the
        tokens: set it there, before the generation starts."""
        generate = self.llm.generate

        def generate_steering_the_reply(tokens, *args, **kwargs):
            start = max(0, len(tokens) - 1) if self._reply_only and any(n in self._inn for n, _ in self.setting) else 0
            self.steering.set(self._alphas, start)
            inner = generate(tokens, *args, **kwargs)
            self.context_full = False
            try:
                for count, token in enumerate(inner, 1):  # completions never send tokens into the generator
                    if self.cancel.is_set():
                        return
                    self.context_full = len(tokens) + count >= self.llm.n_ctx()
                    yield token
            finally:
                inner.close()

        self.llm.generate = generate_steering_the_reply

    def configure(self, setting: Setting) -> None:
        """Turn on exactly the steers of ``setting`` (applied when its generation starts)."""
        self.setting = setting
        self._alphas = {entry: alpha for name, alpha in setting for entry in self.entries[name]}

    def run(self, setting: Setting, call: Callable[..., Any], kwargs: dict) -> Any:
        """``call(llm, **kwargs)`` (a completion or chat completion) under ``setting``; ``cancel``
        ends it early."""
        self.cancel.clear()
        self.configure(setting)
        return self._reported(call(self.llm, **kwargs))

    def start_stream(self, setting: Setting, call: Callable[..., Iterator], kwargs: dict) -> Any:
        """Start a streamed ``call`` under ``setting`` (its chunks are ``self.stream``) and return its
        first chunk, so that a request that fails at once (a prompt longer than the context) fails
        before the response starts."""
        self.cancel.clear()
        self.configure(setting)
        self.stream = self._reporting(call(self.llm, stream=True, **kwargs))
        return next(self.stream)

    def _reported(self, result: dict) -> dict:
        """llama-cpp-python reports a reply that ended at the end of the context (even with the
        model's end of text in its last position) as "stop"; OpenAI's word for it is "length"."""
        for choice in result.get("choices", []):
            if choice.get("finish_reason") == "stop" and self.context_full:
                choice["finish_reason"] = "length"
        return result

    def _reporting(self, chunks: Iterator) -> Iterator:
        try:
            for chunk in chunks:
                yield self._reported(chunk)
        finally:
            chunks.close()

    def end_stream(self) -> None:
        """Close the stream, if any: a generation left suspended would hold the context's tokens.
        Never while a thread runs ``next(self.stream)`` (the pool's users wait for theirs)."""
        stream, self.stream = self.stream, None
        if stream is not None:
            stream.close()


class ServerBusy(Exception):
    """Every slot is busy and the queue is full."""


class SlotPool:
    """Slots handed to requests one at a time, with at most ``max_queue`` requests waiting.

    Used from the event loop only (no locks). A free slot whose steering already equals the
    request's is preferred: its KV cache may hold a reusable prefix.
    """

    def __init__(self, engine: BatchedContext, slots: list[Slot], max_queue: int):
        self.engine = engine
        self.slots = list(slots)
        self.max_queue = max_queue
        self._free: list[Slot] = list(slots)
        self._waiting: collections.deque[asyncio.Future] = collections.deque()

    @property
    def busy(self) -> int:
        return len(self.slots) - len(self._free)

    @property
    def queued(self) -> int:
        return sum(not waiter.done() for waiter in self._waiting)

    async def acquire(self, setting: Setting) -> Slot:
        if self._free and not self.queued:
            return self._take(setting)
        if self.queued >= self.max_queue:
            raise ServerBusy(
                f"the server is busy: {self.busy} request(s) running on {len(self.slots)} slot(s) and "
                f"{self.queued} queued (--queue {self.max_queue}); retry later"
            )
        waiter = asyncio.get_running_loop().create_future()
        self._waiting.append(waiter)
        try:
            return await waiter
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():  # handed a slot just as it was cancelled
                self.release(waiter.result())
            raise
        finally:
            if waiter in self._waiting:
                self._waiting.remove(waiter)

    def _take(self, setting: Setting) -> Slot:
        matching = [slot for slot in self._free if slot.setting == setting]
        slot = (matching or self._free)[0]
        self._free.remove(slot)
        return slot

    def release(self, slot: Slot) -> None:
        slot.end_stream()
        while self._waiting:
            waiter = self._waiting.popleft()
            if not waiter.done():
                waiter.set_result(slot)
                return
        self._free.append(slot)

    def close(self) -> None:
        """Stop the batched context and free the model (no request may be running)."""
        self.engine.close()
        self.engine.host.close()
