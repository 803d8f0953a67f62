"""Loading a GGUF into llama-cpp-python so that it runs everywhere: on CPUs where llama.cpp built its
AMX kernels, which crash the process on any batch of two or more tokens, the weights stay out of
the AMX buffer type."""

from __future__ import annotations

import contextlib
import threading

from .bindings import INSTALL_HINT

try:
    import llama_cpp
except ImportError as _error:  # optional dependency
    raise ImportError(INSTALL_HINT) from _error


_MODEL_DEFAULTS_LOCK = threading.Lock()


def amx_kernels_built() -> bool:
    """Whether this llama.cpp build has its AMX matmul kernels (a native build on a CPU with AMX)."""
    return b"AMX_INT8 = 1" in llama_cpp.llama_print_system_info()


@contextlib.contextmanager
def weights_in_plain_cpu_buffers():
    """Where llama.cpp has AMX kernels, make the Llama built inside keep its weights out of the AMX
    buffer type (``use_extra_bufts = False``). Those kernels crash the process on any batch of two
    or more tokens (seen with llama-cpp-python 0.3.36 on a Sapphire Rapids host; llama.cpp issue
    #20824, open), and ``Llama()`` has no option for it: it takes its model parameters from
    ``llama_model_default_params``, which is wrapped for the duration."""
    if not amx_kernels_built():
        yield
        return
    module = llama_cpp.llama_cpp  # the module whose defaults Llama.__init__ reads
    defaults = module.llama_model_default_params

    def without_extra_buffer_types():
        params = defaults()
        params.use_extra_bufts = False
        return params

    with _MODEL_DEFAULTS_LOCK:
        module.llama_model_default_params = without_extra_buffer_types
        try:
            yield
        finally:
            module.llama_model_default_params = defaults


def load_llama(model_path: str, **llama_kwargs) -> llama_cpp.Llama:
    """``llama_cpp.Llama(model_path, **llama_kwargs)`` that also runs on CPUs with AMX (see
    ``weights_in_plain_cpu_buffers``); ``attach`` steering to it, or use ``SteeredLlama``."""
    with weights_in_plain_cpu_buffers():
        return llama_cpp.Llama(model_path, **llama_kwargs)
