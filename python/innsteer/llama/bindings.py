"""ctypes bindings of innsteer's native llama.cpp hook (innsteer_ext/_llama_hook*.so, built from
csrc/llama_hook by setup.py when llama-cpp-python is installed) and ``SteerGGUF``, a steer file
loaded and validated by its C loader. Needs no llama-cpp-python import of its own."""

from __future__ import annotations

import ctypes
import glob
import importlib.util
import operator
import os
from typing import Optional, Union

import numpy as np

from ..core.errors import ConfigError, InnsteerError, SteerFileError

__all__ = [
    "SteerGGUF",
    "SteerHookError",
    "NonFiniteLogitsError",
    "hook_library",
    "ERR_LEN",
    "MAX_THREADS",
    "float32_alpha",
    "thread_count",
]

# What an import of llama-cpp-python that fails says (the llama.cpp parts are an optional extra).
INSTALL_HINT = (
    "innsteer's llama.cpp support needs llama-cpp-python 0.3.36: `pip install 'innsteer[llama]'` "
    "(or `pip install llama-cpp-python==0.3.36`), then rebuild innsteer "
    "(`pip install --no-build-isolation -e .`) so its llama.cpp hook is compiled"
)
ERR_LEN = 1024
MAX_THREADS = 256  # INNSTEER_MAX_THREADS in csrc/llama_hook/innsteer_llama_hook.h
_lib = None


class SteerHookError(InnsteerError, RuntimeError):
    """The native hook failed during a llama.cpp call (its logits must not be used)."""


class NonFiniteLogitsError(SteerHookError):
    """A decode gave NaN or Inf logits (steering too strong for the model): nothing can be sampled.
    A finite alpha can still overflow the flow or the layers after it; sampling from NaN logits
    would end the reply silently, as if the model had stopped."""

    def __init__(self):
        super().__init__("the model's logits are NaN or Inf under this steering: an alpha is too large for this model")


def hook_library() -> ctypes.CDLL:
    """The compiled hook (innsteer_ext/_llama_hook*.so), loaded once with its C signatures."""
    global _lib
    if _lib is not None:
        return _lib
    spec = importlib.util.find_spec("innsteer_ext")  # locates the package without loading torch's extension
    dirs = list(spec.submodule_search_locations) if spec and spec.submodule_search_locations else []
    candidates = [p for d in dirs for p in glob.glob(os.path.join(d, "_llama_hook*.so"))]
    if not candidates:
        raise ImportError(
            "innsteer's llama.cpp hook is not built (no innsteer_ext/_llama_hook*.so): it is compiled only "
            "when llama-cpp-python==0.3.36 is installed before innsteer. Install it, then rebuild innsteer "
            "with `pip install --no-build-isolation -e .` (or `python setup.py build_ext --inplace`)"
        )
    lib = ctypes.CDLL(candidates[0])
    c = ctypes
    steer_p, hook_p, err_t = c.c_void_p, c.c_void_p, c.c_char_p
    signatures = {
        "innsteer_steer_load_file": ([c.c_char_p, err_t, c.c_size_t], steer_p),
        "innsteer_steer_load_buffer": ([c.c_char_p, c.c_size_t, err_t, c.c_size_t], steer_p),
        "innsteer_steer_free": ([steer_p], None),
        "innsteer_steer_hidden_size": ([steer_p], c.c_int64),
        "innsteer_steer_layer": ([steer_p], c.c_int32),
        "innsteer_steer_alpha": ([steer_p], c.c_float),
        "innsteer_steer_num_couplings": ([steer_p], c.c_int64),
        "innsteer_steer_mlp_hidden": ([steer_p], c.c_int64),
        "innsteer_steer_bf16_weights": ([steer_p], c.c_bool),
        "innsteer_steer_meta": ([steer_p, c.c_char_p], c.c_char_p),
        "innsteer_steer_apply": ([steer_p, c.c_void_p, c.c_int64, c.c_float, c.c_int, err_t, c.c_size_t], c.c_int),
        "innsteer_hook_new": ([], hook_p),
        "innsteer_hook_free": ([hook_p], None),
        "innsteer_hook_add": ([hook_p, steer_p, c.c_int32, c.c_float, err_t, c.c_size_t], c.c_int),
        "innsteer_hook_add_vector": (
            [hook_p, c.POINTER(c.c_float), c.c_int64, c.c_int32, c.c_float, err_t, c.c_size_t],
            c.c_int,
        ),
        "innsteer_hook_set_alpha": ([hook_p, c.c_int, c.c_float], c.c_int),
        "innsteer_hook_set_enabled": ([hook_p, c.c_int, c.c_bool], c.c_int),
        "innsteer_hook_set_threads": ([hook_p, c.c_int], c.c_int),
        "innsteer_hook_set_split_tile": ([hook_p, c.c_bool], c.c_int),
        "innsteer_hook_applied_count": ([hook_p], c.c_int64),
        "innsteer_hook_apply_seconds": ([hook_p], c.c_double),
        "innsteer_hook_begin": ([hook_p, c.c_int64], c.c_int),
        "innsteer_hook_begin_rows": (
            [hook_p, c.POINTER(c.c_float), c.c_int64, c.c_int64, err_t, c.c_size_t],
            c.c_int,
        ),
        "innsteer_hook_end": ([hook_p, err_t, c.c_size_t], c.c_int),
    }
    for name, (argtypes, restype) in signatures.items():
        fn = getattr(lib, name)
        fn.argtypes, fn.restype = argtypes, restype
    _lib = lib
    return lib


