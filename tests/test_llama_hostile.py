"""Hostile and careless use of the llama.cpp hook and of the steering object (issue 8).

The hook's C API runs in a C++ driver (csrc/llama_hook/hook_api_check.cpp) under AddressSanitizer +
UBSan and ThreadSanitizer. The steering object runs on the real default model; what used to crash
the interpreter runs in a subprocess, so a regression fails its test instead of the session.
References: the same steer through a fresh Llama, llama.cpp without a hook, and fresh completions
from the same tokens.
"""

import importlib.util
import json
import os
import shutil
import struct
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llama

from llama_helpers import SMOLLM_DIM, last_logits, random_inn_steerer  # noqa: E402

from innsteer import SteerFileError  # noqa: E402
from innsteer.hf.models import default_gguf_path  # noqa: E402
from innsteer.llama.bindings import MAX_THREADS, SteerGGUF, SteerHookError  # noqa: E402
from innsteer.llama.export import export_steer_gguf  # noqa: E402
from innsteer.llama.steering import LlamaSteering, SteeredLlama, attach  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "The quick brown fox jumps over the lazy dog. In the morning, the farmer"
STEERED_ALPHA = 6.0


@pytest.fixture(scope="module")
def gguf_path():
    return str(default_gguf_path())


@pytest.fixture(scope="module")
def steer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("steer") / "random.gguf"
    export_steer_gguf(random_inn_steerer(layer=10, alpha=3.0, model_id="test"), path)
    return str(path)


@pytest.fixture(scope="module")
def plain_llm(gguf_path):
    from innsteer.llama.loading import load_llama

    return load_llama(gguf_path, n_ctx=256, n_threads=2, verbose=False)


def steered(gguf_path, steer_file=None, alpha=STEERED_ALPHA):
    return SteeredLlama(gguf_path, steer=steer_file, alpha=alpha, n_ctx=256, n_threads=2)


# ---------------------------------------------------------------------------------------------
# The C API under sanitizers


def _llama_cpp_dirs():
    """The ggml headers and libraries of the installed llama-cpp-python wheel (as setup.py finds them)."""
    package_dir = list(importlib.util.find_spec("llama_cpp").submodule_search_locations)[0]
    return os.path.join(os.path.dirname(package_dir), "include"), os.path.join(package_dir, "lib")


def _compiler_with(sanitizer):
    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        return None
    probe = subprocess.run(
        [compiler, f"-fsanitize={sanitizer}", "-x", "c++", "-", "-o", os.devnull],
        input=b"int main(){}",
        capture_output=True,
    )
    return compiler if probe.returncode == 0 else None


HOOK_SOURCES = ["csrc/llama_hook/hook_api_check.cpp", "csrc/llama_hook/hook.cpp"]
PLAIN_SOURCES = ["csrc/llama_hook/steer_api.cpp", "csrc/llama_hook/steer_file.cpp", "csrc/cpu/gemm_cpu.cpp"]


def _build(compiler, out_dir, flags_for_hook, flags_for_rest, link_flags):
    include_dir, lib_dir = _llama_cpp_dirs()
    objects = []
    for source, flags in [(s, flags_for_hook) for s in HOOK_SOURCES] + [(s, flags_for_rest) for s in PLAIN_SOURCES]:
        obj = out_dir / (os.path.basename(source) + ".o")
        subprocess.run(
            [
                compiler,
                "-std=c++17",
                "-g",
                "-O1",
                "-Wno-psabi",
                *flags,
                "-I",
                include_dir,
                "-c",
                os.path.join(ROOT, source),
                "-o",
                str(obj),
            ],
            check=True,
            capture_output=True,
        )
        objects.append(str(obj))
    binary = out_dir / "hook_api_check"
    subprocess.run(
        [compiler, *link_flags, *objects, "-L", lib_dir, f"-Wl,-rpath,{lib_dir}", "-lggml-base", "-o", str(binary)],
        check=True,
        capture_output=True,
    )
    return binary


@pytest.fixture(scope="module")
def small_steer_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("small") / "small.gguf"
    export_steer_gguf(random_inn_steerer(64, mlp_hidden=32, couplings=2), path)
    return str(path)


