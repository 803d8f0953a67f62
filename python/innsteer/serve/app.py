"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the slots.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (OpenAI's request and response
schemas, ``"stream": true`` as server-sent events), ``GET /v1/models`` (the model, its steers and the
default steering) and ``GET /health``. The request bodies are validated with llama-cpp-python's own
server models, and the responses and chunks are what ``Llama.create_completion`` /
``create_chat_completion`` return, plus a ``steering`` field naming what was applied. Errors are
OpenAI-style ``{"error": {"message", "type", "param", "code"}}`` objects.
"""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Optional

import llama_cpp
import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..core.errors import InnsteerError
from .slots import ServerBusy, Slot, SlotPool
from .steers import NamedSteer, Setting, SteerCatalog, SteeringError, describe_setting

# What llama-cpp-python's server also leaves out of the call: handled here (n, min_tokens, logit_bias_type)
# or not the Llama's business (user); steering is ours.
NOT_FORWARDED = {"n", "best_of", "logit_bias_type", "user", "min_tokens", "steering", "stream"}
MESSAGE_ROLES = ("system", "user", "assistant", "tool", "function")  # llama-cpp-python's message kinds


class ApiError(Exception):
    """A request the server answers with ``status`` and an OpenAI-style error object."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: Optional[str] = None,
        code: Optional[str] = None,
        kind: str = "invalid_request_error",
        headers: Optional[dict[str, str]] = None,
    ):
        super().__init__(message)
        self.status = status
        self.body = {"error": {"message": message, "type": kind, "param": param, "code": code}}
        self.headers = headers


class _Strict:
    """Request fields that are numbers must be finite (Python's JSON reader accepts NaN and Infinity)."""

    model_config = pydantic.ConfigDict(allow_inf_nan=False)


class CompletionRequest(_Strict, CreateCompletionRequest):
    steering: Any = None


class ChatCompletionRequest(_Strict, CreateChatCompletionRequest):
    steering: Any = None


class InnsteerServer:
    """The loaded model (``len(pool.slots)`` contexts), its steers and the default steering."""

    def __init__(self, pool: SlotPool, catalog: SteerCatalog, default_setting: Setting, model_id: str, n_ctx: int):
        self.pool = pool
        self.catalog = catalog
        self.default_setting = default_setting
        self.model_id = model_id
        self.n_ctx = n_ctx
        self.created = int(time.time())

    def close(self) -> None:
        for slot in self.pool.slots:
            slot.close()

    def models(self) -> dict[str, Any]:
        steers = [steer.describe() for steer in self.catalog.steers.values()]
        entry = {
            "id": self.model_id,
            "object": "model",
            "created": self.created,
            "owned_by": "innsteer",
            "context_length": self.n_ctx,
            "steers": steers,
            "default_steering": describe_setting(self.default_setting),
        }
        return {"object": "list", "data": [entry]}

    def health(self) -> dict[str, Any]:
        return {"status": "ok", "slots": len(self.pool.slots), "busy": self.pool.busy, "queued": self.pool.queued}

    async def complete(self, request: Request, chat: bool) -> Any:
        body = await _json_object(request)
        model = ChatCompletionRequest if chat else CompletionRequest
        if chat and isinstance(body.get("messages"), list):
            body["messages"] = [_text_message(message, i) for i, message in enumerate(body["messages"])]
        try:
            parsed = model.model_validate(body)
        except pydantic.ValidationError as error:
            first = error.errors()[0]
            where = _field(first["loc"])
            raise ApiError(400, f"{where}: {first['msg']}", param=where) from None
        try:
            setting = self.catalog.parse(body["steering"]) if "steering" in body else self.default_setting
        except SteeringError as error:
            raise ApiError(400, str(error), param=error.param, code=error.code) from None
        kwargs = self._call_arguments(parsed, chat)
        call = llama_cpp.Llama.create_chat_completion if chat else llama_cpp.Llama.create_completion
        prompt = "messages" if chat else "prompt"
        headers = {"X-Innsteer-Steering": _header(setting)}
        try:
            slot = await self.pool.acquire(setting)
        except ServerBusy as error:
            raise ApiError(
                503, str(error), code="server_busy", kind="server_error", headers={"Retry-After": "1"}
            ) from None
        if parsed.stream:
            try:
                first = await run_in_threadpool(slot.start_stream, setting, call, kwargs)
            except BaseException as error:
                self.pool.release(slot)
                raise _api_error(error, prompt) from error
            return _SlotStream(self.pool, slot, first, headers)
        try:
            result = await run_in_threadpool(slot.run, setting, call, kwargs)
        except Exception as error:
            raise _api_error(error, prompt) from error
        finally:
            self.pool.release(slot)
        return JSONResponse({**result, "steering": describe_setting(setting)}, headers=headers)

    def _call_arguments(self, parsed: pydantic.BaseModel, chat: bool) -> dict[str, Any]:
        """The keyword arguments of the Llama call, as llama-cpp-python's server derives them, after the
        checks that keep an argument from crashing llama.cpp (a grammar it cannot parse) or from
        failing unexplained in the middle of a generation (a logit bias for a token that does not exist)."""
        if parsed.n != 1:
            raise ApiError(400, f"n must be 1 (this server returns one choice per request), got {parsed.n}", param="n")
        if chat:
            if not parsed.messages:
                raise ApiError(400, "messages: a chat completion needs at least one message", param="messages")
        else:
            if parsed.best_of not in (None, 1):
                raise ApiError(400, f"best_of must be 1, got {parsed.best_of}", param="best_of")
            if isinstance(parsed.prompt, list):
                if len(parsed.prompt) != 1:
                    raise ApiError(400, "prompt: give exactly one prompt per request", param="prompt")
                parsed.prompt = parsed.prompt[0]
            if not parsed.prompt:  # absent or empty: llama-cpp-python asserts on an empty prompt
                raise ApiError(400, "prompt: a completion needs a non-empty prompt", param="prompt")
        kwargs = parsed.model_dump(exclude=NOT_FORWARDED)
        kwargs["model"] = self.model_id
        llm = self.pool.slots[0].llm
        if parsed.logit_bias is not None:
            bias = parsed.logit_bias
            if parsed.logit_bias_type == "tokens":
                bias = {
                    str(token): score
                    for text, score in bias.items()
                    for token in llm.tokenize(text.encode(), add_bos=False, special=True)
                }
            kwargs["logit_bias"] = _token_bias(bias, llm.n_vocab())
        if parsed.grammar is not None:
            kwargs["grammar"] = _grammar(parsed.grammar, llm)
        if parsed.min_tokens > 0:
            kwargs["logits_processor"] = llama_cpp.LogitsProcessorList(
                [llama_cpp.MinTokensLogitsProcessor(parsed.min_tokens, llm.token_eos())]
            )
        return kwargs


