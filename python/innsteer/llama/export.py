"""Export steerers as GGUF files for llama.cpp.

Two formats:

* ``innsteer`` (default): the whole INN steerer (standardization, every coupling's partition and
  weights, clamp, MLP width, layer, latent direction, default alpha, model hint), read by the native
  hook in ``innsteer.llama.steering``. Weights can be stored as bfloat16 (half the bytes per token).
* ``controlvector``: the stock llama.cpp control-vector file (``llama-cli --control-vector``) for
  linear steerers: one float32 tensor ``direction.L`` per steered layer.

Layer indices: innsteer's ``layer=L`` is decoder layer L's output, which llama.cpp names ``l_out-L``
(= Hugging Face ``hidden_states[L + 1]``); a control vector's ``direction.L`` is added there.
"""

from __future__ import annotations

import os
from typing import Any, Optional

import numpy as np
import torch

from ..core.errors import ConfigError, MissingFileError, SteerFileError
from ..core.steerers import LinearSteerer, Steerer, SteererBase, load_steerer

STEER_FORMAT_VERSION = 1  # innsteer.format_version; the C loader (csrc/llama_hook) reads exactly this
FORMATS = ("innsteer", "controlvector")
WEIGHT_DTYPES = ("float32", "bfloat16")


def _model_hint(steerer: SteererBase, model_hint: Optional[str]) -> str:
    """The architecture the steerer is for (llama.cpp's general.architecture, e.g. 'llama'): given,
    recorded in the steerer, or read from the default GGUF when the steerer was trained on it."""
    if model_hint is not None:
        return model_hint
    extra = getattr(steerer, "extra", None) or {}
    if extra.get("architecture"):
        return str(extra["architecture"])
    from ..hf.models import ModelLoadError, default_gguf_path, model_id_for

    try:
        path = default_gguf_path()
    except ModelLoadError:
        return ""
    if model_id_for(path) != getattr(steerer, "model_id", None):
        return ""
    import gguf

    field = gguf.GGUFReader(path).fields.get("general.architecture")
    return str(field.contents()) if field is not None else ""


