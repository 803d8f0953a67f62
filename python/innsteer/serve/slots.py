"""Contexts that serve requests (slots) and the bounded queue in front of them.

Each slot is a ``SteeredLlama`` holding every INN steer of the catalog (disabled until a request
turns it on). A request holds its slot from the moment its steering is set until its generation
ends (streamed or not), so its steering cannot change under it; setting another steering drops the
slot's KV cache (``LlamaSteering``), so no prefix computed under one setting is reused under another.
"""

from __future__ import annotations

import asyncio
import collections
import threading
from collections.abc import Callable, Iterator
from typing import Any, Optional

import numpy as np

from ..core.errors import SteerFileError
from ..llama.steering import SteeredLlama
from .steers import CONTROL_VECTOR, INN, NO_STEERING, NamedSteer, Setting, SteerCatalog


class Slot:
    """One llama.cpp context with the catalog's steers installed.

    ``steer_prompt`` False steers INN steers from the last prompt token on (the reply, as
    ``innsteer generate``); control vectors always steer every position (llama.cpp adds them so).
    """

    def __init__(
        self,
        index: int,
        model_path: str,
        catalog: SteerCatalog,
        *,
        model_id: str,
        n_ctx: int,
        n_threads: Optional[int],
        steer_prompt: bool,
    ):
        self.index = index
        threads = {} if n_threads is None else {"n_threads": n_threads, "n_threads_batch": n_threads}
        self.llm = SteeredLlama(model_path, n_ctx=n_ctx, **threads)
        self.steering = self.llm.steering
        self.catalog = catalog
        self.entries: dict[str, int] = {}
        for steer in catalog.steers.values():
            try:
                self._install(steer, model_id)
            except ValueError as error:  # another model's steer (SteerFileError), a layer it cannot steer
                self.llm.close()
                raise SteerFileError(
                    f"steer '{steer.name}' ({steer.source}) does not fit this model: {error}"
                ) from None
        self.setting: Setting = NO_STEERING
        self.stream: Optional[Iterator] = None
        self.cancel = threading.Event()  # set from the event loop: the running generation ends at its next token
        self.context_full = False  # the last generation reached the end of the context
        self._reply_only = not steer_prompt
        self._wrap_generate()

    def _install(self, steer: NamedSteer, model_id: str) -> None:
        if steer.kind == INN:
            self.entries[steer.name] = self.steering.add(steer.gguf, expect_model_id=model_id)
            self.steering.disable(self.entries[steer.name])
        else:  # checks the layers, hidden size and architecture now, not at the first request
            architecture = self.steering.architecture
            if steer.model_hint and architecture and steer.model_hint != architecture:
                raise SteerFileError(f"it is a control vector for a '{steer.model_hint}' model, not '{architecture}'")
            self.steering.set_control_vector(steer.directions, 1.0)
            self.steering.clear_control_vector()

    def _wrap_generate(self) -> None:
        """``steer_from`` needs the prompt's length, known exactly (after the chat template and the
        BOS rules of llama-cpp-python) only when ``generate`` receives the tokens: set it there,
        before the generation starts."""
        generate = self.llm.generate

        def generate_steering_the_reply(tokens, *args, **kwargs):
            if self._reply_only and any(name in self.entries for name, _ in self.setting):
                self.steering.steer_from(max(0, len(tokens) - 1))
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
        """Turn on exactly the steers of ``setting`` (a change drops the KV cache)."""
        alphas = dict(setting)
        for name, entry in self.entries.items():
            if name in alphas:
                self.steering.set_alpha(alphas[name], entry)
                self.steering.enable(entry)
            else:
                self.steering.disable(entry)
        vectors: dict[int, np.ndarray] = {}
        for name, alpha in setting:
            steer = self.catalog[name]
            if steer.kind == CONTROL_VECTOR:
                for layer, direction in steer.directions.items():
                    scaled = direction * np.float32(alpha)
                    vectors[layer] = scaled if layer not in vectors else vectors[layer] + scaled
        if vectors:
            self.steering.set_control_vector(vectors, 1.0)
        else:
            self.steering.clear_control_vector()
        self.setting = setting

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

    def close(self) -> None:
        self.llm.close()


class ServerBusy(Exception):
    """Every slot is busy and the queue is full."""


class SlotPool:
    """Slots handed to requests one at a time, with at most ``max_queue`` requests waiting.

    Used from the event loop only (no locks). A free slot whose steering already equals the
    request's is preferred: its KV cache may hold a reusable prefix.
    """

    def __init__(self, slots: list[Slot], max_queue: int):
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
