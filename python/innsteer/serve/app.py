"""The OpenAI-compatible HTTP server (FastAPI + uvicorn) in front of the slots.

Routes: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (OpenAI's request and response
schemas, ``"stream": true`` as server-sent events), ``GET /v1/models`` (the model, its steers and the
default steering) and ``GET /health``. The request bodies are validated with llama-cpp-python's own
server models, and the responses and chunks are what ``Llama.create_completion`` /
``create_chat_completion`` return, plus a ``steering`` field naming what was applied. Errors are
OpenAI-style ``{"error": {"message", "type", "param", "code"}}`` objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any, Optional

import jinja2
import llama_cpp
import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from ..core.errors import InnsteerError
from ..llama.bindings import NonFiniteLogitsError
from ..llama.grammar import GrammarError, check_parses
from .auth import ApiKeyMiddleware
from .slots import ServerBusy, Slot, SlotPool, open_engine
from .steers import NamedSteer, Setting, SteerCatalog, SteeringError, describe_setting

# What llama-cpp-python's server also leaves out of the call: handled here (n, min_tokens, logit_bias_type)
# or not the Llama's business (user); steering is ours.
NOT_FORWARDED = {"n", "best_of", "logit_bias_type", "user", "min_tokens", "steering", "stream"}
MESSAGE_ROLES = ("system", "user", "assistant", "tool", "function")  # llama-cpp-python's message kinds
# Bounds on what a request may hand to the tokenizer, the JSON reader and the sampler.
DEFAULT_MAX_BODY_BYTES = 4 * 2**20
MAX_JSON_DEPTH = 64  # OpenAI request bodies nest a few levels; a JSON schema or tool a few more
MAX_STOP = 16  # stop strings, each searched in the reply after every token
MAX_STOP_BYTES = 1024
MAX_LOGIT_BIAS = 1024  # entries (OpenAI takes 300)
MAX_BIAS_TEXT_BYTES = 1024  # a logit_bias_type "tokens" key is tokenized
GRAMMAR_FIELDS = ("response_format", "tools", "functions")  # llama-cpp-python derives grammars from these
DISCONNECTED = 499  # the client went away (nginx's code): nobody reads this answer


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
    # llama-cpp-python's chat request bounds nothing here (its completion request does: ge=0); a
    # negative count would run to the end of the context, as 0 and absent do on purpose
    max_tokens: Optional[int] = pydantic.Field(default=None, ge=0)


class InnsteerServer:
    """The loaded model (``len(pool.slots)`` sequences), its steers and the default steering."""

    def __init__(self, pool: SlotPool, catalog: SteerCatalog, default_setting: Setting, model_id: str, n_ctx: int):
        self.pool = pool
        self.catalog = catalog
        self.default_setting = default_setting
        self.model_id = model_id
        self.n_ctx = n_ctx
        self.created = int(time.time())
        llm = pool.slots[0].llm
        # The longest text one token stands for: a prompt of more bytes than n_ctx times this is
        # longer than the context whatever it says, known without tokenizing it.
        self.max_token_bytes = max(1, max(len(llm.detokenize([token], special=True)) for token in range(llm.n_vocab())))

    def close(self) -> None:
        self.pool.close()

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

    async def complete(self, request: Request, chat: bool, max_body_bytes: int) -> Any:
        raw = await _read_body(request, max_body_bytes)
        # Parsing, validation, tokenizing a logit bias, parsing a grammar: off the event loop.
        parsed, setting, kwargs = await run_in_threadpool(self.prepare, raw, chat)
        call = llama_cpp.Llama.create_chat_completion if chat else llama_cpp.Llama.create_completion
        # the fields an error names: the prompt's, and those a derived grammar comes from
        prompt = "messages" if chat else "prompt"
        grammar_from = next((f for f in GRAMMAR_FIELDS if getattr(parsed, f, None) is not None), None)
        headers = {"X-Innsteer-Steering": _header(setting)}
        gone = asyncio.ensure_future(_disconnected(request))
        try:
            acquiring = asyncio.ensure_future(self.pool.acquire(setting))
            await asyncio.wait({acquiring, gone}, return_when=asyncio.FIRST_COMPLETED)
            if not acquiring.done():  # left while queued: give up the place (acquire hands on a slot it got)
                acquiring.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await acquiring
                raise ApiError(DISCONNECTED, "the client disconnected while queued", code="client_closed")
            try:
                slot = acquiring.result()
            except ServerBusy as error:
                raise ApiError(
                    503, str(error), code="server_busy", kind="server_error", headers={"Retry-After": "1"}
                ) from None
            if parsed.stream:
                gone.cancel()  # the streaming response watches the connection itself
                try:
                    first = await run_in_threadpool(slot.start_stream, setting, call, kwargs)
                except BaseException as error:
                    self.pool.release(slot)
                    raise _api_error(error, prompt, grammar_from) from error
                return _SlotStream(self.pool, slot, first, headers)
            running = asyncio.ensure_future(run_in_threadpool(slot.run, setting, call, kwargs))
            try:
                await asyncio.wait({running, gone}, return_when=asyncio.FIRST_COMPLETED)
                if not running.done():  # the client went away: end the generation at its next token
                    slot.cancel.set()
                result = await running  # the thread ends within a token: only then is the slot free
            except Exception as error:
                raise _api_error(error, prompt, grammar_from) from error
            finally:
                self.pool.release(slot)
        finally:
            gone.cancel()
        return JSONResponse({**result, "steering": describe_setting(setting)}, headers=headers)

    def prepare(self, raw: bytes, chat: bool) -> tuple[pydantic.BaseModel, Setting, dict[str, Any]]:
        """The request body's parsed form, its steering and the Llama call's keyword arguments."""
        body = _json_object(raw)
        model = ChatCompletionRequest if chat else CompletionRequest
        if chat and isinstance(body.get("messages"), list):
            body["messages"] = [_text_message(message, i) for i, message in enumerate(body["messages"])]
        # OpenAI's clients send null for a field they leave unset; llama-cpp-python's request models
        # let null through for fields whose default is a number (presence_penalty, n, ...), and a
        # None reaching llama.cpp's sampler fails in ctypes. null means the field's default here.
        for name, spec in model.model_fields.items():
            if name in body and body[name] is None and spec.default is not None:
                del body[name]
        prompt = body.get("prompt")
        if not chat and not (prompt is None or isinstance(prompt, str) or _strings(prompt)):
            # else pydantic names each member of the union it tried (prompt.str, prompt.list[str])
            raise ApiError(400, "prompt must be a string (token ids are not taken here)", param="prompt")
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
        return parsed, setting, self._call_arguments(parsed, chat)

    def _call_arguments(self, parsed: pydantic.BaseModel, chat: bool) -> dict[str, Any]:
        """The keyword arguments of the Llama call, as llama-cpp-python's server derives them, after the
        checks that keep an argument from crashing llama.cpp (a grammar it cannot parse), from running
        unbounded (a prompt longer than the context, many stop strings) or from failing unexplained in
        the middle of a generation (a logit bias for a token that does not exist)."""
        if parsed.n != 1:
            raise ApiError(400, f"n must be 1 (this server returns one choice per request), got {parsed.n}", param="n")
        if chat:
            if not parsed.messages:
                raise ApiError(400, "messages: a chat completion needs at least one message", param="messages")
            texts = [message.get("content") for message in parsed.model_dump(include={"messages"})["messages"]]
        else:
            if parsed.best_of not in (None, 1):
                raise ApiError(400, f"best_of must be 1, got {parsed.best_of}", param="best_of")
            if isinstance(parsed.prompt, list):
                if len(parsed.prompt) != 1:
                    raise ApiError(400, "prompt: give exactly one prompt per request", param="prompt")
                parsed.prompt = parsed.prompt[0]
            if not parsed.prompt:  # absent or empty: llama-cpp-python asserts on an empty prompt
                raise ApiError(400, "prompt: a completion needs a non-empty prompt", param="prompt")
            texts = [parsed.prompt]
            if parsed.logprobs is not None:  # llama-cpp-python needs logits_all contexts for them
                raise ApiError(400, "logprobs: this server does not return log probabilities", param="logprobs")
        self._check_prompt_size(texts, "messages" if chat else "prompt")
        stops = [parsed.stop] if isinstance(parsed.stop, str) else list(parsed.stop or [])
        if len(stops) > MAX_STOP or any(len(text.encode()) > MAX_STOP_BYTES for text in stops):
            raise ApiError(
                400, f"stop: at most {MAX_STOP} strings of at most {MAX_STOP_BYTES} bytes each", param="stop"
            )
        kwargs = parsed.model_dump(exclude=NOT_FORWARDED)
        kwargs["model"] = self.model_id
        llm = self.pool.slots[0].llm
        if parsed.logit_bias is not None:
            kwargs["logit_bias"] = _token_bias(_bias_by_token(parsed, llm), llm.n_vocab())
        if parsed.grammar is not None:
            try:
                check_parses(llama_cpp.llama_model_get_vocab(llm.model), parsed.grammar)
            except GrammarError as error:
                raise ApiError(400, str(error), param="grammar") from None
            kwargs["grammar"] = llama_cpp.LlamaGrammar.from_string(parsed.grammar, verbose=False)
        if parsed.min_tokens > 0:
            kwargs["logits_processor"] = llama_cpp.LogitsProcessorList(
                [llama_cpp.MinTokensLogitsProcessor(parsed.min_tokens, llm.token_eos())]
            )
        return kwargs

    def _check_prompt_size(self, texts: list[Any], param: str) -> None:
        """Refuse a prompt whose bytes alone prove it longer than the context, before tokenizing it."""
        size = sum(len(text.strip().encode()) for text in texts if isinstance(text, str))
        if size > self.n_ctx * self.max_token_bytes:
            raise ApiError(
                400,
                f"the prompt does not fit the context: its {size} bytes are at least {size // self.max_token_bytes} "
                f"tokens (no token of this model stands for more than {self.max_token_bytes} bytes), more than the "
                f"context window of {self.n_ctx}",
                param=param,
                code="context_length_exceeded",
            )


def _strings(value: Any) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


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
    if content is None and message["role"] == "assistant":  # OpenAI's form when it called a tool
        return {**message, "content": ""}
    if content is None:
        where = f"messages[{index}].content"
        raise ApiError(400, f"{where} must be a string or a list of text parts, got null", param=where)
    if not isinstance(content, list):
        return message
    texts = [part.get("text") if isinstance(part, dict) and part.get("type") == "text" else None for part in content]
    if any(not isinstance(text, str) for text in texts):
        where = f"messages[{index}].content"
        raise ApiError(400, f"{where}: this server takes text only (a string or a list of text parts)", param=where)
    return {**message, "content": "".join(texts)}


def _bias_by_token(parsed: pydantic.BaseModel, llm: llama_cpp.Llama) -> dict[str, float]:
    """The request's logit_bias keyed by token id (a ``logit_bias_type`` "tokens" key is a text: each of
    its tokens gets the bias)."""
    bias = parsed.logit_bias
    if len(bias) > MAX_LOGIT_BIAS:
        raise ApiError(400, f"logit_bias: at most {MAX_LOGIT_BIAS} entries, got {len(bias)}", param="logit_bias")
    if parsed.logit_bias_type != "tokens":
        return bias
    by_token = {}
    for text, score in bias.items():
        encoded = text.encode()
        if len(encoded) > MAX_BIAS_TEXT_BYTES:
            raise ApiError(400, f"logit_bias: a text key of more than {MAX_BIAS_TEXT_BYTES} bytes", param="logit_bias")
        by_token.update({str(token): score for token in llm.tokenize(encoded, add_bos=False, special=True)})
    return by_token


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


def _api_error(error: BaseException, prompt: str = "messages", grammar_from: Optional[str] = None) -> ApiError:
    """The answer to an exception raised while serving; ``prompt`` names the request's prompt field,
    ``grammar_from`` the field whose grammar llama-cpp-python derived."""
    if isinstance(error, ApiError):
        return error
    message = str(error)
    if isinstance(error, ValueError) and "exceed context window" in message:  # llama-cpp-python's check
        return ApiError(
            400, f"the prompt does not fit the context: {message}", param=prompt, code="context_length_exceeded"
        )
    if isinstance(error, NonFiniteLogitsError):
        return ApiError(400, message, param="steering", code="non_finite_output")
    if isinstance(error, GrammarError):
        return ApiError(400, message, param=grammar_from)
    if isinstance(error, InnsteerError):
        return ApiError(500, message, kind="server_error", code="steering_failed")
    if isinstance(error, jinja2.TemplateError):  # the chat template refuses these messages
        return ApiError(400, f"the model's chat template cannot render these messages: {message}", param=prompt)
    if isinstance(error, (ValueError, TypeError, KeyError)):  # llama-cpp-python's checks of the arguments
        return ApiError(400, message)
    return ApiError(500, f"{type(error).__name__}: {message}", kind="server_error")


async def _read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it is known to exceed ``limit`` bytes."""
    too_large = ApiError(413, f"the request body exceeds {limit} bytes (--max-body-bytes)", code="request_too_large")
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise too_large
        chunks.append(chunk)
    return b"".join(chunks)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ApiError(400, f"the request body is not valid JSON: {error}", code="invalid_json") from None
    except RecursionError:  # nested too deeply for the reader itself
        raise _too_deep() from None
    _check_tree(body)
    if not isinstance(body, dict):
        raise ApiError(400, f"the request body must be a JSON object, got {type(body).__name__}", code="invalid_json")
    return body


