"""Several sequences decoded in one llama.cpp context (``innsteer.llama.batching``), on the real
default model. The reference for every reply is ``SteeredLlama`` with the same steering and
sampling, one request at a time from an empty cache: a sequence's reply must not depend on what
else its steps decode."""

from __future__ import annotations

import ctypes
import threading

import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llama

from llama_helpers import SMOLLM_DIM, random_inn_steerer  # noqa: E402

from innsteer.core.errors import ConfigError  # noqa: E402
from innsteer.hf.models import default_gguf_path, model_id_for  # noqa: E402
from innsteer.llama.batching import BatchedContext  # noqa: E402
from innsteer.llama.bindings import ERR_LEN, NonFiniteLogitsError, SteerGGUF, hook_library  # noqa: E402
from innsteer.llama.export import export_steer_gguf  # noqa: E402
from innsteer.llama.loading import load_llama  # noqa: E402
from innsteer.llama.steering import SteeredLlama  # noqa: E402

MODEL = str(default_gguf_path())
N_CTX = 256
MAX_TOKENS = 12
WAIT_S = 600
QUESTIONS = [
    [{"role": "user", "content": "Name a fruit and its color."}],
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "user", "content": "Write one sentence about the sea."}],
    [{"role": "user", "content": "Count from one to five."}],
]


@pytest.fixture(scope="module")
def steers(tmp_path_factory):
    d = tmp_path_factory.mktemp("batching")
    inn = random_inn_steerer(layer=10, alpha=4.0, seed=0, weight_scale=0.1, model_id=model_id_for(default_gguf_path()))
    export_steer_gguf(inn, d / "inn.gguf")
    vector = (torch.randn(SMOLLM_DIM, generator=torch.Generator().manual_seed(3)) * 2).numpy()
    return {"inn": str(d / "inn.gguf"), "vector": vector, "vector_layer": 12}


@pytest.fixture(scope="module")
def reference(steers):
    llm = SteeredLlama(MODEL, n_ctx=N_CTX, n_threads=1, n_threads_batch=1)
    entry = llm.steering.add(steers["inn"])
    llm.steering.disable()

    def text(messages, inn=0.0, vector=0.0, reply_only=True, **sampling) -> str:
        hook = llm.steering
        hook.disable()
        hook.clear_control_vector()
        hook.steer_from(0)
        if inn:
            hook.set_alpha(inn, entry)
            hook.enable(entry)
        if vector:
            hook.set_control_vector({steers["vector_layer"]: steers["vector"]}, vector)
        if reply_only:
            llm.reset()
            n_prompt = llm.create_chat_completion(messages=messages, max_tokens=1)["usage"]["prompt_tokens"]
            hook.steer_from(n_prompt - 1)
        llm.reset()
        reply = llm.create_chat_completion(messages=messages, max_tokens=MAX_TOKENS, **sampling)
        return reply["choices"][0]["message"]["content"]

    yield text
    llm.close()


@pytest.fixture(scope="module")
def engine(steers):
    host = load_llama(MODEL, n_ctx=N_CTX, n_threads=1, n_threads_batch=1, verbose=False)
    engine = BatchedContext(host, 4)
    engine.inn = engine.add_steer(SteerGGUF.load(steers["inn"]))
    engine.vector = engine.add_vector(steers["vector"], steers["vector_layer"])
    yield engine
    engine.close()
    host.close()


def generate(engine, seq, messages, inn=0.0, vector=0.0, reply_only=True, **sampling) -> str:
    """Sequence ``seq``'s reply under this steering (INN from the last prompt token if ``reply_only``)."""
    llm = engine.sequence(seq)
    alphas = {entry: alpha for entry, alpha in ((engine.inn, inn), (engine.vector, vector)) if alpha}
    start = 0
    if reply_only:  # the prompt's length, as the server learns it in generate
        llm.steering.set({}, 0)
        start = llm.create_chat_completion(messages=messages, max_tokens=1)["usage"]["prompt_tokens"] - 1
    llm.steering.set(alphas, start)
    return llm.create_chat_completion(messages=messages, max_tokens=MAX_TOKENS, **sampling)["choices"][0]["message"][
        "content"
    ]


