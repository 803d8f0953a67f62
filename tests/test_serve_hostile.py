"""``innsteer serve`` against hostile and careless requests: a real ``innsteer serve`` subprocess on
loopback (a crash must show as a dead process, not take pytest with it), on the real default
model. Every case checks the answer and that the server is still alive and serving afterwards.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import resource
import socket
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("llama_cpp")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
pytestmark = pytest.mark.llama

from llama_helpers import random_inn_steerer  # noqa: E402

from innsteer.hf.models import default_gguf_path, model_id_for  # noqa: E402
from innsteer.llama.export import export_steer_gguf  # noqa: E402

N_CTX = 512
WAIT_S = 300  # bound on every wait, so a hang fails the test instead of stalling the suite
QUESTION = [{"role": "user", "content": "Name a fruit."}]
SERVING = re.compile(r"on http://127\.0\.0\.1:(\d+)/v1")


class Served:
    """A ``python -m innsteer.cli serve`` process; its stderr is drained into ``log``."""

    def __init__(self, args, env=None):
        command = [sys.executable, "-m", "innsteer.cli", "serve", "smollm2", "--port", "0", "--threads", "1", *args]
        environment = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), **(env or {})}
        self.process = subprocess.Popen(command, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, env=environment)
        self.log: list[str] = []
        self.port = None
        started = threading.Event()

        def drain():
            for line in self.process.stderr:
                text = line.decode(errors="replace")
                self.log.append(text)
                if self.port is None and (match := SERVING.search(text)):
                    self.port = int(match.group(1))
                    started.set()
            started.set()

        threading.Thread(target=drain, daemon=True).start()
        started.wait(WAIT_S)
        assert self.port is not None, "".join(self.log)
        deadline = time.monotonic() + WAIT_S
        while not self._answers():
            assert self.process.poll() is None and time.monotonic() < deadline, "".join(self.log)
            time.sleep(0.05)

    def _answers(self) -> bool:
        try:
            return self.request("GET", "/health")[0] == 200
        except OSError:
            return False

    def request(self, method, path, body=None, headers=None, timeout=WAIT_S) -> tuple[int, dict, dict]:
        """(status, headers, JSON body); ``body`` is a dict (sent as JSON) or bytes."""
        connection = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            connection.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            response = connection.getresponse()
            raw, headers = response.read(), {k.lower(): v for k, v in response.getheaders()}
            if headers.get("content-type", "").startswith("text/event-stream"):  # the events' JSON objects
                events = [line[len("data: ") :] for line in raw.decode().splitlines() if line.startswith("data: ")]
                return response.status, headers, [json.loads(event) for event in events if event != "[DONE]"]
            return response.status, headers, json.loads(raw or b"null")
        finally:
            connection.close()

    def post(self, path, body, **kwargs):
        return self.request("POST", f"/v1/{path}", body, **kwargs)

    def health(self) -> dict:
        return self.request("GET", "/health")[2]

    def assert_alive(self):
        assert self.process.poll() is None, "the server died:\n" + "".join(self.log[-30:])
        assert self.health()["status"] == "ok"
        assert "Traceback" not in "".join(self.log), "".join(self.log)

    def stop(self):
        self.process.terminate()
        try:
            self.process.wait(WAIT_S)
        except subprocess.TimeoutExpired:
            self.process.kill()


@contextlib.contextmanager
def served(*args, env=None):
    server = Served(list(args), env=env)
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def steer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("hostile") / "inn.gguf"
    inn = random_inn_steerer(layer=10, alpha=4.0, seed=0, weight_scale=0.1, model_id=model_id_for(default_gguf_path()))
    export_steer_gguf(inn, path)
    return str(path)


@pytest.fixture(scope="module")
def server(steer_file):
    with served(
        "--steer", f"inn={steer_file}", "--ctx-size", str(N_CTX), "--max-body-bytes", "200000", "--parallel", "1"
    ) as s:
        yield s


def error_of(status, body, expected_status, *words, param=...):
    assert status == expected_status, body
    assert set(body) == {"error"}, body
    error = body["error"]
    assert all(word in error["message"] for word in words), error
    if param is not ...:
        assert error["param"] == param, error
    return error


QUOTED = {"type": "object", "properties": {'a"b': {"type": "string"}}}  # a property name with a double quote


@pytest.mark.parametrize(
    "extra, param",
    [
        ({"response_format": {"type": "json_object", "schema": QUOTED}}, "response_format"),
        ({"response_format": {"type": "json_object", "schema": QUOTED}, "stream": True}, "response_format"),
        (
            {
                "tools": [{"type": "function", "function": {"name": "f", "parameters": QUOTED}}],
                "tool_choice": {"type": "function", "function": {"name": "f"}},
            },
            "tools",
        ),
        ({"functions": [{"name": "f", "parameters": QUOTED}], "function_call": {"name": "f"}}, "functions"),
    ],
    ids=["response_format", "response_format-stream", "tools", "functions"],
)
def test_every_path_to_a_grammar_is_checked(server, extra, param):
    """Was: llama.cpp could not parse the derived grammar, and its NULL sampler segfaulted the server."""
    status, _, body = server.post("chat/completions", {"messages": QUESTION, "max_tokens": 4, **extra})
    error_of(status, body, 400, "cannot parse", param=param)
    server.assert_alive()


def test_grammars_are_bounded_before_llama_cpp_parses_them(server):
    """Was: 20 000 nested parentheses overflowed the C stack in the grammar check (exit 139)."""
    deep = "root ::= " + "(" * 20000 + '"a"' + ")" * 20000
    status, _, body = server.post("chat/completions", {"messages": QUESTION, "max_tokens": 2, "grammar": deep})
    error_of(status, body, 400, "nested 20000 deep", param="grammar")
    wide = "root ::= " + " | ".join(f'"x{i}"' for i in range(12000))  # 130 KB: each token would take seconds
    status, _, body = server.post("completions", {"prompt": "Hi", "max_tokens": 2, "grammar": wide})
    error_of(status, body, 400, "bytes, more than", param="grammar")
    # a grammar within the bounds still constrains the reply
    status, _, body = server.post("completions", {"prompt": "Hi", "max_tokens": 4, "grammar": 'root ::= "yes" | "no"'})
    assert status == 200 and body["choices"][0]["text"] in ("yes", "no"), body
    server.assert_alive()


def test_bodies_over_the_limit_get_413_and_long_prompts_are_refused_before_tokenizing(server):
    """Was: a 50 MB prompt was accepted and tokenized (26-30 s, +1 GB RSS that stayed)."""
    status, _, body = server.post("completions", {"prompt": "word " * 50_000, "max_tokens": 2})
    error_of(status, body, 413, "exceeds 200000 bytes")
    # the same without a Content-Length: the limit holds while the body streams in
    connection = http.client.HTTPConnection("127.0.0.1", server.port, timeout=WAIT_S)
    payload = json.dumps({"prompt": "word " * 50_000}).encode()
    connection.putrequest("POST", "/v1/completions")
    connection.putheader("Transfer-Encoding", "chunked")
    connection.endheaders()
    with contextlib.suppress(OSError):  # the server may answer and close before it has read everything
        for start in range(0, len(payload), 16384):
            chunk = payload[start : start + 16384]
            connection.send(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        connection.send(b"0\r\n\r\n")
    response = connection.getresponse()
    assert response.status == 413
    connection.close()
    # within the body limit, but its bytes alone prove it longer than the context
    status, _, body = server.post("completions", {"prompt": "word " * 30_000, "max_tokens": 2})
    error_of(status, body, 400, "does not fit the context", "context window of 512", param="prompt")
    server.assert_alive()


def test_deep_json_is_a_400_without_traceback(server):
    """Was: a body nested 1000 deep gave a 500 RecursionError with a traceback in the log."""
    for depth in (1000, 60000):
        raw = (
            '{"messages": [{"role": "user", "content": "hi"}], "steering": ' + "[" * depth + "]" * depth + "}"
        ).encode()
        status, _, body = server.post("chat/completions", raw)
        assert error_of(status, body, 400, "nests JSON more than")["code"] == "invalid_json"
    server.assert_alive()


def test_an_alpha_that_overflows_the_flow_is_an_error_not_an_empty_reply(server):
    """Was: alpha 3e38 (a finite float32) gave NaN logits and a 200 with empty text, finish_reason stop."""
    for stream in (False, True):
        request = {"messages": QUESTION, "max_tokens": 4, "steering": {"steer": "inn", "alpha": 3e38}, "stream": stream}
        status, _, body = server.post("chat/completions", request)
        assert error_of(status, body, 400, "NaN or Inf", param="steering")["code"] == "non_finite_output"
    status, _, body = server.post("chat/completions", {"messages": QUESTION, "max_tokens": 4})
    assert status == 200 and body["choices"][0]["message"]["content"], body
    server.assert_alive()


def test_null_content_is_named_or_taken_as_openai_sends_it(server):
    """Was: "content": null leaked "can only concatenate str" from the chat template."""
    status, _, body = server.post("chat/completions", {"messages": [{"role": "user", "content": None}]})
    error_of(status, body, 400, "must be a string", param="messages[0].content")
    # an assistant turn that called a tool has null content in OpenAI's schema
    messages = [QUESTION[0], {"role": "assistant", "content": None}, {"role": "user", "content": "Another one."}]
    status, _, body = server.post("chat/completions", {"messages": messages, "max_tokens": 2})
    assert status == 200, body
    server.assert_alive()


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_null_for_a_field_means_its_default(server, chat):
    """Was: "presence_penalty": null (as OpenAI's clients send an unset field) reached llama.cpp's
    sampler as None and came back as a 500 from ctypes. Each field set to null must answer exactly as
    the same request without it (greedy, so the replies can be compared)."""
    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest

    fields = (CreateChatCompletionRequest if chat else CreateCompletionRequest).model_fields
    base = {"messages": QUESTION} if chat else {"prompt": "Name a fruit:"}
    base |= {"max_tokens": 4, "temperature": 0.0, "seed": 1}
    path = "chat/completions" if chat else "completions"
    status, _, plain = server.post(path, base)
    assert status == 200, plain
    expected = plain["choices"][0]["message" if chat else "text"]
    nulls = [name for name in fields if name not in ("messages", "prompt", "max_tokens", "temperature", "seed")]
    assert {"presence_penalty", "frequency_penalty", "top_k", "stream", "n"} <= set(nulls)
    for name in nulls:
        status, _, body = server.post(path, {**base, name: None})
        assert status == 200, (name, body)
        assert body["choices"][0]["message" if chat else "text"] == expected, name
    server.assert_alive()


def _prompt_of(tokens: int) -> str:
    """A completion prompt of exactly ``tokens`` tokens (BOS included) for the default model."""
    import llama_cpp

    vocab = llama_cpp.Llama(str(default_gguf_path()), vocab_only=True, verbose=False)
    words = tokens
    for _ in range(20):
        count = len(vocab.tokenize(("word " * words).encode(), add_bos=True, special=True))
        if count == tokens:
            return "word " * words
        words += tokens - count
    raise AssertionError(f"no prompt of {tokens} tokens found")


def test_a_reply_cut_by_the_end_of_the_context_finishes_for_length(server):
    """Was: a 511-token prompt in a 512 context returned 0 tokens with finish_reason "stop"."""
    import llama_cpp

    vocab = llama_cpp.Llama(str(default_gguf_path()), vocab_only=True, verbose=False)
    force_end = {str(vocab.token_eos()): 100}  # the model's end of text at once
    for tokens, expected in ((N_CTX - 1, "length"), (N_CTX - 100, "stop")):
        request = {"prompt": _prompt_of(tokens), "max_tokens": 200, "logit_bias": force_end}
        status, _, body = server.post("completions", request)
        assert status == 200 and body["usage"]["prompt_tokens"] == tokens, body
        assert body["choices"][0]["finish_reason"] == expected, (tokens, body)
        status, _, chunks = server.post("completions", {**request, "stream": True})
        assert status == 200 and chunks[-1]["choices"][0]["finish_reason"] == expected, chunks
    server.assert_alive()


def _raw_request(port, body) -> socket.socket:
    """A request sent on a raw socket, to close it without reading the answer."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=WAIT_S)
    data = json.dumps(body).encode()
    head = "POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
    head += f"Content-Length: {len(data)}\r\n\r\n"
    sock.sendall(head.encode() + data)
    return sock


def _wait_for(server, predicate, what):
    deadline = time.monotonic() + WAIT_S
    while not predicate(server.health()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}: {server.health()}"
        time.sleep(0.05)


def test_clients_that_leave_give_up_their_queue_place_and_their_generation(server):
    """Was: clients that disconnected while queued kept their places, and their generations still ran."""
    endless = {"prompt": "Tell me a long story.", "max_tokens": N_CTX, "min_tokens": N_CTX}
    running = _raw_request(server.port, endless)
    _wait_for(server, lambda h: h["busy"] == 1, "the first request to run")
    queued = [_raw_request(server.port, endless) for _ in range(3)]
    _wait_for(server, lambda h: h["queued"] == 3, "three queued requests")
    for sock in queued:
        sock.close()
    _wait_for(server, lambda h: h["queued"] == 0, "the queue to empty")
    assert server.health()["busy"] == 1  # the running one is untouched
    running.close()  # a non-streamed request whose client leaves mid-generation
    _wait_for(server, lambda h: h["busy"] == 0, "the slot to be freed")
    time.sleep(0.5)
    assert server.health() == {"status": "ok", "slots": 1, "busy": 0, "queued": 0}  # nothing queued ran
    server.assert_alive()


def test_strings_that_are_not_text_are_named(server):
    """JSON can escape a lone surrogate ("\\ud800"); no tokenizer and no C string takes one."""
    for path, request, param in (
        ("completions", {"prompt": "Hi \ud800"}, "prompt"),
        ("completions", {"prompt": "Hi", "stop": ["ok", "\udc00"]}, "stop[1]"),
        ("chat/completions", {"messages": [{"role": "user", "content": "\ud800"}]}, "messages[0].content"),
    ):
        status, _, body = server.post(path, {"max_tokens": 2, **request})
        error_of(status, body, 400, "lone surrogate", param=param)
    status, _, body = server.post("completions", {"prompt": "Hi", "max_tokens": 2, "logprobs": 3})
    error_of(status, body, 400, "log probabilities", param="logprobs")
    server.assert_alive()


def test_every_request_field_that_reaches_c_survives_hostile_values(server):
    """A sweep over the OpenAI request fields llama.cpp sees: each extreme value is answered (200 or
    4xx), never a crash, a hang or a 500."""
    huge = 2**70
    cases = [
        {"seed": huge}, {"seed": -1}, {"seed": 2**32 + 5}, {"top_k": huge}, {"top_k": -5}, {"top_p": -1.0},
        {"top_p": 1e30}, {"min_p": 2.0}, {"typical_p": -3.0}, {"temperature": -1.0}, {"temperature": 1e30},
        {"repeat_penalty": 0.0}, {"repeat_penalty": -1e30}, {"presence_penalty": 1e30},
        {"frequency_penalty": -1e30}, {"mirostat_mode": 7}, {"mirostat_mode": 2, "mirostat_tau": -1e30},
        {"mirostat_mode": 1, "mirostat_eta": 1e30}, {"max_tokens": huge}, {"max_tokens": -huge},
        {"min_tokens": huge}, {"min_tokens": -1}, {"logit_bias": {"0": 1e308, "1": -1e308}},
        {"logit_bias": {str(i): 1.0 for i in range(1100)}}, {"logit_bias": {"-1": 1.0}},
        {"logit_bias": {"\u00e9\u00e9": 5.0}, "logit_bias_type": "tokens"}, {"logprobs": 5},
        {"logprobs": huge}, {"stop": ["x"] * 100}, {"stop": ["\ud800"]}, {"stop": "a" * 5000},
        {"prompt": "\ud800\udfff\x00 hi"}, {"prompt": [huge]}, {"prompt": [[1, 2]]}, {"echo": True},
        {"suffix": "a" * 1000}, {"n": huge}, {"best_of": huge}, {"grammar": ""}, {"grammar": "\x00"},
        {"grammar": 'root ::= [\\x00-\\x{10FFFF}]'}, {"steering": {"steer": "inn", "alpha": -3e38}},
        {"steering": [{"steer": "inn", "alpha": 1e-45}]}, {"user": "a" * 10000},
    ]  # fmt: skip
    for case in cases:
        request = {"prompt": "Hi", "max_tokens": 3, **case}
        status, _, body = server.post("completions", request)
        assert status == 200 or 400 <= status < 500, (case, status, body)
        if status != 200:
            assert set(body) == {"error"}, (case, body)
    chat_cases = [
        {"messages": [{"role": "user", "content": "\ud800"}]},
        {"messages": [{"role": "system", "content": "x"}] * 200},
        {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
        {"messages": [{"role": "user", "content": "hi", "name": "\x00" * 100}]},
        {"messages": QUESTION, "response_format": {"type": "json_object", "schema": {"type": "array", "items": {}}}},
        {"messages": QUESTION, "response_format": {"type": "json_object", "schema": {"$ref": "#/nope"}}},
        {"messages": QUESTION, "response_format": {"type": "json_object", "schema": {"enum": ["\\", '"', "\x00"]}}},
        {"messages": QUESTION, "response_format": {"type": "json_object", "schema": {"pattern": "((((("}}},
        {"messages": QUESTION, "response_format": {"type": "json_object", "schema": {"pattern": "[" + "a" * 9000}}},
        {"messages": QUESTION, "tools": [{"type": "function", "function": {"name": 'f"x', "parameters": {}}}],
         "tool_choice": {"type": "function", "function": {"name": 'f"x'}}},
        {"messages": QUESTION, "tools": [{"type": "function", "function": {"name": "f"}}], "tool_choice": "auto"},
        {"messages": QUESTION, "top_logprobs": 20, "logprobs": True},
    ]  # fmt: skip
    for case in chat_cases:
        status, _, body = server.post("chat/completions", {"max_tokens": 3, **case})
        assert status == 200 or 400 <= status < 500, (case, status, body)
    server.assert_alive()


HOSTILE_VALUES = [
    None, True, False, 0, -1, 1, 7, 2**31, 2**63, -(2**63), 2**64 + 1, 10**30, 0.0, -0.0, 0.5, -3.3, 1e308, -1e308,
    1e-320, "", " ", "\x00", "\u2028", "a" * 3000, "inn", "auto", "none", "json_object", "user", "tool",
    'root ::= "x"', "{% raw %}", "<|im_end|>", "\U0001f600", [], [None], ["a", 1], [[[]]], {}, {"type": "text"},
    {"steer": "inn"}, {"steer": "inn", "alpha": -1e30}, {"name": "f", "parameters": {}}, {"include_usage": True},
    {"type": "json_object", "schema": {"type": "array", "items": {"$ref": "#"}}},
    [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}],
]  # fmt: skip


def test_random_requests_are_answered_or_refused_never_a_server_error(server):
    """A seeded sweep of requests that set one to three fields (any the request models know, and
    steering) to values from a pool of hostile ones: each is a 200 or a 4xx with an OpenAI-style
    error, and the server keeps serving. (A longer run of this found "presence_penalty": null's 500.)"""
    import random

    from llama_cpp.server.types import CreateChatCompletionRequest, CreateCompletionRequest

    rng = random.Random(0)
    for i in range(240):
        chat = i % 2 == 1
        fields = [*(CreateChatCompletionRequest if chat else CreateCompletionRequest).model_fields, "steering"]
        request = {"messages": QUESTION} if chat else {"prompt": "Name a fruit:"}
        for name in rng.sample(fields, rng.randint(1, 3)):
            request[name] = rng.choice(HOSTILE_VALUES)
        request["max_tokens"] = 2  # what is hostile here is every other field: the generation stays short
        status, _, body = server.post("chat/completions" if chat else "completions", request)
        assert status == 200 or (400 <= status < 500 and set(body) == {"error"}), (request, status, body)
    server.assert_alive()


def test_api_keys_from_the_option_and_the_environment(steer_file):
    with served("--api-key", "key-one", env={"INNSTEER_API_KEY": "key-two, key-three"}) as server:
        for headers in ({}, {"Authorization": "Bearer nope"}, {"Authorization": "key-one"}):
            for method, path in (("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/missing")):
                status, response_headers, body = server.request(method, path, b"{}", headers=headers)
                assert error_of(status, body, 401, "API key")["code"] == "invalid_api_key", (headers, path)
                assert response_headers["www-authenticate"] == "Bearer"
        assert server.request("GET", "/health")[0] == 200  # probes need no key
        for key in ("key-one", "key-two", "key-three"):
            status, _, body = server.request("GET", "/v1/models", headers={"Authorization": f"Bearer {key}"})
            assert status == 200 and body["data"][0]["id"] == model_id_for(default_gguf_path())
        base = f"http://127.0.0.1:{server.port}/v1"
        with openai.OpenAI(base_url=base, api_key="key-three", max_retries=0, timeout=WAIT_S) as client:
            reply = client.chat.completions.create(model="m", messages=QUESTION, max_tokens=2, temperature=0)
            assert reply.choices[0].message.content
        with openai.OpenAI(base_url=base, api_key="wrong", max_retries=0, timeout=WAIT_S) as client:
            with pytest.raises(openai.AuthenticationError):
                client.models.list()
        server.assert_alive()


def _limited_memory():
    resource.setrlimit(resource.RLIMIT_AS, (6 * 2**30, 6 * 2**30))


@pytest.mark.parametrize(
    "args, words",
    [
        (["--ctx-size", "1000000"], ["--ctx-size 1000000 exceeds the model's training context of 8192"]),
        (["--ctx-size", "8192", "--parallel", "4096"], ["GiB of KV cache for 4096 context(s)", "available"]),
    ],
)
def test_contexts_are_checked_before_they_are_allocated(args, words):
    """Was: --ctx-size 1000000 allocated ~21 GB of KV cache before the training context was checked
    (the OOM killer ended it). Under a 6 GiB address-space limit an allocation would fail loudly."""
    command = [sys.executable, "-m", "innsteer.cli", "serve", "smollm2", "--port", "0", *args]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(command, capture_output=True, env=env, timeout=WAIT_S, preexec_fn=_limited_memory)
    err = done.stderr.decode()
    assert done.returncode == 2 and err.count("\n") == 1 and err.startswith("innsteer: error: "), err
    assert all(word in err for word in words), err


def test_files_that_are_not_models_are_one_line_errors(tmp_path, steer_file):
    """Was: a steer file or a random .gguf given as the model gave a traceback."""
    import gguf
    import numpy as np

    (tmp_path / "random.gguf").write_bytes(os.urandom(4096))
    (tmp_path / "header.gguf").write_bytes(b"GGUF\x03\x00\x00\x00")
    for name, tensor in (("no-embedding", "blk.0.attn_q.weight"), ("embedding-only", "token_embd.weight")):
        writer = gguf.GGUFWriter(str(tmp_path / f"{name}.gguf"), arch="llama")  # a header, but no model
        writer.add_tensor(tensor, np.zeros((4, 8), dtype=np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    cases = [(steer_file, "steer GGUF, not a model"), (tmp_path / "random.gguf", "not a GGUF model file"),
             (tmp_path / "header.gguf", "not a readable GGUF file"),
             (tmp_path / "no-embedding.gguf", "no token embedding tensor"),
             (tmp_path / "embedding-only.gguf", "llama.cpp cannot load the model")]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    for path, words in cases:
        command = [sys.executable, "-m", "innsteer.cli", "serve", str(path), "--port", "0"]
        done = subprocess.run(command, capture_output=True, env=env, timeout=WAIT_S)
        err = done.stderr.decode()
        assert done.returncode == 2 and err.count("\n") == 1 and words in err, err


def test_work_on_a_request_never_blocks_the_event_loop(steer_file, monkeypatch):
    """Was: a 20 MB logit_bias key was tokenized on the event loop, and every request waited. Here the
    tokenizer is held inside a request: /health must still answer."""
    from innsteer.serve import app as serve_app

    server = serve_app.load_server(str(default_gguf_path()), [], model_id="m", n_ctx=N_CTX, n_threads=1)
    llm = server.pool.slots[0].llm
    entered, release = threading.Event(), threading.Event()
    tokenize = llm.tokenize

    def held_tokenize(*args, **kwargs):
        entered.set()
        release.wait(WAIT_S)
        return tokenize(*args, **kwargs)

    monkeypatch.setattr(llm, "tokenize", held_tokenize)
    sock = socket.create_server(("127.0.0.1", 0))
    uv = serve_app.http_server(server, log_level="warning")
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    port = sock.getsockname()[1]
    try:
        while not uv.started:
            assert thread.is_alive()
            time.sleep(0.05)
        body = {"prompt": "Hi", "max_tokens": 1, "logit_bias": {"hello": 1.0}, "logit_bias_type": "tokens"}
        answer = []
        worker = threading.Thread(target=lambda: answer.append(_post(port, body)))
        worker.start()
        assert entered.wait(WAIT_S)
        connection = http.client.HTTPConnection("127.0.0.1", port, timeout=20)
        connection.request("GET", "/health")
        assert connection.getresponse().status == 200  # while the tokenizer is held
        release.set()
        worker.join(WAIT_S)
        assert answer and answer[0] == 200
    finally:
        release.set()
        uv.should_exit = True
        thread.join(WAIT_S)
        sock.close()
        server.close()


def _post(port, body) -> int:
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=WAIT_S)
    connection.request("POST", "/v1/completions", body=json.dumps(body), headers={"Content-Type": "application/json"})
    return connection.getresponse().status


def test_loopback_detection_and_key_lists():
    from innsteer.core.errors import ConfigError
    from innsteer.serve.auth import api_keys, is_loopback

    assert all(is_loopback(host) for host in ("127.0.0.1", "127.9.9.9", "::1", "[::1]", "localhost"))
    assert not any(is_loopback(host) for host in ("0.0.0.0", "::", "192.168.1.2", "example.org"))
    assert api_keys(["a", "b"], " c ,, a,") == ("a", "b", "c")
    with pytest.raises(ConfigError, match="printable"):
        api_keys(["has space"], None)
