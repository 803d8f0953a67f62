"""``innsteer serve`` on the real default model (SmolLM2-135M-Instruct Q4_1), on loopback.

The server runs in-process (uvicorn in a thread, on a socket bound to 127.0.0.1:0) and is always
stopped. The reference for every text is ``SteeredLlama`` with the same steering, evaluated from an
empty cache, one request at a time; the client is the official ``openai`` package (and ``http.client`` for
what it hides: raw bodies, status codes, headers). Sampling is greedy (temperature 0);
unspecified sampling fields take llama-cpp-python's server defaults (repeat_penalty 1.1), which the
reference passes explicitly.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import http.client
import json
import socket
import threading
import time

import pytest
import torch

pytest.importorskip("llama_cpp")
pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")
pytestmark = pytest.mark.llama

from llama_helpers import SMOLLM_DIM, random_inn_steerer  # noqa: E402

from innsteer import SteerFileError  # noqa: E402
from innsteer.core.errors import ConfigError  # noqa: E402
from innsteer.core.steerers.linear import LinearSteerer  # noqa: E402
from innsteer.hf.models import default_gguf_path, model_id_for  # noqa: E402
from innsteer.llama.export import export_control_vector, export_steer_gguf  # noqa: E402
from innsteer.llama.steering import SteeredLlama  # noqa: E402
from innsteer.serve.app import http_server, load_server  # noqa: E402

MODEL = str(default_gguf_path())
MODEL_ID = model_id_for(default_gguf_path())
N_CTX = 256
MAX_TOKENS = 8
REPEAT_PENALTY = 1.1  # llama-cpp-python's server default, which the server keeps
QUESTION = [{"role": "user", "content": "Name a fruit and its color."}]
OTHER_QUESTION = [{"role": "user", "content": "What is the capital of France?"}]
WAIT_S = 600  # bound on waits for another thread, so a bug fails the test instead of hanging it


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Steers of every kind the server takes, for the served model: an INN steer GGUF, a .safetensors
    INN steerer (exported on the fly; its GGUF export is the reference), a control vector GGUF and a
    .safetensors linear steerer (served as a control vector)."""
    d = tmp_path_factory.mktemp("serve")
    gen = torch.Generator().manual_seed(7)
    inn = random_inn_steerer(layer=10, alpha=4.0, seed=0, weight_scale=0.1, model_id=MODEL_ID)
    export_steer_gguf(inn, d / "inn.gguf")
    inn_st = random_inn_steerer(layer=6, alpha=3.0, seed=1, weight_scale=0.1, model_id=MODEL_ID)
    inn_st.save(d / "inn_st.safetensors")
    export_steer_gguf(inn_st, d / "inn_st_reference.gguf")
    cv = LinearSteerer(torch.randn(SMOLLM_DIM, generator=gen) * 2, 12, model_id=MODEL_ID)
    export_control_vector(cv, d / "cv.gguf", model_hint="llama")
    lin_vector = torch.randn(SMOLLM_DIM, generator=gen) * 2
    LinearSteerer(lin_vector, 8, alpha=1.5, model_id=MODEL_ID).save(d / "lin.safetensors")
    return {
        "inn": str(d / "inn.gguf"),
        "inn_st": str(d / "inn_st.safetensors"),
        "inn_st_reference": str(d / "inn_st_reference.gguf"),
        "cv": str(d / "cv.gguf"),
        "lin": str(d / "lin.safetensors"),
        "lin_vector": {8: lin_vector.numpy()},
        "dir": d,
    }


