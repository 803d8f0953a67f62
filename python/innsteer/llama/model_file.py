"""What a GGUF model file says about itself, read from its header before llama.cpp loads it.

llama.cpp allocates a context's KV cache before anything compares the context size with the
model's training context, and answers a file that is not a model (a steer GGUF, a control vector,
random bytes) with a bare ``ValueError`` or worse: both are checked here first, from the header
alone (``gguf`` memory-maps the file; no tensor data is read).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Optional

from ..core.errors import ConfigError, MissingFileError, SteerFileError

# general.architecture of the GGUFs innsteer writes (llama/export.py): steers, not models
NOT_MODELS = {"innsteer": "an innsteer steer GGUF", "controlvector": "a llama.cpp control vector"}
KV_BYTES = 2  # llama.cpp's default KV cache type is f16


class ModelFileError(ConfigError):
    """A file given as the model that llama.cpp cannot serve."""


@dataclass(frozen=True)
class ModelInfo:
    path: str
    architecture: str
    context_length: Optional[int]  # ARCH.context_length: the context the model was trained with
    n_layer: Optional[int]
    n_embd: Optional[int]
    n_head: Optional[int]
    n_head_kv: Optional[int]

    def kv_cache_bytes(self, n_ctx: int) -> Optional[int]:
        """The f16 KV cache of one context of ``n_ctx`` tokens (keys and values of every layer), if
        the header gives the sizes."""
        if not (self.n_layer and self.n_embd and self.n_head):
            return None
        kv_width = self.n_embd * (self.n_head_kv or self.n_head) // self.n_head
        return 2 * n_ctx * self.n_layer * kv_width * KV_BYTES


def is_gguf(path: str | os.PathLike) -> bool:
    """Whether the file at ``path`` starts with GGUF's magic (needs neither gguf nor llama.cpp)."""
    with open(path, "rb") as handle:
        return handle.read(4) == b"GGUF"


def gguf_architecture(path: str | os.PathLike) -> Optional[str]:
    """A GGUF file's ``general.architecture`` (None if it has none); SteerFileError if unreadable."""
    import gguf

    try:
        field = gguf.GGUFReader(path).fields.get("general.architecture")
    except Exception as error:  # gguf raises ValueError/struct.error/IndexError on damaged files
        raise SteerFileError(f"{path} is not a readable GGUF file ({type(error).__name__}: {error})") from error
    return None if field is None else str(field.contents())


def read_model_info(path: str | os.PathLike) -> ModelInfo:
    """The header of the GGUF model at ``path``; raises ModelFileError naming what the file is instead."""
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"no model file at {path}")
    if not is_gguf(path):
        raise ModelFileError(f"{path} is not a GGUF model file")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # gguf raises ValueError/struct.error/IndexError on damaged files
        raise ModelFileError(f"{path} is not a readable GGUF file ({type(error).__name__}: {error})") from None
    fields = reader.fields

    def value(key: str):
        field = fields.get(key)
        try:
            return None if field is None else field.contents()
        except Exception:  # a field of an unexpected type reads as absent
            return None

    arch = value("general.architecture")
    if not isinstance(arch, str) or not arch:
        raise ModelFileError(f"{path} is a GGUF file without general.architecture: not a model")
    if arch in NOT_MODELS:
        raise ModelFileError(f"{path} is {NOT_MODELS[arch]}, not a model (pass it with --steer)")
    split = value("split.count")  # a model split into several files: this one may hold other tensors
    if not (isinstance(split, int) and split > 1) and not any(t.name.startswith("token_embd") for t in reader.tensors):
        raise ModelFileError(f"{path} has no token embedding tensor: not a model llama.cpp can load")

    def integer(key: str) -> Optional[int]:
        found = value(f"{arch}.{key}")
        if isinstance(found, list):  # per-layer head counts: the largest bounds the cache
            found = max(found) if found else None
        return int(found) if isinstance(found, int) and not isinstance(found, bool) and found > 0 else None

    return ModelInfo(
        path=path,
        architecture=arch,
        context_length=integer("context_length"),
        n_layer=integer("block_count"),
        n_embd=integer("embedding_length"),
        n_head=integer("attention.head_count"),
        n_head_kv=integer("attention.head_count_kv"),
    )


def available_memory() -> Optional[int]:
    """MemAvailable from /proc/meminfo, in bytes (None where there is no such file)."""
    try:
        with open("/proc/meminfo") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def check_context(info: ModelInfo, n_ctx: int, contexts: int = 1, option: str = "--ctx-size") -> None:
    """Refuse a context larger than the model's training context, or whose KV caches (``contexts``
    of them) would not fit the memory available now, before llama.cpp allocates them."""
    if info.context_length is not None and n_ctx > info.context_length:
        raise ConfigError(
            f"{option} {n_ctx} exceeds the model's training context of {info.context_length} tokens ({info.path})"
        )
    per_context = info.kv_cache_bytes(n_ctx)
    free = available_memory()
    if per_context is not None and free is not None and per_context * contexts > free:
        raise ConfigError(
            f"{option} {n_ctx} needs {per_context * contexts / 2**30:.1f} GiB of KV cache for {contexts} context(s), "
            f"but only {free / 2**30:.1f} GiB of memory is available"
        )