@pytest.fixture(scope="module")
def asan_driver(tmp_path_factory):
    compiler = _compiler_with("address")
    if compiler is None:
        pytest.skip("no C++ compiler with AddressSanitizer")
    flags = ["-fsanitize=address,undefined", "-fno-sanitize-recover=all", "-fno-omit-frame-pointer"]
    return _build(compiler, tmp_path_factory.mktemp("asan"), flags, flags, flags)


@pytest.mark.slow  # a sanitizer build
@pytest.mark.parametrize("part", ["ownership", "arguments", "rows", "threads"])
def test_hook_api_under_address_sanitizer(asan_driver, small_steer_file, part):
    """ownership: a steer freed by its caller while two hooks use it still steers exactly like a
    fresh copy (it was a heap-use-after-free); arguments: NULL pointers, entry/layer/thread/row
    counts out of range, non-finite alpha and rows, a second begin before end are refused."""
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    run = subprocess.run(
        [str(asan_driver), small_steer_file, part], capture_output=True, text=True, env=env, timeout=300
    )
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"hook_api_check {part}: 0 failed" in run.stdout


@pytest.mark.slow  # a sanitizer build
def test_hook_api_threads_under_thread_sanitizer(tmp_path, small_steer_file):
    """Entries added and changed from one thread while decodes run in two others: no data race
    (the entries vector used to be read by the callback while hook_add reallocated it)."""
    compiler = _compiler_with("thread")
    if compiler is None:
        pytest.skip("no C++ compiler with ThreadSanitizer")
    # The flow code's ifunc resolvers run before TSan's runtime starts: only the hook is instrumented.
    binary = _build(compiler, tmp_path, ["-fsanitize=thread"], [], ["-fsanitize=thread"])
    run = subprocess.run([str(binary), small_steer_file, "threads"], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0 and "ThreadSanitizer" not in run.stderr, run.stdout[-2000:] + run.stderr[-4000:]
    assert "hook_api_check threads: 0 failed" in run.stdout


# ---------------------------------------------------------------------------------------------
# What crashed the interpreter: in a subprocess


def run_isolated(code, **env):
    """Runs ``code`` in a fresh interpreter with the checkout on its path; returns the last stdout
    line parsed as JSON (the process must exit cleanly)."""
    path = os.pathsep.join([os.path.join(ROOT, "python"), ROOT, os.path.join(ROOT, "tests")])
    # GGML_NO_BACKTRACE: a failed GGML_ASSERT aborts at once instead of forking a debugger that waits
    run = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=600,
        env=dict(os.environ, PYTHONPATH=path, GGML_NO_BACKTRACE="1", **env),
    )
    assert run.returncode == 0, f"exit status {run.returncode}\n{run.stdout[-2000:]}\n{run.stderr[-4000:]}"
    return json.loads(run.stdout.strip().splitlines()[-1])


def test_closing_a_steer_while_attached_keeps_steering(gguf_path, steer_file):
    """SteerGGUF.close() while a hook entry uses the steer: the hook keeps its own reference.
    glibc's MALLOC_PERTURB_ overwrites freed memory, so a hook reading a freed steer gives other
    logits, a hidden-size error or a crash instead of passing by luck."""
    result = run_isolated(
        f"""
        import gc, json
        import numpy as np
        from innsteer.llama.bindings import SteerGGUF
        from innsteer.llama.steering import SteeredLlama
        from llama_helpers import last_logits

        steer = SteerGGUF.load({steer_file!r})
        llm = SteeredLlama({gguf_path!r}, n_ctx=256, n_threads=2)
        llm.steering.add(steer, alpha=3.0)
        tokens = llm.tokenize({PROMPT!r}.encode())
        before = last_logits(llm, tokens)
        steer.close()
        del steer
        gc.collect()
        reuse = [bytearray(4096) for _ in range(256)]  # take the freed chunks back
        after = last_logits(llm, tokens)
        unhooked = llm.steering.disable() or last_logits(llm, tokens)
        print(json.dumps({{"same": bool(np.array_equal(before, after)),
                          "steered": bool(np.abs(before - unhooked).max() > 0.1)}}))
    """,
        MALLOC_PERTURB_="165",
    )
    assert result == {"same": True, "steered": True}