class Reference:
    """SteeredLlama with the same steers: ``text(steering, ...)`` from an empty cache."""

    def __init__(self, files):
        self.llm = SteeredLlama(MODEL, n_ctx=N_CTX, n_threads=1, n_threads_batch=1)
        steering = self.llm.steering
        self.entries = {"inn": steering.add(files["inn"]), "inn_st": steering.add(files["inn_st_reference"])}
        self.vectors = {"cv": files["cv"], "lin": files["lin_vector"]}
        self.cache = {}

    def text(self, steering: dict, *, messages=None, prompt=None, steer_prompt=False, max_tokens=MAX_TOKENS) -> str:
        """The greedy reply with ``steering`` ({name: alpha}; at most one control vector)."""
        key = (tuple(sorted(steering.items())), json.dumps(messages), prompt, steer_prompt, max_tokens)
        if key not in self.cache:
            self.cache[key] = self._generate(steering, messages, prompt, steer_prompt, max_tokens)
        return self.cache[key]

    def _generate(self, steering, messages, prompt, steer_prompt, max_tokens) -> str:
        llm, hook = self.llm, self.llm.steering
        hook.disable()
        hook.clear_control_vector()
        hook.steer_from(0)
        for name, alpha in steering.items():
            if name in self.entries:
                hook.set_alpha(alpha, self.entries[name])
                hook.enable(self.entries[name])
            else:
                hook.set_control_vector(self.vectors[name], alpha)

        def run(tokens: int):
            llm.reset()
            if messages is not None:
                return llm.create_chat_completion(
                    messages=messages, max_tokens=tokens, temperature=0.0, repeat_penalty=REPEAT_PENALTY
                )
            return llm.create_completion(prompt, max_tokens=tokens, temperature=0.0, repeat_penalty=REPEAT_PENALTY)

        if not steer_prompt:  # steer from the last prompt token on, as the server does by default
            hook.steer_from(run(1)["usage"]["prompt_tokens"] - 1)
        out = run(max_tokens)["choices"][0]
        return out["message"]["content"] if messages is not None else out["text"]


@pytest.fixture(scope="module")
def reference(files):
    ref = Reference(files)
    yield ref
    ref.llm.close()


@contextlib.contextmanager
def running_server(steers, **options):
    """The server on 127.0.0.1 at a free port: yields (InnsteerServer, base URL); always stopped."""
    server = load_server(MODEL, steers, model_id=MODEL_ID, n_ctx=N_CTX, n_threads=1, **options)
    sock = socket.create_server(("127.0.0.1", 0))
    uv = http_server(server, log_level="warning")
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + WAIT_S
        while not uv.started:
            assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
            time.sleep(0.05)
        yield server, f"http://127.0.0.1:{sock.getsockname()[1]}/v1"
    finally:
        uv.should_exit = True
        thread.join(WAIT_S)
        sock.close()
        server.close()


def fetch(url: str, raw=None) -> tuple[int, dict, dict]:
    """GET ``url``, or POST the text ``raw`` to it: (status, headers, JSON body)."""
    address = url.removeprefix("http://")
    host_port, _, path = address.partition("/")
    host, port = host_port.split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=WAIT_S)
    try:
        if raw is None:
            connection.request("GET", "/" + path)
        else:
            connection.request("POST", "/" + path, body=raw.encode(), headers={"Content-Type": "application/json"})
        response = connection.getresponse()
        return response.status, dict(response.getheaders()), json.loads(response.read())
    finally:
        connection.close()


def steer_list(files, *names):
    return [(name, files[name]) for name in names]


@pytest.fixture(scope="module")
def pooled(files):
    """Two slots, a queue of 4, reply-only steering (the default), no default steering."""
    with running_server(steer_list(files, "inn", "inn_st", "cv", "lin"), parallel=2, max_queue=4) as served:
        yield served


@pytest.fixture(scope="module")
def client(pooled):
    with openai.OpenAI(base_url=pooled[1], api_key="unused", max_retries=0, timeout=WAIT_S) as c:
        yield c


def chat(client, messages, steering=..., **kwargs):
    extra = {} if steering is ... else {"steering": steering}
    out = client.chat.completions.create(
        model=MODEL_ID, messages=messages, max_tokens=MAX_TOKENS, temperature=0, extra_body=extra, **kwargs
    )
    return out.choices[0].message.content


def streamed_text(stream) -> str:
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


def test_models_lists_the_model_its_steers_and_their_kinds(pooled, client):
    server, url = pooled
    assert [m.id for m in client.models.list()] == [MODEL_ID]
    entry = fetch(f"{url}/models")[2]["data"][0]
    kinds = {steer["name"]: (steer["kind"], steer["layers"]) for steer in entry["steers"]}
    assert kinds == {
        "inn": ("innsteer", [10]),
        "inn_st": ("innsteer", [6]),
        "cv": ("control_vector", [12]),
        "lin": ("control_vector", [8]),
    }
    assert entry["default_steering"] == []