def _f32(t: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(t.detach().to(torch.float32).cpu().numpy())


def _bf16_bits(t: torch.Tensor) -> np.ndarray:
    """bfloat16 values as uint16 bit patterns (gguf stores BF16 raw); rounding as torch's cast."""
    return np.ascontiguousarray(t.detach().to(torch.bfloat16).cpu().view(torch.int16).numpy().view(np.uint16))


def export_steer_gguf(
    steerer: Steerer, path: str | os.PathLike, *, weight_dtype: str = "float32", model_hint: Optional[str] = None
) -> None:
    """Write an INN steerer as an innsteer steer GGUF (see the module docstring)."""
    import gguf

    if not isinstance(steerer, Steerer):
        raise ConfigError(
            f"a {steerer.method} steerer ({type(steerer).__name__}) is not an INN steerer; "
            "linear steerers export with --format controlvector (format='controlvector')"
        )
    if weight_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    if steerer.layer < 0:
        raise ConfigError(f"steerer layer {steerer.layer} is negative; export needs the absolute layer index")
    inn = steerer.inn
    config = inn.config
    writer = gguf.GGUFWriter(os.fspath(path), arch="innsteer")
    writer.add_uint32("innsteer.format_version", STEER_FORMAT_VERSION)
    writer.add_string("innsteer.kind", "inn")
    writer.add_uint32("innsteer.hidden_size", inn.dim)
    writer.add_uint32("innsteer.mlp_hidden", config.mlp_hidden)
    writer.add_uint32("innsteer.num_couplings", config.num_couplings)
    writer.add_int32("innsteer.layer", steerer.layer)
    writer.add_float32("innsteer.clamp", config.clamp)
    writer.add_float32("innsteer.alpha", steerer.alpha)
    writer.add_string("innsteer.model_id", steerer.model_id)
    writer.add_string("innsteer.model_hint", _model_hint(steerer, model_hint))
    writer.add_string("innsteer.method", steerer.method)
    writer.add_string("innsteer.behavior", steerer.behavior)

    writer.add_tensor("mean", _f32(inn.mean))
    writer.add_tensor("scale", _f32(inn.scale))
    writer.add_tensor("direction", _f32(steerer.direction))
    cond_idx, trans_idx = inn.partitions()
    for k in range(config.num_couplings):
        writer.add_tensor(f"coupling.{k}.cond_idx", cond_idx[k].to(torch.int32).numpy())
        writer.add_tensor(f"coupling.{k}.trans_idx", trans_idx[k].to(torch.int32).numpy())
        for name, weight in (("w1", inn.w1[k]), ("w2", inn.w2[k])):
            if weight_dtype == "bfloat16":
                writer.add_tensor(f"coupling.{k}.{name}", _bf16_bits(weight), raw_dtype=gguf.GGMLQuantizationType.BF16)
            else:
                writer.add_tensor(f"coupling.{k}.{name}", _f32(weight))
        writer.add_tensor(f"coupling.{k}.b1", _f32(inn.b1[k]))
        writer.add_tensor(f"coupling.{k}.b2", _f32(inn.b2[k]))
    _write(writer)


def export_control_vector(steerer: LinearSteerer, path: str | os.PathLike, *, model_hint: Optional[str] = None) -> None:
    """Write a linear steerer (``steerer.vector`` at ``steerer.layer``) as a llama.cpp control vector.

    The vector is written as is (alpha = 1; llama.cpp scales it at load time). llama.cpp
    cannot steer layer 0 with a control vector (``direction.0`` is ignored by its loader).
    """
    import gguf

    if isinstance(steerer, Steerer):
        raise ConfigError(
            "an INN steerer is nonlinear and has no llama.cpp control vector; export it with "
            "--format innsteer (format='innsteer')"
        )
    if not isinstance(steerer, LinearSteerer):
        raise ConfigError(
            f"a {steerer.method} steerer is not additive (h + alpha * v), so it has no llama.cpp "
            "control vector and cannot run in llama.cpp"
        )
    vector = steerer.vector
    if not torch.isfinite(vector).all():
        raise ConfigError("the steering vector contains NaN or Inf")
    layer = int(steerer.layer)
    if layer < 1:
        raise ConfigError(
            f"llama.cpp control vectors cannot steer layer {layer} (direction.0 is not applied); "
            "train the steerer at layer >= 1"
        )
    writer = gguf.GGUFWriter(os.fspath(path), arch="controlvector")
    writer.add_string("controlvector.model_hint", _model_hint(steerer, model_hint))
    writer.add_int32("controlvector.layer_count", 1)
    writer.add_tensor(f"direction.{layer}", _f32(vector))
    _write(writer)


def _write(writer) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def export(
    steerer: SteererBase | str | os.PathLike,
    path: str | os.PathLike,
    *,
    format: str = "innsteer",
    weight_dtype: str = "float32",
    model_hint: Optional[str] = None,
) -> None:
    """Export ``steerer`` (an object or a path to a steer file) as ``format`` (see FORMATS)."""
    if isinstance(steerer, (str, os.PathLike)):
        steerer = load_steerer(steerer)
    if format == "innsteer":
        export_steer_gguf(steerer, path, weight_dtype=weight_dtype, model_hint=model_hint)
    elif format == "controlvector":
        export_control_vector(steerer, path, model_hint=model_hint)
    else:
        raise ConfigError(f"unknown export format {format!r}; choose from {FORMATS}")


def read_control_vector(path: str | os.PathLike) -> tuple[dict[int, np.ndarray], dict[str, Any]]:
    """Read a llama.cpp control-vector GGUF: ({layer: float32 vector}, {model_hint, layer_count}).

    Applies the rules of llama.cpp's loader (common_control_vector_load_one): only ``direction.N``
    tensors with N >= 1, float32, 1-D, all of one length. Raises SteerFileError naming the problem.
    """
    import gguf

    path = os.fspath(path)
    if not os.path.isfile(path):
        raise MissingFileError(f"no control vector file at {path}")
    try:
        reader = gguf.GGUFReader(path)
    except Exception as error:  # gguf raises ValueError/struct.error/IndexError on damaged files
        raise SteerFileError(f"{path} is not a readable GGUF file ({type(error).__name__}: {error})") from error

    def field(name: str):
        f = reader.fields.get(name)
        return None if f is None else f.contents()

    arch = field("general.architecture")
    if arch != "controlvector":
        raise SteerFileError(f"{path} has general.architecture {arch!r}, not 'controlvector'")
    directions: dict[int, np.ndarray] = {}
    for tensor in reader.tensors:
        prefix, _, index = tensor.name.partition(".")
        if prefix != "direction" or not index.isdigit():
            continue
        layer = int(index)
        if layer < 1:
            raise SteerFileError(f"{path}: {tensor.name} is invalid (llama.cpp cannot steer layer 0)")
        if tensor.tensor_type != gguf.GGMLQuantizationType.F32 or len(tensor.shape) != 1:
            raise SteerFileError(f"{path}: {tensor.name} must be a 1-D float32 tensor")
        vector = np.array(tensor.data, dtype=np.float32).reshape(-1)
        if not np.isfinite(vector).all():
            raise SteerFileError(f"{path}: {tensor.name} contains NaN or Inf")
        directions[layer] = vector
    if not directions:
        raise SteerFileError(f"{path} holds no direction.N tensors")
    sizes = {v.shape[0] for v in directions.values()}
    if len(sizes) != 1:
        raise SteerFileError(f"{path}: direction tensors have different lengths {sorted(sizes)}")
    return directions, {
        "model_hint": field("controlvector.model_hint") or "",
        "layer_count": field("controlvector.layer_count"),
    }