def test_a_closed_llama_refuses_every_steering_call(gguf_path, steer_file):
    """After llm.close() the hook is freed: every method raises a clear error instead of
    dereferencing a NULL hook (segfault)."""
    result = run_isolated(f"""
        import json
        import numpy as np
        from innsteer.llama.steering import SteeredLlama

        llm = SteeredLlama({gguf_path!r}, steer={steer_file!r}, alpha=3.0, n_ctx=256, n_threads=2)
        steering = llm.steering
        llm.close()
        calls = {{
            "applied_count": lambda: steering.applied_count,
            "apply_seconds": lambda: steering.apply_seconds,
            "set_threads": lambda: steering.set_threads(2),
            "set_alpha": lambda: steering.set_alpha(1.0),
            "enable": lambda: steering.enable(),
            "disable": lambda: steering.disable(),
            "steer_from": lambda: steering.steer_from(3),
            "add": lambda: steering.add({steer_file!r}, layer=5),
            "set_control_vector": lambda: steering.set_control_vector({{4: np.ones({SMOLLM_DIM}, np.float32)}}),
            "clear_control_vector": lambda: steering.clear_control_vector(),
            "eval": lambda: llm.eval([1, 2, 3]),  # a closed plain Llama's eval segfaults in llama.cpp
        }}
        outcome = {{}}
        for name, call in calls.items():
            try:
                call()
                outcome[name] = "no error"
            except Exception as error:
                outcome[name] = type(error).__name__ + ": " + str(error)
        print(json.dumps(outcome))
    """)
    for name, outcome in result.items():
        assert outcome == "ConfigError: this Llama was closed: its steering can no longer be used", (name, outcome)


def test_concurrent_evals_on_one_steered_llama_run_one_at_a_time(gguf_path, steer_file):
    """Two threads evaluating with one steered Llama (ctypes releases the GIL in llama_decode)
    used to decode into the same positions; now each eval runs whole, so the cache equals
    evaluating the same chunks one after another."""
    result = run_isolated(f"""
        import json, threading
        import numpy as np
        import llama_cpp
        from innsteer.llama.steering import SteeredLlama

        def open_llm():
            return SteeredLlama({gguf_path!r}, steer={steer_file!r}, alpha=3.0, n_ctx=512, n_threads=1)

        llm = open_llm()
        chunk = llm.tokenize({PROMPT!r}.encode())[:12]
        errors = []

        def work():
            try:
                for _ in range(6):
                    llm.eval(chunk)
            except Exception as error:
                errors.append(repr(error))

        threads = [threading.Thread(target=work) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        logits = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1), shape=(llm.n_vocab(),))
        reference = open_llm()
        for _ in range(12):
            reference.eval(chunk)
        expected = np.ctypeslib.as_array(llama_cpp.llama_get_logits_ith(reference._ctx.ctx, -1),
                                         shape=(llm.n_vocab(),))
        print(json.dumps({{"errors": errors, "n_tokens": llm.n_tokens,
                          "tokens": llm.input_ids[:llm.n_tokens].tolist() == chunk * 12,
                          "logits": bool(np.array_equal(logits, expected))}}))
    """)
    assert result == {"errors": [], "n_tokens": 144, "tokens": True, "logits": True}


# ---------------------------------------------------------------------------------------------
# Steering changes during a streamed completion


def _text(chunk):
    return chunk["choices"][0]["text"]


