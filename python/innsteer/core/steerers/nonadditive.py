"""Common part of the steerers whose change depends on h (MiMiC, ODESteer, HPR, TruthFlow).

Each kind is a fixed set of named tensors whose shapes follow from the hidden size and a few
scalar settings (``config``, stored as the JSON metadata ``<kind>_config``). This class checks them
(in the constructor and when a file is loaded), runs the call checks every steerer shares, and
hands the subclass float32 rows (float64 rows stay float64). None of these kinds is h + alpha * v,
so none has a llama.cpp control vector (``innsteer.llama.export`` refuses them).
"""

from __future__ import annotations

import json
import math
from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from ..errors import ConfigError, SteerFileError
from .base import SteererBase, check_tensor_names, common_fields

TensorSpec = tuple[tuple[int, ...], torch.dtype]


class NonAdditiveSteerer(SteererBase):
    """``steerer(h, alpha)``: ``_steer`` of h's rows in float32 (float64 for float64 h); alpha = 0
    returns h bit for bit.

    Subclasses set ``KIND``, ``CONFIG`` (setting name -> int or float), ``HIDDEN_TENSOR`` (a tensor
    whose last dimension is the hidden size), and implement ``tensor_specs``, ``_steer`` and, for
    constraints beyond shapes and finiteness, ``check_values``.
    """

    CONFIG: ClassVar[dict[str, type]] = {}
    HIDDEN_TENSOR: ClassVar[str] = ""
    METHOD: ClassVar[str] = ""  # the METHODS name that fits this kind, where it is not the kind's own

    def __init__(
        self,
        tensors: dict[str, Tensor],
        layer: int,
        *,
        config: Optional[dict[str, Any]] = None,  # None: no settings (a kind whose CONFIG is empty)
        alpha: float = 1.0,
        model_id: str = "",
        behavior: str = "",
        method: Optional[str] = None,
        extra: Optional[dict[str, Any]] = None,
    ):
        method = (self.METHOD or self.KIND) if method is None else method
        super().__init__(layer, alpha=alpha, model_id=model_id, behavior=behavior, method=method, extra=extra)
        self.config = self._checked_config({} if config is None else config)
        anchor = tensors.get(self.HIDDEN_TENSOR)
        if not isinstance(anchor, Tensor) or anchor.dim() == 0:
            raise ConfigError(f"{type(self).__name__} needs a tensor '{self.HIDDEN_TENSOR}' of at least 1 dimension")
        specs = self.tensor_specs(anchor.shape[-1], self.config)
        if set(tensors) != set(specs):
            raise ConfigError(f"{type(self).__name__} holds tensors {sorted(specs)}, got {sorted(tensors)}")
        for name, (shape, dtype) in specs.items():
            tensor = tensors[name]
            if tuple(tensor.shape) != shape:
                raise ConfigError(f"{type(self).__name__}: '{name}' has shape {tuple(tensor.shape)}, expected {shape}")
            if tensor.is_floating_point() != dtype.is_floating_point or (
                not dtype.is_floating_point and tensor.dtype != dtype
            ):
                raise ConfigError(f"{type(self).__name__}: '{name}' must be {dtype}, got {tensor.dtype}")
            # contiguous, as a loaded file's tensors are: the same strides give the same rounding
            stored = tensor.detach().to(dtype).clone(memory_format=torch.contiguous_format)
            if dtype.is_floating_point and not torch.isfinite(stored).all():  # after the cast: no float32 overflow
                raise ConfigError(f"{type(self).__name__}: '{name}' must be finite in {dtype}")
            self.register_buffer(name, stored)
        self._hidden_size = int(anchor.shape[-1])
        self.check_values()

    @classmethod
    def _checked_config(cls, config: Any) -> dict[str, Any]:
        if not isinstance(config, dict) or set(config) != set(cls.CONFIG):
            got = sorted(config) if isinstance(config, dict) else type(config).__name__
            raise ConfigError(f"{cls.__name__} config needs the settings {sorted(cls.CONFIG)}, got {got}")
        checked = {}
        for name, kind in cls.CONFIG.items():
            value = config[name]
            if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
                raise ConfigError(f"{cls.__name__} setting {name} must be {kind.__name__}, got {value!r}")
            if kind is float and not math.isfinite(value):
                raise ConfigError(f"{cls.__name__} setting {name} must be finite, got {value}")
            checked[name] = kind(value)
        return checked

    @classmethod
    def tensor_specs(cls, hidden_size: int, config: dict[str, Any]) -> dict[str, TensorSpec]:
        """Every tensor's (shape, dtype) for this hidden size and config."""
        raise NotImplementedError

    def check_values(self) -> None:
        """Raise ConfigError for tensor values or settings this kind cannot run with."""

    def _steer(self, h: Tensor, alpha: float) -> Tensor:
        """The steered rows of h [n, hidden_size] (float32 or float64), alpha != 0."""
        raise NotImplementedError

    @property
    def hidden_size(self) -> int:
        return self._hidden_size

    def _buffer(self, name: str, like: Tensor) -> Tensor:
        """A float buffer in h's compute dtype and device (float64 buffers only for float64 rows)."""
        return getattr(self, name).to(device=like.device, dtype=like.dtype)

    def forward(self, h: Tensor, alpha: Optional[float] = None, residual: Optional[Tensor] = None) -> Tensor:
        alpha = self.check_call(h, alpha)
        if not h.is_floating_point():
            raise ConfigError(f"activations must be floating point, got {h.dtype}")
        if residual is not None:
            if residual.shape != h.shape:
                raise ConfigError(f"residual shape {tuple(residual.shape)} does not match hidden {tuple(h.shape)}")
            h = h + residual
        if alpha == 0 or h.numel() == 0:
            return h.clone()
        compute = torch.float64 if h.dtype == torch.float64 else torch.float32
        rows = h.reshape(-1, self.hidden_size).to(compute)
        return self._steer(rows, alpha).reshape(h.shape).to(h.dtype)

    @torch.no_grad()
    def steer_(self, h: Tensor, alpha: Optional[float] = None, residual: Optional[Tensor] = None) -> Tensor:
        """In-place steer of h; returns h."""
        h.copy_(self.forward(h, alpha, residual))
        return h

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.tensor_specs(self.hidden_size, self.config)}

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), f"{self.KIND}_config": json.dumps(self.config)}

    @classmethod
    def _file_specs(cls, path: str, meta: dict[str, str]) -> tuple[dict, dict[str, tuple[tuple[int, ...], Any]]]:
        """The file's config and the (shape, dtype) of each tensor it must hold."""
        try:
            config = json.loads(meta[f"{cls.KIND}_config"])
            hidden_size = int(meta["hidden_size"])
        except (KeyError, ValueError, RecursionError) as error:
            raise SteerFileError(f"{path}: unreadable '{cls.KIND}' steerer metadata ({error})") from error
        try:
            return config, cls.tensor_specs(hidden_size, cls._checked_config(config))
        except ConfigError as error:
            raise SteerFileError(f"{path}: {error}") from error

    @classmethod
    def check_header(cls, path: str, shapes: dict[str, tuple[int, ...]], meta: dict[str, str]) -> None:
        specs = cls._file_specs(path, meta)[1]
        check_tensor_names(path, shapes, {name: shape for name, (shape, _) in specs.items()}, f"a '{cls.KIND}' file")

    @classmethod
    def from_file(cls, path: str, tensors: dict[str, Tensor], meta: dict[str, str]) -> NonAdditiveSteerer:
        fields = common_fields(path, meta)
        config, specs = cls._file_specs(path, meta)
        for name, (_, dtype) in specs.items():  # exact dtypes: a file is what save wrote
            if tensors[name].dtype != dtype:
                raise SteerFileError(f"{path}: tensor '{name}' has dtype {tensors[name].dtype}, expected {dtype}")
        fields.setdefault("method", cls.METHOD or cls.KIND)
        try:
            return cls(tensors, config=config, **fields)
        except ConfigError as error:
            raise SteerFileError(f"{path}: {error}") from error