def in_threads(jobs) -> list:
    """Run every job at once (one thread each, released together); their results in order."""
    barrier = threading.Barrier(len(jobs))
    results: list = [None] * len(jobs)

    def run(i):
        barrier.wait(WAIT_S)
        try:
            results[i] = jobs[i]()
        except Exception as error:  # reported by the test, not lost in the thread
            results[i] = error

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(jobs))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(WAIT_S)
    return results


SETTINGS = [  # (INN alpha, control vector alpha, INN from the last prompt token only)
    (0.0, 0.0, True),
    (4.0, 0.0, True),
    (0.0, 3.0, True),
    (-3.0, 0.0, False),
]


def test_a_batch_mixing_steered_and_unsteered_sequences_gives_each_its_reply_alone(engine, reference):
    expected = [
        reference(QUESTIONS[i], inn=inn, vector=vector, reply_only=reply_only, temperature=0.0)
        for i, (inn, vector, reply_only) in enumerate(SETTINGS)
    ]
    assert len(set(expected)) == len(expected)  # every steering changes the reply: a mix-up would show
    steps, decoded = engine.steps, engine.sequences_decoded
    for _ in range(2):  # the second round starts from the first's caches (a kept prefix, then a change)
        jobs = [
            lambda i=i, s=s: generate(engine, i, QUESTIONS[i], inn=s[0], vector=s[1], reply_only=s[2], temperature=0.0)
            for i, s in enumerate(SETTINGS)
        ]
        assert in_threads(jobs) == expected
    assert engine.sequences_decoded - decoded > 1.5 * (engine.steps - steps)  # the steps really were shared


def test_sampled_replies_equal_llama_cpps_own_sampler(engine, reference):
    """The engine samples from logits it keeps (the context's are the next step's); with a seed the
    reply equals llama.cpp's own sampling from the context, top-k/top-p/penalties included."""
    sampling = {"temperature": 0.9, "top_k": 20, "top_p": 0.9, "repeat_penalty": 1.2, "seed": 11}
    for i, (inn, vector) in enumerate([(0.0, 0.0), (4.0, 0.0), (0.0, 3.0)]):
        # from an empty cache, steering the whole prompt: both decode the prompt in one batch (llama.cpp
        # computes a prefix's last token alone along another path, which moves sampled replies)
        engine.sequence(i).reset()
        want = reference(QUESTIONS[i], inn=inn, vector=vector, reply_only=False, **sampling)
        assert generate(engine, i, QUESTIONS[i], inn=inn, vector=vector, reply_only=False, **sampling) == want


def test_a_prompt_longer_than_a_step_is_decoded_in_chunks(steers):
    long_question = [{"role": "user", "content": "Repeat: " + "the sea is blue and wide, " * 90}]
    host = load_llama(MODEL, n_ctx=1024, n_threads=1, n_threads_batch=1, verbose=False)
    llm = SteeredLlama(MODEL, n_ctx=1024, n_threads=1, n_threads_batch=1)
    try:
        engine = BatchedContext(host, 2)
        try:
            want = llm.create_chat_completion(messages=long_question, max_tokens=6, temperature=0.0)
            assert want["usage"]["prompt_tokens"] > 512  # more than one step's rows
            jobs = [
                lambda: engine.sequence(0).create_chat_completion(messages=long_question, max_tokens=6, temperature=0),
                lambda: engine.sequence(1).create_chat_completion(messages=QUESTIONS[0], max_tokens=24, temperature=0),
            ]
            long_reply, short_reply = in_threads(jobs)
            assert long_reply["choices"][0]["message"] == want["choices"][0]["message"]
            llm.reset()
            short = llm.create_chat_completion(messages=QUESTIONS[0], max_tokens=24, temperature=0.0)
            assert short_reply["choices"][0]["message"] == short["choices"][0]["message"]
        finally:
            engine.close()
    finally:
        llm.close()
        host.close()


def test_a_sequence_whose_logits_overflow_fails_alone(engine, reference):
    """NaN logits end that sequence's request with an error; the sequence batched with it goes on."""
    jobs = [
        lambda: generate(engine, 0, QUESTIONS[0], inn=3e38, temperature=0.0),
        lambda: generate(engine, 1, QUESTIONS[1], inn=4.0, temperature=0.0),
    ]
    failed, fine = in_threads(jobs)
    assert isinstance(failed, NonFiniteLogitsError), failed
    assert fine == reference(QUESTIONS[1], inn=4.0, temperature=0.0)
    assert generate(engine, 0, QUESTIONS[0], temperature=0.0) == reference(QUESTIONS[0], temperature=0.0)