@pytest.mark.parametrize("change", ["set_alpha", "disable", "add"])
def test_changing_steering_mid_stream_continues_from_the_kept_tokens(gguf_path, steer_file, change):
    """Two tokens into a streamed completion the steering changes: the rest equals a fresh greedy
    completion of the same prompt + two tokens under the new setting (it used to be decoded from
    position 0 with the prompt dropped) and differs from the rest under the old setting."""
    start_alpha, new_alpha = (0.0, STEERED_ALPHA) if change == "add" else (STEERED_ALPHA, 0.0)
    llm = steered(gguf_path, steer_file if change != "add" else None, start_alpha)
    prompt = llm.tokenize(PROMPT.encode())
    uninterrupted = llm.create_completion(prompt, max_tokens=10, temperature=0.0)["choices"][0]["text"]
    stream = llm.create_completion(prompt, max_tokens=10, temperature=0.0, stream=True)
    head = _text(next(stream)) + _text(next(stream))
    {
        "set_alpha": lambda: llm.steering.set_alpha(new_alpha),
        "disable": lambda: llm.steering.disable(),
        "add": lambda: llm.steering.add(steer_file, alpha=new_alpha),
    }[change]()
    rest = "".join(_text(chunk) for chunk in stream)
    kept = llm.input_ids[: len(prompt) + 2].tolist()  # the prompt and the two streamed tokens
    assert llm.detokenize(kept[len(prompt) :]).decode() == head

    reference = steered(gguf_path, steer_file, new_alpha)
    fresh = reference.create_completion(kept, max_tokens=8, temperature=0.0)["choices"][0]["text"]
    assert head + rest != uninterrupted
    assert rest == fresh


def test_a_change_that_changes_nothing_keeps_the_cache(gguf_path, steer_file, plain_llm):
    """The same alpha, enabling an enabled entry, the same start position, clearing no control
    vector: nothing to recompute, so the cache (and a running stream) is left alone."""
    llm = steered(gguf_path, steer_file)
    tokens = llm.tokenize(PROMPT.encode())
    llm.eval(tokens)
    steering = llm.steering
    for call in (
        lambda: steering.set_alpha(STEERED_ALPHA),
        steering.enable,
        lambda: steering.steer_from(0),
        steering.clear_control_vector,
    ):
        before = llm.n_tokens
        call()
        assert llm.n_tokens == before
    steering.disable()
    assert llm.n_tokens == 0  # a real change drops the cache
    steering.set_alpha(1.0)  # alpha of a disabled entry: no effect on outputs
    llm.eval(tokens)
    steering.set_alpha(2.0)
    assert llm.n_tokens == len(tokens)
    assert np.array_equal(last_logits(llm, tokens), last_logits(plain_llm, tokens))


def test_a_failed_reevaluation_ends_the_stream_with_the_error(gguf_path, steer_file):
    """If re-evaluating the kept tokens fails (here: a steer whose l_out layer never appears), the
    stream raises instead of decoding its next token at position 0."""
    import ctypes

    llm = steered(gguf_path, steer_file)
    stream = llm.create_completion(PROMPT, max_tokens=10, temperature=0.0, stream=True)
    next(stream)
    steering = llm.steering
    handle = SteerGGUF.load(steer_file)
    err = ctypes.create_string_buffer(256)
    # an entry the model has no layer for stands in for any failure of the re-evaluation
    assert steering._lib.innsteer_hook_add(steering._hook, handle.handle, 77, 1.0, err, 256) == 1
    with pytest.raises(SteerHookError, match="l_out-77"):
        steering.set_alpha(1.0, entry=0)
    with pytest.raises(SteerHookError, match="re-evaluating its .* tokens failed"):
        next(stream)


# ---------------------------------------------------------------------------------------------
# Leniencies: one clear error each


def test_control_vector_values_are_checked(gguf_path):
    llm = steered(gguf_path)
    steering = llm.steering
    with pytest.raises(ValueError, match="at least one layer's vector"):
        steering.set_control_vector({})  # was "min() arg is an empty sequence"
    bad = np.ones(SMOLLM_DIM, np.float32)
    bad[7] = np.nan
    with pytest.raises(ValueError, match="direction.4 .*NaN or Inf"):
        steering.set_control_vector({4: bad})
    with pytest.raises(ValueError, match="NaN or Inf"):
        steering.set_control_vector({4: np.full(SMOLLM_DIM, np.inf, np.float32)})
    with pytest.raises(ValueError, match="NaN or Inf"):
        steering.set_control_vector({4: np.full(SMOLLM_DIM, 1e30, np.float32)}, strength=1e10)  # inf in float32
    with pytest.raises(SteerFileError, match=r"shape \(\)"):
        steering.set_control_vector({4: np.float32(1.0)})  # was an IndexError
    with pytest.raises(TypeError, match="layers must be integers"):
        steering.set_control_vector({4.5: np.ones(SMOLLM_DIM, np.float32)})  # was silently layer 4
    assert steering._cvec is None


