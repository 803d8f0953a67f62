"""The C steer-file loader on damaged input: a clear SteerFileError, never a crash.

Crafted damage (truncation, wrong version/kind, NaN, bad partitions), a seeded random-mutation
loop through the Python binding, and the same loader built with AddressSanitizer + UBSan running
a C++ mutation loop (csrc/llama_hook/fuzz_loader.cpp).
"""

import os
import random
import shutil
import subprocess
import time

import gguf
import numpy as np
import pytest
import torch

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.llama

from llama_helpers import random_inn_steerer  # noqa: E402

import innsteer.llama.export as export_module  # noqa: E402
from innsteer import SteerFileError  # noqa: E402
from innsteer.core.steerers import LinearSteerer  # noqa: E402
from innsteer.llama.bindings import SteerGGUF  # noqa: E402
from innsteer.llama.export import export_control_vector, export_steer_gguf  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def tiny_steer_bytes(tmp_path, name="seed.gguf", **kwargs) -> bytes:
    path = tmp_path / name
    export_steer_gguf(random_inn_steerer(8, mlp_hidden=4, couplings=2), path, **kwargs)
    return path.read_bytes()


def test_valid_tiny_file_loads(tmp_path):
    steer = SteerGGUF.from_bytes(tiny_steer_bytes(tmp_path))
    assert (steer.hidden_size, steer.num_couplings, steer.mlp_hidden) == (8, 2, 4)


@pytest.mark.parametrize("cut", [0, 3, 4, 20, 100, 400, 900, -200, -1])
def test_truncated_file(tmp_path, cut):
    data = tiny_steer_bytes(tmp_path)
    with pytest.raises(SteerFileError, match="magic|truncated|past the end|exceeds"):
        SteerGGUF.from_bytes(data[:cut])


def test_not_gguf(tmp_path):
    safetensors_file = tmp_path / "steer.safetensors"
    random_inn_steerer(8, mlp_hidden=4).save(safetensors_file)
    with pytest.raises(SteerFileError, match="bad magic"):
        SteerGGUF.load(safetensors_file)
    with pytest.raises(FileNotFoundError):
        SteerGGUF.load(tmp_path / "missing.gguf")


def test_wrong_format_version(tmp_path, monkeypatch):
    monkeypatch.setattr(export_module, "STEER_FORMAT_VERSION", 2)
    with pytest.raises(SteerFileError, match="steer format version 2; this library reads version 1"):
        SteerGGUF.from_bytes(tiny_steer_bytes(tmp_path))


def test_control_vector_is_not_a_steer_file(tmp_path):
    path = tmp_path / "cv.gguf"
    export_control_vector(LinearSteerer(torch.ones(8), 3), path)
    with pytest.raises(SteerFileError, match="control vector"):
        SteerGGUF.load(path)


def with_tensor_value(tmp_path, tensor: str, index: int, value) -> bytes:
    """A valid tiny steer file with element ``index`` of ``tensor`` overwritten in place (the
    exporter refuses to write such files, so the damage is done to the bytes)."""
    data = bytearray(tiny_steer_bytes(tmp_path))
    info = next(t for t in gguf.GGUFReader(tmp_path / "seed.gguf").tensors if t.name == tensor)
    item = np.array([value], dtype=info.data.dtype).tobytes()
    start = int(info.data_offset) + index * len(item)
    data[start : start + len(item)] = item
    return bytes(data)


def test_nan_weights_and_bad_partitions(tmp_path):
    with pytest.raises(SteerFileError, match="coupling.1.w2' contains NaN"):
        SteerGGUF.from_bytes(with_tensor_value(tmp_path, "coupling.1.w2", 0, np.nan))
    cond_idx = next(t for t in gguf.GGUFReader(tmp_path / "seed.gguf").tensors if t.name == "coupling.0.cond_idx")
    with pytest.raises(SteerFileError, match="appears twice"):  # its first index repeated
        SteerGGUF.from_bytes(with_tensor_value(tmp_path, "coupling.0.cond_idx", 1, int(cond_idx.data[0])))
    with pytest.raises(SteerFileError, match="'scale' must be positive"):
        SteerGGUF.from_bytes(with_tensor_value(tmp_path, "scale", 3, 0.0))


