"""Export steerers as GGUF files for llama.cpp.

Two formats:

* ``innsteer`` (default): the whole INN steerer (standardization, every coupling's partition and
  weights, clamp, MLP width, layer, latent direction, default alpha, model hint), read by the native
  hook in ``innsteer.llama.steering``. Weights can be stored as bfloat16 (half the bytes per token).
* ``controlvector``: the stock llama.cpp control-vector file (``llama-cli --control-vector``) for
  linear steerers: one float32 tensor ``direction.L`` per steered layer.

Layer indices: innsteer's ``layer=L`` is decoder layer L's output, which llama.cpp names ``l_out-L``
(= Hugging Face ``hidden_states[L + 1]``); a control vector's ``direction.L`` is added there.

Writing never destroys a file: everything is checked before any output is opened, the GGUF is
written to ``.NAME.partial`` beside the output and renamed over it only when complete (a killed
export leaves the old file intact and that one orphan, which the next export replaces), and the
output may not be the steer file it is made from.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from ..core.errors import ConfigError, MissingFileError, SteerFileError
from ..core.steerers import INNSteerer, LinearSteerer, SignedSteerer, SteererBase, load_steerer
from ..core.steerers.signed import SIDES

STEER_FORMAT_VERSION = 1  # innsteer.format_version; the C loader (csrc/llama_hook) reads exactly this
FORMATS = ("innsteer", "controlvector")
WEIGHT_DTYPES = ("float32", "bfloat16")
INT32_MAX = 2**31 - 1
FLOAT32_MAX = float(np.finfo(np.float32).max)


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


def _f32(name: str, t: torch.Tensor) -> np.ndarray:
    """``t`` as a float32 array; ConfigError if a value is NaN, Inf, or overflows float32."""
    values = t.detach().to(torch.float32).cpu()
    if not torch.isfinite(values).all():
        raise ConfigError(f"tensor '{name}' has values that are NaN, Inf or beyond float32's range")
    return np.ascontiguousarray(values.numpy())


def _bf16_bits(name: str, t: torch.Tensor) -> np.ndarray:
    """bfloat16 values as uint16 bit patterns (gguf stores BF16 raw); rounding as torch's cast."""
    values = t.detach().to(torch.bfloat16).cpu()
    if not torch.isfinite(values).all():
        raise ConfigError(f"tensor '{name}' has values that are NaN, Inf or beyond bfloat16's range")
    return np.ascontiguousarray(values.view(torch.int16).numpy().view(np.uint16))


def _float32_value(name: str, value: float) -> float:
    value = float(value)
    if not (math.isfinite(value) and abs(value) <= FLOAT32_MAX):
        raise ConfigError(f"{name} {value} is not a finite float32 value")
    return value


def _int_in(name: str, value: int, low: int, high: int) -> int:
    if not low <= int(value) <= high:
        raise ConfigError(f"{name} {value} does not fit the GGUF field (must be {low}..{high})")
    return int(value)


def _text(name: str, value: Any) -> str:
    text = str(value)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise ConfigError(f"{name} {text!r} is not valid UTF-8") from None
    return text


def check_output_path(path: str | os.PathLike, source: Optional[str | os.PathLike] = None) -> str:
    """The file to write for ``path`` (through a symlink: its target), after checking that it can be
    a file in an existing directory and is not ``source`` (the steer file it is made from)."""
    path = os.fspath(path)
    target = os.path.realpath(path)
    if os.path.isdir(target):
        raise ConfigError(f"output {path} is a directory; name the .gguf file to write")
    directory = os.path.dirname(target)
    if not os.path.isdir(directory):
        raise ConfigError(f"output {path}: directory {directory} does not exist")
    source = None if source is None else os.fspath(source)
    if source is not None and os.path.exists(source) and os.path.exists(target) and os.path.samefile(source, target):
        raise ConfigError(f"output {path} is the input steer file {source}; write to another file")
    return target


def partial_path(target: str) -> str:
    """Where the GGUF for ``target`` is written before it is renamed into place."""
    directory, name = os.path.split(target)
    return os.path.join(directory, f".{name}.partial")


