"""Linear steerers for the baselines: h + alpha * v (CAA, PCA/RepE, probe) and per-dimension
affine transport h + alpha * ((scale * h + shift) - h) (Linear-AcT).

They share ``Steerer``'s call signature, attributes and file format (kind "linear" / "affine"),
so hooks, evaluation and ``load_steerer`` treat every method alike.
"""
from __future__ import annotations

import json
import os
from typing import Any, Optional

import torch
from safetensors.torch import save_file
from torch import Tensor, nn

from .steerer import _META_KEYS, FORMAT_VERSION, SteerFileError, check_compatible, check_steer_call, read_steer_file


class _PerDimensionSteerer(nn.Module):
    """Common part of the linear steerers: 1-D float32 parameter tensors of the hidden size."""

    KIND = ""
    TENSORS: tuple[str, ...] = ()

    def __init__(self, tensors: dict[str, Tensor], layer: int, *, alpha: float, model_id: str, behavior: str,
                 method: str, extra: Optional[dict[str, Any]]):
        super().__init__()
        sizes = {name: tuple(t.shape) for name, t in tensors.items()}
        if any(len(shape) != 1 for shape in sizes.values()) or len(set(sizes.values())) != 1:
            raise ValueError(f"{type(self).__name__} needs 1-D tensors of one hidden size, got shapes {sizes}")
        for name, tensor in tensors.items():
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise ValueError(f"{type(self).__name__}: '{name}' must be finite floating point")
            self.register_buffer(name, tensor.detach().float().clone())
        self.layer = int(layer)
        self.alpha = float(alpha)
        self.model_id = model_id
        self.behavior = behavior
        self.method = method
        self.extra = dict(extra or {})

    @property
    def hidden_size(self) -> int:
        return getattr(self, self.TENSORS[0]).shape[0]

    def _delta(self, h: Tensor, alpha: float) -> Tensor:
        """The float32 change alpha * (steered - h) for float32 rows h."""
        raise NotImplementedError

    def _prepare(self, h: Tensor, alpha: Optional[float], residual: Optional[Tensor]) -> tuple[Tensor, float]:
        alpha = check_steer_call(self, h, alpha)
        if residual is not None and residual.shape != h.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} does not match hidden {tuple(h.shape)}")
        return (h if residual is None else h + residual), alpha

    def forward(self, h: Tensor, alpha: Optional[float] = None, residual: Optional[Tensor] = None) -> Tensor:
        h, alpha = self._prepare(h, alpha, residual)
        if alpha == 0:
            return h.clone()
        # float32 math and one rounding back, so bf16/fp16 activations lose nothing extra
        return (h.float() + self._delta(h.float(), alpha)).to(h.dtype)

    @torch.no_grad()
    def steer_(self, h: Tensor, alpha: Optional[float] = None, residual: Optional[Tensor] = None) -> Tensor:
        """In-place steer of h; returns h."""
        steered = self.forward(h, alpha, residual)
        h.copy_(steered)
        return h

    def metadata(self) -> dict[str, str]:
        meta = {"innsteer.format_version": str(FORMAT_VERSION), "innsteer.kind": self.KIND,
                "extra": json.dumps(self.extra)}
        meta.update({key: str(getattr(self, key)) for key in _META_KEYS})
        return meta

    def save(self, path: str | os.PathLike) -> None:
        tensors = {name: getattr(self, name).detach().cpu().contiguous() for name in self.TENSORS}
        save_file(tensors, os.fspath(path), metadata=self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike, *, expect_hidden_size: Optional[int] = None,
             expect_model_id: Optional[str] = None):
        """Load a steer file of this kind; raises SteerFileError naming what is wrong with it."""
        path = os.fspath(path)
        tensors, meta = read_steer_file(path)
        return cls._from_file(path, tensors, meta, expect_hidden_size, expect_model_id)

    @classmethod
    def _from_file(cls, path: str, tensors: dict[str, Tensor], meta: dict[str, str],
                   expect_hidden_size: Optional[int], expect_model_id: Optional[str]):
        if meta.get("innsteer.kind") != cls.KIND:
            raise SteerFileError(f"{path} holds a '{meta.get('innsteer.kind')}' steerer, not a '{cls.KIND}' one")
        if set(tensors) != set(cls.TENSORS):
            raise SteerFileError(f"{path}: a '{cls.KIND}' steer file holds tensors {list(cls.TENSORS)}, "
                                 f"found {sorted(tensors)}")
        try:
            layer, alpha, hidden_size = int(meta["layer"]), float(meta["alpha"]), int(meta["hidden_size"])
            extra = json.loads(meta.get("extra", "{}"))
        except (KeyError, TypeError, ValueError) as error:
            raise SteerFileError(f"{path}: unreadable steerer metadata ({error})") from error
        for name, tensor in tensors.items():
            if tensor.dtype != torch.float32 or tuple(tensor.shape) != (hidden_size,):
                raise SteerFileError(f"{path}: tensor '{name}' has shape {tuple(tensor.shape)} {tensor.dtype}, "
                                     f"expected ({hidden_size},) torch.float32")
        steerer = cls(*(tensors[name] for name in cls.TENSORS), layer, alpha=alpha,
                      model_id=meta.get("model_id", ""), behavior=meta.get("behavior", ""),
                      method=meta.get("method", cls.KIND), extra=extra)
        check_compatible(steerer, path, expect_hidden_size, expect_model_id)
        return steerer


class LinearSteerer(_PerDimensionSteerer):
    """``steerer(h, alpha) = h + alpha * vector`` (CAA, PCA/RepE and probe directions)."""

    KIND = "linear"
    TENSORS = ("vector",)

    def __init__(self, vector: Tensor, layer: int, *, alpha: float = 1.0, model_id: str = "", behavior: str = "",
                 method: str = "linear", extra: Optional[dict[str, Any]] = None):
        super().__init__({"vector": vector}, layer, alpha=alpha, model_id=model_id, behavior=behavior,
                         method=method, extra=extra)

    def _delta(self, h: Tensor, alpha: float) -> Tensor:
        return alpha * self.vector


class AffineSteerer(_PerDimensionSteerer):
    """``steerer(h, alpha) = h + alpha * ((scale * h + shift) - h)`` (Linear-AcT).

    alpha = 1 applies the per-dimension affine map; alpha between 0 and 1 interpolates to it.
    """

    KIND = "affine"
    TENSORS = ("scale", "shift")

    def __init__(self, scale: Tensor, shift: Tensor, layer: int, *, alpha: float = 1.0, model_id: str = "",
                 behavior: str = "", method: str = "linear_act", extra: Optional[dict[str, Any]] = None):
        super().__init__({"scale": scale, "shift": shift}, layer, alpha=alpha, model_id=model_id,
                         behavior=behavior, method=method, extra=extra)

    def _delta(self, h: Tensor, alpha: float) -> Tensor:
        return alpha * ((self.scale - 1) * h + self.shift)
