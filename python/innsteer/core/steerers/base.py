"""What every steerer kind shares: its metadata, the checks of a call, and the safetensors file format.

A steer file is a safetensors file whose metadata holds ``innsteer.format_version``,
``innsteer.kind`` (which class reads it), the layer, default alpha, model id, behavior, hidden
size, method and a JSON ``extra``. Each kind registers itself by its ``KIND``; ``load_steerer``
(in ``innsteer.core.steerers``) picks the class from the file.
"""

from __future__ import annotations

import json
import math
import os
from typing import Any, ClassVar, Optional

import safetensors.torch
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file
from torch import Tensor, nn

from ..errors import ConfigError, MissingFileError, SteerFileError
from ..files import write_atomically

FORMAT_VERSION = 1
META_KEYS = ("model_id", "layer", "behavior", "hidden_size", "method", "alpha")
KINDS: dict[str, type[SteererBase]] = {}


class SteererBase(nn.Module):
    """``steerer(h, alpha=None, residual=None)`` steers hidden states h [..., hidden_size] at ``layer``.

    alpha None uses the steerer's default ``alpha``; ``residual`` fuses the decoder layer's residual
    add (``steerer(out, a, residual=r) == steerer(out + r, a)``). Subclasses set ``KIND``, implement
    ``hidden_size``, ``forward``, ``tensors`` and ``from_file``.
    """

    KIND: ClassVar[str] = ""
    DESCRIPTION: ClassVar[str] = "a steerer"  # for error messages

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        if cls.KIND:
            KINDS[cls.KIND] = cls
            cls.DESCRIPTION = cls.__dict__.get("DESCRIPTION", f"a '{cls.KIND}' one")

    def __init__(
        self, layer: int, *, alpha: float, model_id: str, behavior: str, method: str, extra: Optional[dict[str, Any]]
    ):
        super().__init__()
        if not math.isfinite(float(alpha)):
            raise ConfigError(f"alpha must be finite, got {alpha}")
        if extra is not None and not isinstance(extra, dict):
            raise ConfigError(f"extra must be a dict, got {type(extra).__name__}")
        self.layer = int(layer)
        self.alpha = float(alpha)
        self.model_id = model_id
        self.behavior = behavior
        self.method = method
        self.extra = dict(extra or {})

    @property
    def hidden_size(self) -> int:
        raise NotImplementedError

    def check_call(self, h: Tensor, alpha: Optional[float]) -> float:
        """The alpha a call uses (the default when None), after checking alpha and h's hidden size."""
        alpha = self.alpha if alpha is None else float(alpha)
        if not math.isfinite(alpha):
            raise ConfigError(f"alpha must be finite, got {alpha}")
        if h.shape[-1] != self.hidden_size:
            raise ConfigError(
                f"this steerer was trained for hidden size {self.hidden_size} "
                f"({self.model_id or 'unknown model'}, layer {self.layer}); got activations of shape {tuple(h.shape)}"
            )
        return alpha

    def apply(self, model: nn.Module, alpha: Optional[float] = None, *, positions="after_prompt", layer=None):
        """``with steerer.apply(model, alpha=2.0):`` steers ``model``'s forward and ``generate`` at this
        steerer's layer; ``positions``: 'after_prompt' (default), 'all' or token indices (see
        ``innsteer.core.hooks.steering``)."""
        from ..hooks import steering

        return steering(model, self, alpha=alpha, layer=layer, positions=positions)

    def tensors(self) -> dict[str, Tensor]:
        """The tensors a steer file of this kind holds."""
        raise NotImplementedError

    def metadata(self) -> dict[str, str]:
        meta = {
            "innsteer.format_version": str(FORMAT_VERSION),
            "innsteer.kind": self.KIND,
            "extra": json.dumps(self.extra),
        }
        meta.update({key: str(getattr(self, key)) for key in META_KEYS})
        return meta

    def save(self, path: str | os.PathLike) -> None:
        """Write the steer file atomically: an interrupted save leaves the previous file intact."""
        tensors = {name: t.detach().cpu().contiguous() for name, t in self.tensors().items()}
        write_atomically(os.fspath(path), safetensors.torch.save(tensors, metadata=self.metadata()))

    @classmethod
    def check_header(cls, path: str, shapes: dict[str, tuple[int, ...]], meta: dict[str, str]) -> None:
        """Raise SteerFileError unless the file's tensor names and shapes (read from its header) are
        the ones its metadata calls for: checked before any tensor data is read, so a file with an
        extra or oversized tensor costs nothing."""
        raise NotImplementedError

    @classmethod
    def from_file(cls, path: str, tensors: dict[str, Tensor], meta: dict[str, str]) -> SteererBase:
        """Build the steerer from a file's tensors (names and shapes checked by ``check_header``) and
        metadata; raises SteerFileError."""
        raise NotImplementedError

    @classmethod
    def load(
        cls, path: str | os.PathLike, *, expect_hidden_size: Optional[int] = None, expect_model_id: Optional[str] = None
    ) -> SteererBase:
        """Load a steer file of this kind (any kind when called on SteererBase); raises
        SteerFileError naming what is wrong with it, or if it was made for another model."""
        path = os.fspath(path)
        shapes, meta = read_steer_header(path)
        kind = meta.get("innsteer.kind")
        if kind not in KINDS:
            raise SteerFileError(f"{path} holds an unknown steerer kind {kind!r} (known: {', '.join(KINDS)})")
        if cls is not SteererBase and KINDS[kind] is not cls:
            raise SteerFileError(f"{path} holds a '{kind}' steerer, not {cls.DESCRIPTION}")
        KINDS[kind].check_header(path, shapes, meta)
        steerer = KINDS[kind].from_file(path, read_steer_tensors(path), meta)
        check_compatible(steerer, path, expect_hidden_size, expect_model_id)
        return steerer