def _field(loc: tuple) -> str:
    """A validation error's location as the request spells it: messages[0].role. pydantic also names
    the member of a union it tried (ChatCompletionRequestUserMessage): left out."""
    where = ""
    for part in loc:
        if isinstance(part, int):
            where += f"[{part}]"
        elif not part[:1].isupper():
            where += f".{part}" if where else part
    return where or "body"


def _text_message(message: Any, index: int) -> Any:
    """``message`` with its content as one string: the chat templates take text only, so a list of
    text parts (as newer OpenAI clients send) is joined; any other part is refused. The role is
    checked here too: pydantic would report it once per kind of message."""
    if not isinstance(message, dict):
        return message
    if message.get("role") not in MESSAGE_ROLES:
        where = f"messages[{index}].role"
        raise ApiError(
            400, f"{where} must be one of {', '.join(MESSAGE_ROLES)}, got {message.get('role')!r}", param=where
        )
    content = message.get("content")
    if not isinstance(content, list):
        return message
    texts = [part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None for part in content]
    if any(not isinstance(text, str) for text in texts):
        where = f"messages[{index}].content"
        raise ApiError(400, f"{where}: this server takes text only (a string or a list of text parts)", param=where)
    return {**message, "content": "".join(texts)}


def _token_bias(bias: dict[str, float], n_vocab: int) -> dict[int, float]:
    checked = {}
    for key, score in bias.items():
        try:
            token = int(key)
        except ValueError:
            raise ApiError(400, f"logit_bias: '{key}' is not a token id", param="logit_bias") from None
        if not 0 <= token < n_vocab:
            raise ApiError(
                400, f"logit_bias: token {token} is not in the vocabulary (0..{n_vocab - 1})", param="logit_bias"
            )
        checked[token] = score
    return checked


def _grammar(text: str, llm: llama_cpp.Llama) -> llama_cpp.LlamaGrammar:
    """A GBNF grammar llama.cpp can parse: llama-cpp-python hands an unparsable one to the sampler
    chain as a null sampler, which crashes the process."""
    try:
        encoded = text.encode()
    except UnicodeEncodeError:
        raise ApiError(400, "grammar: not valid UTF-8 text", param="grammar") from None
    sampler = llama_cpp.llama_sampler_init_grammar(llama_cpp.llama_model_get_vocab(llm.model), encoded, b"root")
    if not sampler:
        raise ApiError(400, "grammar: llama.cpp cannot parse it as a GBNF grammar with a 'root' rule", param="grammar")
    llama_cpp.llama_sampler_free(sampler)
    return llama_cpp.LlamaGrammar.from_string(text, verbose=False)