@pytest.mark.parametrize(
    "steering",
    [
        None,
        {"steer": "inn", "alpha": 4.0},
        {"steer": "inn_st"},  # the file's alpha (3)
        {"steer": "cv", "alpha": 3.0},
        {"steer": "lin", "alpha": -2.0},
        [{"steer": "inn", "alpha": 4.0}, {"steer": "cv", "alpha": 3.0}],
        [{"steer": "inn", "alpha": -3.0}, {"steer": "inn_st", "alpha": 2.0}],
    ],
    ids=["none", "inn", "safetensors-inn-default-alpha", "control-vector", "safetensors-linear", "inn+cv", "two-inns"],
)
def test_chat_completion_equals_steered_llama(client, reference, steering):
    items = [] if steering is None else steering if isinstance(steering, list) else [steering]
    defaults = {"inn": 4.0, "inn_st": 3.0, "cv": 1.0, "lin": 1.5}
    setting = {item["steer"]: item.get("alpha", defaults[item["steer"]]) for item in items}
    text = chat(client, QUESTION, steering)
    assert text == reference.text(setting, messages=QUESTION)
    if setting:  # the steering really acts, so equality above is not vacuous
        assert text != reference.text({}, messages=QUESTION)


def test_completion_and_stream_equal_steered_llama(client, reference):
    prompt = "The three primary colors are"
    steering = {"steer": "inn", "alpha": 4.0}
    out = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, extra_body={"steering": steering}
    )
    assert out.choices[0].text == reference.text({"inn": 4.0}, prompt=prompt)
    assert out.choices[0].text != reference.text({}, prompt=prompt)

    stream = client.chat.completions.create(
        model=MODEL_ID,
        messages=QUESTION,
        max_tokens=MAX_TOKENS,
        temperature=0,
        stream=True,
        extra_body={"steering": {"steer": "cv", "alpha": 3.0}},
    )
    assert streamed_text(stream) == reference.text({"cv": 3.0}, messages=QUESTION)

    stream = client.completions.create(
        model=MODEL_ID, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True, extra_body={}
    )
    assert "".join(chunk.choices[0].text for chunk in stream) == reference.text({}, prompt=prompt)


def test_interleaved_streams_and_concurrent_requests_keep_their_steering(client, reference):
    """Two streams on the two slots, read token by token in turn; then six requests with three
    settings at once (two running, four queued). Each text equals the same request alone."""
    settings = [{"inn": 4.0}, {}, {"cv": 3.0}]
    body = [{"steer": name, "alpha": alpha} for name, alpha in settings[0].items()]
    first = client.chat.completions.create(
        model=MODEL_ID, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body={"steering": body},
    )  # fmt: skip
    second = client.chat.completions.create(
        model=MODEL_ID, messages=QUESTION, max_tokens=MAX_TOKENS, temperature=0, stream=True,
        extra_body={"steering": None},
    )  # fmt: skip
    texts = ["", ""]
    streams = [iter(first), iter(second)]
    while streams[0] or streams[1]:
        for i, stream in enumerate(streams):
            chunk = next(stream, None) if stream else None
            if chunk is None:
                streams[i] = None
            elif chunk.choices:
                texts[i] += chunk.choices[0].delta.content or ""
    assert texts == [reference.text(settings[0], messages=QUESTION), reference.text({}, messages=QUESTION)]

    jobs = [(settings[i % 3], [QUESTION, OTHER_QUESTION][i % 2]) for i in range(6)]
    expected = [reference.text(setting, messages=messages) for setting, messages in jobs]

    def ask(job):
        setting, messages = job
        return chat(client, messages, [{"steer": name, "alpha": alpha} for name, alpha in setting.items()])

    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        assert list(pool.map(ask, jobs, timeout=WAIT_S)) == expected


def error_of(body: dict) -> dict:
    assert set(body) == {"error"} and {"message", "type", "param", "code"} <= set(body["error"]), body
    return body["error"]