def common_fields(path: str, meta: dict[str, str]) -> dict[str, Any]:
    """The keyword arguments every kind's constructor takes, read from a file's metadata."""
    try:
        fields = {
            "alpha": float(meta["alpha"]),
            "model_id": meta.get("model_id", ""),
            "behavior": meta.get("behavior", ""),
        }
        layer = int(meta["layer"])
    except (KeyError, TypeError, ValueError) as error:
        raise SteerFileError(f"{path}: unreadable steerer metadata ({error})") from error
    if not math.isfinite(fields["alpha"]):
        raise SteerFileError(f"{path}: the default alpha {fields['alpha']} is not finite")
    try:
        fields["extra"] = json.loads(meta.get("extra", "{}"))
    except (ValueError, RecursionError) as error:
        raise SteerFileError(f"{path}: unreadable steerer metadata 'extra' ({error})") from error
    if not isinstance(fields["extra"], dict):
        raise SteerFileError(f"{path}: metadata 'extra' must be a JSON object, got {type(fields['extra']).__name__}")
    if "method" in meta:
        fields["method"] = meta["method"]
    return {"layer": layer, **fields}


def read_steer_header(path: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str]]:
    """The tensor shapes and the metadata of a steer file, from its header alone."""
    if not os.path.isfile(path):
        raise MissingFileError(f"no steer file at {path}")
    try:
        with safe_open(path, framework="pt") as handle:
            meta = dict(handle.metadata() or {})
            shapes = {name: tuple(handle.get_slice(name).get_shape()) for name in handle.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise SteerFileError(f"{path} is not a readable safetensors steer file ({error})") from error
    version = meta.get("innsteer.format_version")
    if version != str(FORMAT_VERSION):
        raise SteerFileError(f"{path} has steer format version {version!r}; this innsteer reads {FORMAT_VERSION}")
    return shapes, meta


def read_steer_tensors(path: str) -> dict[str, Tensor]:
    try:
        tensors = load_file(path)
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise SteerFileError(f"{path} is not a readable safetensors steer file ({error})") from error
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SteerFileError(f"{path}: tensor '{name}' contains NaN or Inf")
    return tensors


def check_tensor_names(path: str, shapes: dict[str, tuple[int, ...]], expected: dict[str, tuple[int, ...]], what: str):
    """Raise SteerFileError unless the file holds exactly the ``expected`` tensors with their shapes."""
    if set(shapes) != set(expected):
        missing, unexpected = sorted(set(expected) - set(shapes)), sorted(set(shapes) - set(expected))
        raise SteerFileError(
            f"{path}: {what} holds tensors {sorted(expected)[:8]}; missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, shape in expected.items():
        if shapes[name] != shape:
            raise SteerFileError(f"{path}: tensor '{name}' has shape {shapes[name]}, expected {shape} for {what}")


def check_compatible(steerer: SteererBase, path: str, hidden_size: Optional[int], model_id: Optional[str]) -> None:
    """Raise SteerFileError if a loaded steerer was made for another hidden size or model."""
    if hidden_size is not None and steerer.hidden_size != hidden_size:
        raise SteerFileError(
            f"{path} was trained for hidden size {steerer.hidden_size} "
            f"({steerer.model_id or 'unknown model'}), but this model has {hidden_size}"
        )
    if model_id and steerer.model_id and steerer.model_id != model_id:
        raise SteerFileError(f"{path} was trained for model '{steerer.model_id}', not '{model_id}'")