def _too_deep() -> ApiError:
    return ApiError(400, f"the request body nests JSON more than {MAX_JSON_DEPTH} deep", code="invalid_json")


def _check_tree(body: Any) -> None:
    r"""Refuse JSON nested more than MAX_JSON_DEPTH deep, and strings that are not Unicode text (JSON's
    "\ud800" escapes give lone surrogates, which no tokenizer or C string takes). Walked without
    recursion; the error names the field."""
    pending: list[tuple[Any, str, int]] = [(body, "", 1)]
    while pending:
        item, where, depth = pending.pop()
        if isinstance(item, str):
            try:
                item.encode()
            except UnicodeEncodeError as error:
                code_point = f"\\u{ord(item[error.start]):04x}"
                message = f"{where or 'body'} holds {code_point}, a lone surrogate: not Unicode text"
                raise ApiError(400, message, param=where or None) from None
            continue
        if not isinstance(item, (dict, list)):
            continue
        if depth > MAX_JSON_DEPTH:
            raise _too_deep()
        if isinstance(item, dict):
            for key, value in item.items():
                pending += [(key, where or "body", depth), (value, f"{where}.{key}" if where else key, depth + 1)]
        else:
            pending += [(value, f"{where}[{i}]", depth + 1) for i, value in enumerate(item)]