def test_bad_requests_get_a_4xx_naming_the_problem_and_the_server_keeps_serving(pooled, client, reference):
    _, url = pooled
    question = json.dumps(QUESTION)
    cases = [  # (path, raw body, status, words the message must contain, param)
        ("chat/completions", '{"messages": ' + question + ', "steering": {"steer": "nope"}}', 400,
         ["unknown steer 'nope'", "inn, inn_st, cv, lin"], "steering.steer"),
        ("chat/completions", '{"messages": ' + question + ', "steering": {"steer": "inn", "alpha": NaN}}', 400,
         ["alpha", "finite"], "steering.alpha"),
        ("chat/completions", '{"messages": ' + question + ', "steering": [{"steer": "cv", "alpha": 1e400}]}', 400,
         ["alpha", "finite"], "steering[0].alpha"),
        ("chat/completions", '{"messages": ' + question + ', "steering": {"steer": "inn", "alpha": "2"}}', 400,
         ["alpha must be a number"], "steering.alpha"),
        ("chat/completions", '{"messages": ' + question + ', "steering": {"steer": "inn", "aplha": 2}}', 400,
         ["unknown field 'aplha'"], "steering"),
        ("chat/completions", '{"messages": ' + question + ', "steering": [{"steer": "inn"}, {"steer": "inn"}]}',
         400, ["listed twice"], "steering[1].steer"),
        ("chat/completions", '{"messages": ' + question + ', "temperature": Infinity}', 400, ["finite"],
         "temperature"),
        ("chat/completions", '{"messages": [{"role": "user", "content": "hi"}', 400, ["not valid JSON"], None),
        ("chat/completions", "[1, 2]", 400, ["must be a JSON object"], None),
        ("chat/completions", '{"max_tokens": 4}', 400, ["at least one message"], "messages"),
        ("chat/completions", '{"messages": ' + question + ', "n": 2}', 400, ["n must be 1"], "n"),
        ("chat/completions", '{"messages": ' + question + ', "grammar": "root ::= ("}', 400, ["GBNF"], "grammar"),
        ("chat/completions", '{"messages": ' + question + ', "logit_bias": {"99999999": 1}}', 400,
         ["not in the vocabulary"], "logit_bias"),
        ("completions", '{"prompt": "' + "word " * 400 + '", "max_tokens": 2}', 400,
         ["does not fit the context", "exceed context window of 256"], "prompt"),
        ("completions", '{"prompt": "' + "word " * 400 + '", "stream": true}', 400,
         ["does not fit the context"], "prompt"),
        ("completions", '{"max_tokens": 2}', 400, ["needs a non-empty prompt"], "prompt"),
        ("completions", '{"prompt": "", "max_tokens": 2}', 400, ["needs a non-empty prompt"], "prompt"),
        ("chat/completions", '{"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}', 400,
         ["text only"], "messages[0].content"),
        ("chat/completions", '{"messages": [{"role": "wizard", "content": "hi"}]}', 400,
         ["messages[0].role must be one of system, user"], "messages[0].role"),
        ("chat/completions", '{"messages": ' + question + ', "steering": {"steer": "cv", "alpha": 3e38}}', 400,
         ["overflows float32"], "steering.alpha"),
        ("chat/completions", '{"messages": ' + question + ', "max_tokens": -5}', 400,
         ["greater than or equal to 0"], "max_tokens"),
        ("completions", '{"prompt": [1, 2, 99999999], "max_tokens": 2}', 400, ["prompt must be a string"], "prompt"),
        ("completions", '{"prompt": {"text": "hi"}}', 400, ["prompt must be a string"], "prompt"),
    ]  # fmt: skip
    for path, raw, status, words, param in cases:
        code, _, body = fetch(f"{url}/{path}", raw)
        assert code == status, (raw[:80], body)
        error = error_of(body)
        assert all(word in error["message"] for word in words), (raw[:80], error)
        assert error["param"] == param, (raw[:80], error)
    assert error_of(fetch(f"{url}/nothing")[2])["message"] == "Not Found"

    with pytest.raises(openai.BadRequestError, match="unknown steer 'honesty'"):
        chat(client, QUESTION, {"steer": "honesty", "alpha": 1.0})
    # still serving; a message's text parts are joined into its content
    parts = [{"type": "text", "text": "Name a fruit"}, {"type": "text", "text": " and its color."}]
    assert QUESTION[0]["content"] == "".join(part["text"] for part in parts)
    assert chat(client, [{"role": "user", "content": parts}], None) == reference.text({}, messages=QUESTION)