def float32_alpha(alpha: float) -> float:
    """``alpha`` as the hook stores it (a float32), refusing what is not finite there (NaN, inf, 1e39)."""
    value = float(alpha)
    with np.errstate(over="ignore"):
        single = np.float32(value)
    if not np.isfinite(single):
        raise ConfigError(f"alpha must be a finite float32 value, got {alpha}")
    return float(single)


def signed_alpha(alpha: float, sign: int) -> float:
    """The alpha an entry that steers only at one sign of alpha runs (``sign`` 1: alpha > 0 only,
    -1: alpha < 0 only, 0: both): the two maps of a signed steerer are two entries at one layer,
    each given the request's alpha, and exactly one of them runs."""
    if sign not in (-1, 0, 1):
        raise ValueError(f"an entry's sign must be -1, 0 or 1, got {sign!r}")
    return alpha if sign * alpha >= 0 else 0.0


def thread_count(n_threads: int) -> int:
    """``n_threads`` checked against the hook's range 1..MAX_THREADS."""
    n = operator.index(n_threads)
    if not 1 <= n <= MAX_THREADS:
        raise ConfigError(f"n_threads must be in 1..{MAX_THREADS}, got {n_threads}")
    return n


class SteerGGUF:
    """A steer GGUF loaded and validated by the C loader (every size and index bounds-checked).

    The C steer is reference-counted: ``close()`` drops this object's reference, and hooks that use
    the steer keep theirs, so closing it while attached is safe."""

    def __init__(self, handle: int, source: str):
        self._lib = hook_library()
        self._handle = handle
        self.source = source

    @classmethod
    def load(cls, path: Union[str, os.PathLike]) -> SteerGGUF:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(f"no steer file at {path}")
        lib, err = hook_library(), ctypes.create_string_buffer(ERR_LEN)
        handle = lib.innsteer_steer_load_file(os.fsencode(path), err, ERR_LEN)
        if not handle:
            raise SteerFileError(f"{path}: {err.value.decode(errors='replace')}")
        return cls(handle, path)

    @classmethod
    def from_bytes(cls, data: bytes, source: str = "<bytes>") -> SteerGGUF:
        data = bytes(data)  # also bytearray and memoryview, which ctypes' char* refuses
        lib, err = hook_library(), ctypes.create_string_buffer(ERR_LEN)
        handle = lib.innsteer_steer_load_buffer(data, len(data), err, ERR_LEN)
        if not handle:
            raise SteerFileError(f"{source}: {err.value.decode(errors='replace')}")
        return cls(handle, source)

    def close(self) -> None:
        if getattr(self, "_handle", None):  # also when __init__ never ran to the end
            self._lib.innsteer_steer_free(self._handle)
            self._handle = None

    def __del__(self):
        self.close()

    @property
    def handle(self) -> int:
        if not self._handle:
            raise ConfigError(f"steer file {self.source} is closed")
        return self._handle

    hidden_size = property(lambda self: int(self._lib.innsteer_steer_hidden_size(self.handle)))
    layer = property(lambda self: int(self._lib.innsteer_steer_layer(self.handle)))
    alpha = property(lambda self: float(self._lib.innsteer_steer_alpha(self.handle)))
    num_couplings = property(lambda self: int(self._lib.innsteer_steer_num_couplings(self.handle)))
    mlp_hidden = property(lambda self: int(self._lib.innsteer_steer_mlp_hidden(self.handle)))
    bf16_weights = property(lambda self: bool(self._lib.innsteer_steer_bf16_weights(self.handle)))

    def meta(self, key: str) -> str:
        value = self._lib.innsteer_steer_meta(self.handle, key.encode())
        if value is None:
            raise KeyError(key)
        return value.decode(errors="replace")

    def apply(self, rows: np.ndarray, alpha: Optional[float] = None, n_threads: int = 1) -> np.ndarray:
        """What the hook does to l_out, on float32 rows [n, hidden_size]: returns the steered copy."""
        out = np.array(rows, dtype=np.float32, order="C", copy=True)
        if out.ndim != 2 or out.shape[1] != self.hidden_size:
            raise ConfigError(f"rows must have shape [n, {self.hidden_size}], got {out.shape}")
        alpha = self.alpha if alpha is None else float32_alpha(alpha)
        n_threads = thread_count(n_threads)
        err = ctypes.create_string_buffer(ERR_LEN)
        if self._lib.innsteer_steer_apply(self.handle, out.ctypes.data, out.shape[0], alpha, n_threads, err, ERR_LEN):
            raise SteerHookError(err.value.decode(errors="replace"))
        return out