def test_a_steering_change_keeps_the_positions_before_it(engine):
    llm = engine.sequence(2)
    llm.steering.set({}, 0)
    llm.create_chat_completion(messages=QUESTIONS[2], max_tokens=4, temperature=0.0)
    n_tokens = llm.n_tokens
    llm.steering.set({engine.inn: 2.0}, 20)
    assert llm.n_tokens == 19  # kept up to the start, less the token evaluated with the first steered one
    llm.steering.set({engine.inn: 2.0, engine.vector: 1.0}, 20)
    assert llm.n_tokens == 0  # a control vector steers every position
    assert n_tokens > 20


def test_entries_and_row_alphas_are_checked(engine):
    with pytest.raises(ConfigError, match="hidden size is 576"):
        engine.add_vector(np.ones(8, dtype=np.float32), 3)
    with pytest.raises(ConfigError, match="layers 1..29"):
        engine.add_vector(np.ones(SMOLLM_DIM, dtype=np.float32), 0)
    with pytest.raises(IndexError, match="no entry 7"):
        engine.sequence(3).steering.set({7: 1.0})
    with pytest.raises(IndexError, match="no sequence 4"):
        engine.sequence(4)
    with pytest.raises(ConfigError, match="cannot be saved"):
        engine.sequence(3).save_state()

    lib = hook_library()
    hook = lib.innsteer_hook_new()
    err = ctypes.create_string_buffer(ERR_LEN)
    try:
        nan = np.full(SMOLLM_DIM, np.nan, dtype=np.float32)
        as_floats = ctypes.POINTER(ctypes.c_float)
        assert lib.innsteer_hook_add_vector(hook, nan.ctypes.data_as(as_floats), SMOLLM_DIM, 3, 1.0, err, ERR_LEN) < 0
        assert b"NaN" in err.value
        ones = np.ones(SMOLLM_DIM, dtype=np.float32)
        assert lib.innsteer_hook_add_vector(hook, ones.ctypes.data_as(as_floats), 0, 3, 1.0, err, ERR_LEN) < 0
        assert lib.innsteer_hook_add_vector(hook, ones.ctypes.data_as(as_floats), SMOLLM_DIM, 3, 1.0, err, ERR_LEN) == 0
        alphas = np.zeros((2, 2), dtype=np.float32)
        assert lib.innsteer_hook_begin_rows(hook, alphas.ctypes.data_as(as_floats), 2, 2, err, ERR_LEN)
        assert b"alphas for 2 entries, but the hook has 1" in err.value
        alphas[0, 0] = np.inf
        assert lib.innsteer_hook_begin_rows(hook, alphas.ctypes.data_as(as_floats), 2, 1, err, ERR_LEN)
        assert b"NaN or Inf" in err.value
        assert lib.innsteer_hook_begin_rows(hook, alphas.ctypes.data_as(as_floats), -1, 1, err, ERR_LEN)
        alphas[0, 0] = 1.0
        assert lib.innsteer_hook_begin_rows(hook, alphas.ctypes.data_as(as_floats), 2, 1, err, ERR_LEN) == 0
        assert lib.innsteer_hook_begin_rows(hook, alphas.ctypes.data_as(as_floats), 2, 1, err, ERR_LEN)
        assert b"another decode" in err.value  # one call at a time
        assert lib.innsteer_hook_add_vector(hook, ones.ctypes.data_as(as_floats), SMOLLM_DIM, 4, 1.0, err, ERR_LEN) < 0
        assert lib.innsteer_hook_end(hook, err, ERR_LEN) == 0  # nothing was decoded
    finally:
        lib.innsteer_hook_free(hook)


def test_a_step_that_raises_fails_its_requests_and_the_engine_goes_on(engine, reference, monkeypatch):
    """Was not guarded: an exception in the engine's thread would leave every later eval waiting forever."""
    step = engine._step

    def broken(requests):
        monkeypatch.setattr(engine, "_step", step)  # only the first step fails
        raise RuntimeError("a broken step")

    monkeypatch.setattr(engine, "_step", broken)
    with pytest.raises(RuntimeError, match="a broken step"):
        generate(engine, 0, QUESTIONS[0], reply_only=False, temperature=0.0)
    assert generate(engine, 0, QUESTIONS[0], temperature=0.0) == reference(QUESTIONS[0], temperature=0.0)