@pytest.fixture(scope="module")
def single(files):
    """One slot, a queue of one, INN steers on the prompt too, the default steering inn at alpha 4."""
    steers = steer_list(files, "inn", "cv")
    with running_server(
        steers, parallel=1, max_queue=1, steer_prompt=True, default_steering={"steer": "inn", "alpha": 4.0}
    ) as s:
        yield s


def test_default_steering_and_alternating_settings_on_one_context(single, reference):
    """The context reuses its KV cache between requests; steering the prompt too, a prefix computed
    under one setting would change the text under another."""
    _, url = single
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=WAIT_S) as client:
        runs = [
            (..., {"inn": 4.0}),  # the default
            (None, {}),
            ({"steer": "cv", "alpha": 3.0}, {"cv": 3.0}),
            (..., {"inn": 4.0}),
            ({"steer": "inn", "alpha": -3.0}, {"inn": -3.0}),
            (None, {}),
        ]
        for steering, setting in runs:
            assert chat(client, QUESTION, steering) == reference.text(setting, messages=QUESTION, steer_prompt=True)
    assert reference.text({"inn": 4.0}, messages=QUESTION, steer_prompt=True) != reference.text(
        {"inn": 4.0}, messages=QUESTION
    )  # steering the prompt changes the text, so a leaked prefix would show


def test_full_queue_gets_503_and_a_dropped_stream_frees_its_slot(single, reference):
    server, url = single
    hook = server.pool.slots[0].steering
    with openai.OpenAI(base_url=url, api_key="unused", max_retries=0, timeout=WAIT_S) as client:
        applied_before = hook.applied_count
        # min_tokens keeps this stream going until the context is full (~220 tokens) unless stopped
        long_stream = client.chat.completions.create(
            model=MODEL_ID, messages=QUESTION, temperature=0, stream=True, extra_body={"min_tokens": N_CTX}
        )
        next(iter(long_stream))
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            queued = pool.submit(chat, client, OTHER_QUESTION, None)
            deadline = time.monotonic() + WAIT_S
            while fetch(f"{url[:-3]}/health")[2]["queued"] != 1:
                assert time.monotonic() < deadline and not queued.done()
                time.sleep(0.05)
            status, headers, body = fetch(f"{url}/chat/completions", json.dumps({"messages": QUESTION}))
            assert status == 503 and headers["retry-after"] == "1"
            error = error_of(body)
            assert error["code"] == "server_busy" and "1 queued (--queue 1)" in error["message"]

            long_stream.close()  # the client goes away mid-stream
            assert queued.result(timeout=WAIT_S) == reference.text({}, messages=OTHER_QUESTION, steer_prompt=True)
        # the dropped generation stopped within a few tokens of the disconnect, not at the context's end
        assert hook.applied_count - applied_before < 100
        health = fetch(f"{url[:-3]}/health")[2]
        assert (health["busy"], health["queued"]) == (0, 0)


def test_start_up_refuses_steers_for_another_model(files, capsys):
    from innsteer.cli.main import main

    d = files["dir"]
    export_steer_gguf(random_inn_steerer(layer=10, model_id="Qwen2.5-0.5B-Instruct"), d / "other.gguf")
    assert main(["serve", "smollm2", "--steer", f"honest={d / 'other.gguf'}", "--port", "0"]) == 2
    message = capsys.readouterr().err
    assert "steer 'honest'" in message and "'Qwen2.5-0.5B-Instruct'" in message

    export_control_vector(LinearSteerer(torch.ones(64), 3, model_id=MODEL_ID), d / "small.gguf", model_hint="llama")
    with pytest.raises(SteerFileError, match="steer 'small'.*hidden size is 576"):
        load_server(MODEL, [("small", str(d / "small.gguf"))], model_id=MODEL_ID, n_ctx=N_CTX)
    export_control_vector(LinearSteerer(torch.ones(SMOLLM_DIM), 3), d / "qwen.gguf", model_hint="qwen2")
    with pytest.raises(SteerFileError, match="'qwen2' model"):
        load_server(MODEL, [("qwen", str(d / "qwen.gguf"))], model_id=MODEL_ID, n_ctx=N_CTX)
    with pytest.raises(ConfigError, match="unknown steer 'cv'"):
        load_server(MODEL, [("inn", files["inn"])], model_id=MODEL_ID, n_ctx=N_CTX, default_steering={"steer": "cv"})