def test_alpha_must_be_a_finite_float32(gguf_path, steer_file):
    steer = SteerGGUF.load(steer_file)
    rows = np.ones((2, SMOLLM_DIM), np.float32)
    for alpha in (float("nan"), float("inf"), 1e39):  # 1e39 is finite in Python, inf in float32
        with pytest.raises(ValueError, match="finite float32"):
            steer.apply(rows, alpha)  # NaN used to come back as NaN rows
    rows[1, 3] = np.inf
    with pytest.raises(RuntimeError, match="NaN or Inf"):
        steer.apply(rows, 1.0)
    llm = steered(gguf_path, steer_file)
    with pytest.raises(ValueError, match="finite float32"):
        llm.steering.set_alpha(1e39)  # the hook refused it while alphas reported 1e39
    with pytest.raises(ValueError, match="finite float32"):
        llm.steering.add(steer_file, alpha=-1e39, layer=4)
    assert llm.steering.alphas == [STEERED_ALPHA]


def test_positions_threads_and_entries_are_checked(gguf_path, steer_file, plain_llm):
    llm = steered(gguf_path, steer_file)
    steering = llm.steering
    tokens = llm.tokenize(PROMPT.encode())
    for position in (2**63, 2**64 + 1, -1):  # 2**63 wrapped to a negative int64 and steered everything
        with pytest.raises(ValueError, match="position must be in 0..2"):
            steering.steer_from(position)
    with pytest.raises(TypeError):
        steering.steer_from(2.5)
    steering.steer_from(2**62)  # the largest accepted: nothing is steered
    assert np.array_equal(last_logits(llm, tokens), last_logits(plain_llm, tokens))
    for n_threads in (0, -2, MAX_THREADS + 1, 2**40):  # 0 was silently 1
        with pytest.raises(ValueError, match="n_threads must be in 1.."):
            steering.set_threads(n_threads)
        with pytest.raises(ValueError, match="n_threads must be in 1.."):
            SteerGGUF.load(steer_file).apply(np.ones((1, SMOLLM_DIM), np.float32), 1.0, n_threads=n_threads)
    with pytest.raises(IndexError):
        steering.set_alpha(1.0, entry=1)
    with pytest.raises(TypeError):
        steering.set_alpha(1.0, entry=0.5)
    with pytest.raises(ValueError, match="cannot steer layer -1"):
        steering.add(steer_file, layer=-1)


def test_the_same_steer_twice_and_a_second_hook_are_refused(gguf_path, steer_file, tmp_path):
    llm = steered(gguf_path, steer_file)
    steering = llm.steering
    with pytest.raises(ValueError, match="already steers layer 10 .*entry 0"):
        llm.steering.add(steer_file)  # would steer layer 10 twice
    copy = tmp_path / "copy.gguf"
    copy.write_bytes(open(steer_file, "rb").read())
    os.link(copy, tmp_path / "link.gguf")
    llm.steering.add(str(copy), layer=10)  # the same bytes from another file: the user's choice
    with pytest.raises(ValueError, match="already steers"):
        llm.steering.add(str(tmp_path / "link.gguf"), layer=10)
    assert llm.steering.add(steer_file, layer=11) == 2  # another layer is fine
    with pytest.raises(ValueError, match="already has innsteer's hook installed"):
        LlamaSteering(llm)  # a second hook would leave llm.steering controlling an uninstalled one
    llm.steering = None
    assert attach(llm) is steering  # found even when the attribute was reassigned


def _with_clamp(data: bytes, clamp: float) -> bytes:
    """The steer file with its float32 key innsteer.clamp set to ``clamp``."""
    key = b"innsteer.clamp"
    at = data.index(struct.pack("<Q", len(key)) + key) + 8 + len(key)
    assert struct.unpack_from("<I", data, at)[0] == 6  # GGUF type float32
    return data[: at + 4] + struct.pack("<f", clamp) + data[at + 8 :]