class _SlotStream(StreamingResponse):
    """The slot's stream as server-sent events; it holds the slot until the generation ends or the
    client goes away (then the pool closes the generation between two tokens)."""

    def __init__(self, pool: SlotPool, slot: Slot, first: Any, headers: dict[str, str]):
        self._pool, self._slot = pool, slot
        super().__init__(self._events(slot.stream, first), media_type="text/event-stream", headers=headers)

    async def _events(self, chunks: Iterator, first: Any) -> AsyncIterator[str]:
        yield _event(first)
        try:
            while (chunk := await run_in_threadpool(next, chunks, None)) is not None:
                yield _event(chunk)
        except Exception as error:  # the status line is sent: report it in the stream, as OpenAI does
            yield _event(_api_error(error).body)
            return
        yield "data: [DONE]\n\n"

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:  # also when the stream never started: the status line could not be sent
            self._pool.release(self._slot)


def _event(data: Any) -> str:
    return f"data: {json.dumps(data)}\n\n"


def _header(setting: Setting) -> str:
    return ",".join(f"{name}={alpha:g}" for name, alpha in setting) or "none"


def _api_error(error: BaseException, prompt: str = "messages") -> ApiError:
    """The answer to an exception raised while serving; ``prompt`` names the request's prompt field."""
    if isinstance(error, ApiError):
        return error
    message = str(error)
    if isinstance(error, ValueError) and "exceed context window" in message:  # llama-cpp-python's check
        return ApiError(
            400, f"the prompt does not fit the context: {message}", param=prompt, code="context_length_exceeded"
        )
    if isinstance(error, InnsteerError):
        return ApiError(500, message, kind="server_error", code="steering_failed")
    if isinstance(error, (ValueError, TypeError, KeyError)):  # llama-cpp-python's checks of the arguments
        return ApiError(400, message)
    return ApiError(500, f"{type(error).__name__}: {message}", kind="server_error")


async def _json_object(request: Request) -> dict[str, Any]:
    raw = await request.body()
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def create_app(server: InnsteerServer) -> FastAPI:
    app = FastAPI(title="innsteer", summary="OpenAI-compatible completions with per-request nonlinear steering")

    @app.exception_handler(ApiError)
    async def api_error(_request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body, status_code=error.status, headers=error.headers)

    @app.exception_handler(HTTPException)
    async def http_error(_request: Request, error: HTTPException) -> JSONResponse:
        body = {"error": {"message": str(error.detail), "type": "invalid_request_error", "param": None, "code": None}}
        return JSONResponse(body, status_code=error.status_code, headers=error.headers)

    @app.exception_handler(Exception)
    async def unexpected_error(_request: Request, error: Exception) -> JSONResponse:
        return JSONResponse(_api_error(error).body, status_code=500)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.complete(request, chat=False)

    @app.get("/v1/models")
    async def models():
        return server.models()

    @app.get("/health")
    async def health():
        return server.health()

    return app


def load_server(
    model_path: str,
    steers: list[tuple[str, str]],
    *,
    model_id: str,
    default_steering: Any = None,
    parallel: int = 1,
    max_queue: int = 16,
    n_ctx: int = 2048,
    n_threads: Optional[int] = None,
    steer_prompt: bool = False,
) -> InnsteerServer:
    """Load the steers (``(name, file)`` pairs) and ``parallel`` contexts of the model; every steer
    is checked against the model here, so a steer file for another model fails at start-up."""
    import tempfile

    from ..core.errors import ConfigError
    from .steers import load_steer

    if parallel < 1 or max_queue < 0 or n_ctx < 1:
        raise ConfigError(f"need parallel >= 1, queue >= 0 and n_ctx >= 1, got {parallel}, {max_queue}, {n_ctx}")
    with tempfile.TemporaryDirectory(prefix="innsteer-serve-") as workdir:  # exported steers, read at load
        named: list[NamedSteer] = []
        for name, path in steers:
            try:
                named.append(load_steer(name, path, model_id=model_id, workdir=workdir))
            except InnsteerError as error:
                raise type(error)(f"steer '{name}': {error}") from error
        catalog = SteerCatalog(named)
    try:
        default = catalog.parse(default_steering, where="default steering")
    except SteeringError as error:
        raise ConfigError(str(error)) from None
    slots: list[Slot] = []
    try:
        for index in range(parallel):
            slots.append(
                Slot(
                    index,
                    model_path,
                    catalog,
                    model_id=model_id,
                    n_ctx=n_ctx,
                    n_threads=n_threads,
                    steer_prompt=steer_prompt,
                )
            )
            trained = llama_cpp.llama_model_n_ctx_train(slots[0].llm.model)
            if n_ctx > trained:
                raise ConfigError(f"context size {n_ctx} exceeds the model's training context of {trained} tokens")
    except BaseException:
        for slot in slots:
            slot.close()
        raise
    return InnsteerServer(SlotPool(slots, max_queue), catalog, default, model_id, n_ctx)


def http_server(server: InnsteerServer, *, log_level: str = "info"):
    """The uvicorn server for ``server``: ``.run(sockets=[sock])`` serves until Ctrl-C or SIGTERM (or
    ``should_exit`` is set from another thread)."""
    import uvicorn

    return uvicorn.Server(uvicorn.Config(create_app(server), log_level=log_level, timeout_graceful_shutdown=5))