async def _disconnected(request: Request) -> None:
    """Returns once the client has closed the connection (the body has been read by then)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(
    server: InnsteerServer, *, api_keys: tuple[str, ...] = (), max_body_bytes: int = DEFAULT_MAX_BODY_BYTES
) -> FastAPI:
    """The routes; with ``api_keys``, every route but /health needs one of them (``auth``)."""
    app = FastAPI(
        title="innsteer",
        summary="OpenAI-compatible completions with per-request nonlinear steering",
        docs_url=None,  # no pages that load scripts from a CDN; /openapi.json documents the routes
        redoc_url=None,
    )
    if api_keys:
        app.add_middleware(ApiKeyMiddleware, keys=api_keys)

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
        return await server.complete(request, chat=True, max_body_bytes=max_body_bytes)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.complete(request, chat=False, max_body_bytes=max_body_bytes)

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
    parallel: int = 4,
    max_queue: int = 16,
    n_ctx: int = 2048,
    n_threads: Optional[int] = None,
    steer_prompt: bool = False,
) -> InnsteerServer:
    """Load the steers (``(name, file)`` pairs) and the model, decoding ``parallel`` sequences at
    once; every steer is checked against the model here, so a steer file for another model fails at
    start-up."""
    import tempfile

    from ..core.errors import ConfigError
    from ..llama.model_file import ModelFileError, check_context, read_model_info
    from .steers import load_steer

    if parallel < 1 or max_queue < 0 or n_ctx < 1:
        raise ConfigError(f"need parallel >= 1, queue >= 0 and n_ctx >= 1, got {parallel}, {max_queue}, {n_ctx}")
    # before any context exists: llama.cpp would allocate the KV cache first and check afterwards
    check_context(read_model_info(model_path), n_ctx, contexts=parallel)
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
    try:
        engine, entries = open_engine(
            model_path, catalog, model_id=model_id, n_seq=parallel, n_ctx=n_ctx, n_threads=n_threads
        )
    except ValueError as error:
        if not isinstance(error, InnsteerError):  # llama-cpp-python's load error
            raise ModelFileError(f"llama.cpp cannot load the model {model_path}: {error}") from None
        raise
    slots = [Slot(index, engine, entries, steer_prompt=steer_prompt) for index in range(parallel)]
    return InnsteerServer(SlotPool(engine, slots, max_queue), catalog, default, model_id, n_ctx)


def http_server(
    server: InnsteerServer,
    *,
    api_keys: tuple[str, ...] = (),
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
    log_level: str = "info",
):
    """The uvicorn server for ``server``: ``.run(sockets=[sock])`` serves until Ctrl-C or SIGTERM (or
    ``should_exit`` is set from another thread)."""
    import uvicorn

    app = create_app(server, api_keys=api_keys, max_body_bytes=max_body_bytes)
    return uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=5))