def test_steer_file_clamp_must_be_in_range(steer_file):
    """A clamp of 3e38 made every steer NaN; the loader accepts only [kMinClamp, kMaxClamp]."""
    data = open(steer_file, "rb").read()
    assert SteerGGUF.from_bytes(_with_clamp(data, 20.0)).alpha == 3.0
    for clamp in (3e38, 20.5, 1e-4, 0.0, -2.0):
        with pytest.raises(SteerFileError, match=r"innsteer.clamp = .* is outside \[0.001, 20\]"):
            SteerGGUF.from_bytes(_with_clamp(data, clamp))
    for clamp in (float("nan"), float("inf")):
        with pytest.raises(SteerFileError, match="innsteer.clamp' is not finite"):
            SteerGGUF.from_bytes(_with_clamp(data, clamp))


def test_steer_file_scaling_must_be_known(steer_file):
    """innsteer.scaling names how alpha lengthens the steer: an unknown one is refused, not steered
    as something else."""
    data = open(steer_file, "rb").read()
    value = struct.pack("<Q", len(b"innsteer.scaling")) + b"innsteer.scaling" + struct.pack("<IQ", 8, 6) + b"latent"
    assert value in data and SteerGGUF.from_bytes(data).meta("scaling") == "latent"
    with pytest.raises(SteerFileError, match="innsteer.scaling is 'linear', not 'latent' or 'displacement'"):
        SteerGGUF.from_bytes(data.replace(value, value[:-6] + b"linear"))


def test_saved_states_load_only_under_the_steering_they_were_computed_with(gguf_path, steer_file, plain_llm):
    """Llama.cache and load_state restore a KV cache: one computed at another alpha used to be
    reused silently (the next completion mixed two settings)."""
    import llama_cpp

    llm = steered(gguf_path, steer_file)
    llm.set_cache(llama_cpp.LlamaRAMCache())
    steered_text = llm.create_completion(PROMPT, max_tokens=6, temperature=0.0)["choices"][0]["text"]
    llm.steering.set_alpha(0.0)
    with pytest.raises(ValueError, match="computed under other steering"):
        llm.create_completion(PROMPT, max_tokens=6, temperature=0.0)
    llm.set_cache(None)
    plain_text = plain_llm.create_completion(PROMPT, max_tokens=6, temperature=0.0)["choices"][0]["text"]
    assert llm.create_completion(PROMPT, max_tokens=6, temperature=0.0)["choices"][0]["text"] == plain_text
    assert plain_text != steered_text

    tokens = llm.tokenize(PROMPT.encode())
    llm.eval(tokens)
    unsteered_state = llm.save_state()
    llm.steering.set_alpha(STEERED_ALPHA)
    last_logits(llm, tokens)
    steered_state = llm.save_state()
    with pytest.raises(ValueError, match="computed under other steering"):
        llm.load_state(unsteered_state)
    llm.load_state(steered_state)  # the same steering: fine
    llm.steering.disable()
    llm.load_state(unsteered_state)  # disabled is unsteered, like the state
    plain_llm.reset()
    plain_llm.eval(tokens[:1])
    llm.load_state(plain_llm.save_state())  # an unhooked Llama's state is unsteered too


def test_steer_from_refuses_batches_that_pack_several_sequences(gguf_path, steer_file):
    """embed() packs several texts in one batch, each from position 0: steer_from(k) used to skip
    the first k rows of the batch (the first text's) and steer every token of the others."""
    llm = SteeredLlama(gguf_path, steer=steer_file, alpha=3.0, n_ctx=256, n_threads=2, embedding=True, verbose=False)
    texts = ["the cat sat on the mat", "a dog ran"]
    llm.steering.steer_from(3)
    with pytest.raises(SteerHookError, match="packs several"):
        llm.embed(texts)
    unsteered_start = np.array(llm.embed([texts[1]])[0])  # one text per batch is fine
    llm.steering.steer_from(0)  # every row steered: no positions needed
    assert len(llm.embed(texts)) == 2
    steered_start = np.array(llm.embed([texts[1]])[0])
    assert np.abs(steered_start - unsteered_start).max() > 1.0


def test_from_bytes_takes_any_bytes_like(steer_file):
    data = open(steer_file, "rb").read()
    for view in (bytearray(data), memoryview(data)):  # ctypes refused these with "wrong type"
        assert SteerGGUF.from_bytes(view).hidden_size == SMOLLM_DIM