def _write(writer, path: str | os.PathLike, source: Optional[str | os.PathLike]) -> None:
    """Write the GGUF to a fresh partial file and rename it over the output (see the module docstring)."""
    target = check_output_path(path, source)
    partial = partial_path(target)
    try:
        os.unlink(partial)  # an orphan of a killed export
    except FileNotFoundError:
        pass
    try:
        # O_EXCL: a fresh file of ours (never through a symlink); 0o666 minus the umask, like any new file
        os.close(os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
    except OSError as error:
        raise ConfigError(f"cannot write {os.fspath(path)}: {error.strerror} ({partial})") from error
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.flush()
        for handle in writer.fout:
            os.fsync(handle.fileno())
        writer.close()
        os.replace(partial, target)
    except BaseException:
        writer.close()
        try:
            os.unlink(partial)
        except FileNotFoundError:
            pass
        raise


SIGNED_EXPORT = (
    "a signed steerer holds two maps (one per sign of alpha) and a steer GGUF holds one: pass the "
    ".safetensors file to `innsteer serve` or `innsteer generate --gguf`, which run both, or export "
    "each map to its own file with --side toward / --side away (side=)"
)


def export_steer_gguf(
    steerer: INNSteerer,
    path: str | os.PathLike,
    *,
    weight_dtype: str = "float32",
    model_hint: Optional[str] = None,
    source: Optional[str | os.PathLike] = None,
    alpha: Optional[float] = None,
) -> None:
    """Write an INN steerer as an innsteer steer GGUF (see the module docstring). ``source``: the
    steer file it was loaded from, which the output may not replace; ``alpha``: the default alpha
    the file holds (default: the steerer's)."""
    import gguf

    if isinstance(steerer, SignedSteerer):
        raise ConfigError(SIGNED_EXPORT)
    if not isinstance(steerer, INNSteerer):
        raise ConfigError(
            f"a {steerer.method} steerer ({type(steerer).__name__}) is not an INN steerer; "
            "linear steerers export with --format controlvector (format='controlvector')"
        )
    if weight_dtype not in WEIGHT_DTYPES:
        raise ConfigError(f"weight_dtype must be one of {WEIGHT_DTYPES}, got {weight_dtype!r}")
    if steerer.layer < 0:
        raise ConfigError(f"steerer layer {steerer.layer} is negative; export needs the absolute layer index")
    check_output_path(path, source)
    inn = steerer.inn
    config = inn.config
    # Everything is converted and checked before the output is opened: gguf packs values only while writing.
    uint32_max = 2**32 - 1
    fields = [
        ("add_uint32", "innsteer.format_version", STEER_FORMAT_VERSION),
        ("add_string", "innsteer.kind", "inn"),
        ("add_uint32", "innsteer.hidden_size", _int_in("hidden size", inn.dim, 1, uint32_max)),
        ("add_uint32", "innsteer.mlp_hidden", _int_in("mlp_hidden", config.mlp_hidden, 1, uint32_max)),
        ("add_uint32", "innsteer.num_couplings", _int_in("num_couplings", config.num_couplings, 1, uint32_max)),
        ("add_int32", "innsteer.layer", _int_in("steerer layer", steerer.layer, 0, INT32_MAX)),
        ("add_float32", "innsteer.clamp", _float32_value("clamp", config.clamp)),
        ("add_float32", "innsteer.alpha", _float32_value("alpha", steerer.alpha if alpha is None else alpha)),
        ("add_string", "innsteer.model_id", _text("model id", steerer.model_id)),
        ("add_string", "innsteer.model_hint", _text("model hint", _model_hint(steerer, model_hint))),
        ("add_string", "innsteer.method", _text("method", steerer.method)),
        ("add_string", "innsteer.behavior", _text("behavior", steerer.behavior)),
        ("add_string", "innsteer.scaling", steerer.scaling),
    ]
    tensors = [(name, _f32(name, t), None) for name, t in (("mean", inn.mean), ("scale", inn.scale))]
    tensors.append(("direction", _f32("direction", steerer.direction), None))
    cond_idx, trans_idx = inn.partitions()
    for k in range(config.num_couplings):
        tensors.append((f"coupling.{k}.cond_idx", cond_idx[k].to(torch.int32).numpy(), None))
        tensors.append((f"coupling.{k}.trans_idx", trans_idx[k].to(torch.int32).numpy(), None))
        for name, weight in ((f"coupling.{k}.w1", inn.w1[k]), (f"coupling.{k}.w2", inn.w2[k])):
            if weight_dtype == "bfloat16":
                tensors.append((name, _bf16_bits(name, weight), gguf.GGMLQuantizationType.BF16))
            else:
                tensors.append((name, _f32(name, weight), None))
        tensors.append((f"coupling.{k}.b1", _f32(f"coupling.{k}.b1", inn.b1[k]), None))
        tensors.append((f"coupling.{k}.b2", _f32(f"coupling.{k}.b2", inn.b2[k]), None))

    writer = gguf.GGUFWriter(None, arch="innsteer")
    for method, key, value in fields:
        getattr(writer, method)(key, value)
    for name, array, raw_dtype in tensors:
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    _write(writer, path, source)


def export_control_vector(
    steerer: LinearSteerer,
    path: str | os.PathLike,
    *,
    model_hint: Optional[str] = None,
    source: Optional[str | os.PathLike] = None,
) -> None:
    """Write a linear steerer (``steerer.vector`` at ``steerer.layer``) as a llama.cpp control vector.

    The vector is written as is (alpha = 1; llama.cpp scales it at load time). llama.cpp
    cannot steer layer 0 with a control vector (``direction.0`` is ignored by its loader).
    ``source``: the steer file it was loaded from, which the output may not replace.
    """
    import gguf

    if isinstance(steerer, SignedSteerer):
        raise ConfigError(SIGNED_EXPORT)
    if isinstance(steerer, INNSteerer):
        raise ConfigError(
            "an INN steerer is nonlinear and has no llama.cpp control vector; export it with "
            "--format innsteer (format='innsteer')"
        )
    if not isinstance(steerer, LinearSteerer):
        raise ConfigError(
            f"a {steerer.method} steerer is not additive (h + alpha * v), so it has no llama.cpp "
            "control vector and cannot run in llama.cpp"
        )
    layer = int(steerer.layer)
    if layer < 0:
        raise ConfigError(f"steerer layer {layer} is negative; export needs the absolute layer index")
    if layer < 1:
        raise ConfigError(
            f"llama.cpp control vectors cannot steer layer {layer} (direction.0 is not applied); "
            "train the steerer at layer >= 1"
        )
    _int_in("steerer layer", layer, 1, INT32_MAX)
    vector = _f32("the steering vector", steerer.vector)
    hint = _text("model hint", _model_hint(steerer, model_hint))
    check_output_path(path, source)
    writer = gguf.GGUFWriter(None, arch="controlvector")
    writer.add_string("controlvector.model_hint", hint)
    writer.add_int32("controlvector.layer_count", 1)
    writer.add_tensor(f"direction.{layer}", vector)
    _write(writer, path, source)


def export(
    steerer: SteererBase | str | os.PathLike,
    path: str | os.PathLike,
    *,
    format: str = "innsteer",
    weight_dtype: str = "float32",
    model_hint: Optional[str] = None,
    side: Optional[str] = None,
) -> SteererBase:
    """Export ``steerer`` (an object or a path to a steer file) as ``format`` (see FORMATS); returns
    the steerer exported. A steer file is never replaced by its own export. ``side``: of a signed
    steerer, the map to export ("toward", or "away": the map of negative alphas, which the file
    then holds as a one-map steer to run at negative alphas)."""
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; choose from {FORMATS}")
    if side is not None and side not in SIDES:
        raise ConfigError(f"unknown side {side!r}; choose from {SIDES}")
    source = None
    if isinstance(steerer, (str, os.PathLike)):
        source = steerer
        check_output_path(path, source)  # before reading a possibly large file
        steerer = load_steerer(source)
    if side is not None:
        if not isinstance(steerer, SignedSteerer):
            raise ConfigError(f"side {side!r}: only a signed (two-map) steerer has sides, not {steerer.DESCRIPTION}")
        steerer = getattr(steerer, side)
    # the away map alone runs at negative alphas: its file's default alpha is one
    alpha = -abs(steerer.alpha) if side == "away" and steerer.alpha is not None else None
    if format == "innsteer":
        export_steer_gguf(steerer, path, weight_dtype=weight_dtype, model_hint=model_hint, source=source, alpha=alpha)
    else:
        export_control_vector(steerer, path, model_hint=model_hint, source=source)
    return steerer


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


@dataclass(frozen=True)
class LlamaSteer:
    """A steer file made ready for llama.cpp: ``path`` is a steer GGUF (``kind`` "innsteer", run by
    the hook) or a control vector GGUF (``kind`` "controlvector", added by llama.cpp at every
    position); ``steerer`` is the .safetensors steerer it was exported from, if it was one."""

    kind: str
    path: str
    steerer: Optional[SteererBase] = None
    away_path: Optional[str] = None  # a signed steerer's away map (``path`` its toward map)


def for_llama(path: str, *, model_id: str, workdir: str, name: str = "steer") -> LlamaSteer:
    """The one decision of how a steer file runs in llama.cpp (``innsteer generate --gguf``, ``innsteer
    serve``): a steer or control vector GGUF as it is; a .safetensors INN steerer exported as a
    steer GGUF into ``workdir`` (a signed one as two, ``path`` and ``away_path``, to be added with
    ``add_signed``), a linear one (CAA, PCA, probe) as a control vector, any other kind refused by
    name. A steerer made for another model than ``model_id`` is refused."""
    from .model_file import gguf_architecture, is_gguf

    if is_gguf(path):
        return LlamaSteer("controlvector" if gguf_architecture(path) == "controlvector" else "innsteer", path)
    steerer = load_steerer(path, expect_model_id=model_id)
    if isinstance(steerer, SignedSteerer):
        sides = {side: os.path.join(workdir, f"{name}-{side}.gguf") for side in SIDES}
        for side, exported in sides.items():
            export_steer_gguf(getattr(steerer, side), exported, source=path)
        return LlamaSteer("innsteer", sides["toward"], steerer, away_path=sides["away"])
    if isinstance(steerer, INNSteerer):
        exported = os.path.join(workdir, f"{name}.gguf")
        export_steer_gguf(steerer, exported, source=path)
        return LlamaSteer("innsteer", exported, steerer)
    exported = os.path.join(workdir, f"{name}-controlvector.gguf")
    export_control_vector(steerer, exported, source=path)  # a clear error for the non-additive kinds
    return LlamaSteer("controlvector", exported, steerer)