def test_random_mutations_never_crash(tmp_path):
    """Thousands of mutated files through the Python binding, bounded to ~15 s."""
    seeds = [tiny_steer_bytes(tmp_path), tiny_steer_bytes(tmp_path, "bf16.gguf", weight_dtype="bfloat16")]
    rng = random.Random(1234)
    deadline = time.monotonic() + 15
    loaded = rejected = 0
    for i in range(5000):
        if time.monotonic() > deadline and i >= 1000:
            break
        data = bytearray(seeds[i % 2])
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(min(len(data), 1024) if rng.random() < 0.8 else len(data))
            kind = rng.randrange(4)
            if kind == 0:
                data[pos] ^= 1 << rng.randrange(8)
            elif kind == 1:
                data[pos] = rng.randrange(256)
            elif kind == 2:
                value = rng.choice([0, 1, 0xFF, 0x7FFFFFFF, 0xFFFFFFFF, 2**63 - 1, 2**64 - 1, len(data)])
                chunk = value.to_bytes(8, "little")[: len(data) - pos]
                data[pos : pos + len(chunk)] = chunk
            else:
                del data[pos:]
                if not data:
                    break
        try:
            steer = SteerGGUF.from_bytes(bytes(data))
        except SteerFileError as error:
            assert str(error)  # a message, not an empty exception
            rejected += 1
            continue
        loaded += 1
        steer.apply(np.ones((2, steer.hidden_size), np.float32), 1.0)
    assert rejected > 500 and loaded > 10, (loaded, rejected)


def _asan_compiler():
    compiler = shutil.which("g++") or shutil.which("clang++")
    if compiler is None:
        return None
    probe = subprocess.run(
        [compiler, "-fsanitize=address", "-x", "c++", "-", "-o", os.devnull], input=b"int main(){}", capture_output=True
    )
    return compiler if probe.returncode == 0 else None


@pytest.mark.slow  # a sanitizer build
def test_loader_fuzz_under_address_sanitizer(tmp_path):
    compiler = _asan_compiler()
    if compiler is None:
        pytest.skip("no C++ compiler with AddressSanitizer")
    binary = tmp_path / "fuzz_loader"
    sources = [
        "csrc/llama_hook/fuzz_loader.cpp",
        "csrc/llama_hook/steer_api.cpp",
        "csrc/llama_hook/steer_file.cpp",
        "csrc/cpu/gemm_cpu.cpp",
    ]
    subprocess.run(
        [
            compiler,
            "-std=c++17",
            "-g",
            "-O1",
            "-fsanitize=address,undefined",
            "-fno-sanitize-recover=all",
            "-fno-omit-frame-pointer",
            *[os.path.join(ROOT, s) for s in sources],
            "-o",
            str(binary),
        ],
        check=True,
        capture_output=True,
    )
    (tmp_path / "seed.gguf").write_bytes(tiny_steer_bytes(tmp_path))
    (tmp_path / "bf16.gguf").write_bytes(tiny_steer_bytes(tmp_path, "bf16.gguf", weight_dtype="bfloat16"))
    export_steer_gguf(random_inn_steerer(64, mlp_hidden=32), tmp_path / "wide.gguf")
    env = dict(os.environ, ASAN_OPTIONS="detect_leaks=1:abort_on_error=0", UBSAN_OPTIONS="print_stacktrace=1")
    for i, (seed, iterations) in enumerate((("seed.gguf", 40000), ("bf16.gguf", 20000), ("wide.gguf", 2000))):
        run = subprocess.run(
            [str(binary), str(tmp_path / seed), str(iterations), str(i + 1)],
            capture_output=True,
            text=True,
            env=env,
            timeout=300,
        )
        assert run.returncode == 0, run.stderr[-3000:]
        assert "ERROR: AddressSanitizer" not in run.stderr and "runtime error" not in run.stderr, run.stderr[-3000:]
        assert f"{iterations} inputs" in run.stdout
