"""Linear steerers for the baselines: h + alpha * v (CAA, PCA/RepE, probe) and per-dimension
affine transport h + alpha * ((scale * h + shift) - h) (Linear-AcT).

They share the INN steerer's call signature, attributes and file format (kind "linear" / "affine"),
so hooks, evaluation and ``load_steerer`` treat every method alike.
"""

from __future__ import annotations

from typing import Any, ClassVar, Optional

import torch
from torch import Tensor

from ..errors import SteerFileError
from .base import SteererBase, check_tensor_names, common_fields


class PerDimensionSteerer(SteererBase):
    """Common part of the linear steerers: 1-D float32 parameter tensors of the hidden size."""

    TENSORS: ClassVar[tuple[str, ...]] = ()

    def __init__(
        self,
        tensors: dict[str, Tensor],
        layer: int,
        *,
        alpha: float,
        model_id: str,
        behavior: str,
        method: str,
        extra: Optional[dict[str, Any]],
    ):
        super().__init__(layer, alpha=alpha, model_id=model_id, behavior=behavior, method=method, extra=extra)
        sizes = {name: tuple(t.shape) for name, t in tensors.items()}
        if any(len(shape) != 1 for shape in sizes.values()) or len(set(sizes.values())) != 1:
            raise ValueError(f"{type(self).__name__} needs 1-D tensors of one hidden size, got shapes {sizes}")
        for name, tensor in tensors.items():
            if not tensor.is_floating_point() or not torch.isfinite(tensor).all():
                raise ValueError(f"{type(self).__name__}: '{name}' must be finite floating point")
            self.register_buffer(name, tensor.detach().float().clone())

    @property
    def hidden_size(self) -> int:
        return getattr(self, self.TENSORS[0]).shape[0]

    def _delta(self, h: Tensor, alpha: float) -> Tensor:
        """The float32 change alpha * (steered - h) for float32 rows h."""
        raise NotImplementedError

    def forward(self, h: Tensor, alpha: Optional[float] = None, residual: Optional[Tensor] = None) -> Tensor:
        alpha = self.check_call(h, alpha)
        if residual is not None:
            if residual.shape != h.shape:
                raise ValueError(f"residual shape {tuple(residual.shape)} does not match hidden {tuple(h.shape)}")
            h = h + residual
        if alpha == 0:
            return h.clone()
        # float32 math and one rounding back, so bf16/fp16 activations lose nothing extra
        return (h.float() + self._delta(h.float(), alpha)).to(h.dtype)

    @torch.no_grad()
    def steer_(self, h: Tensor, alpha: Optional[float] = None, residual: Optional[Tensor] = None) -> Tensor:
        """In-place steer of h; returns h."""
        h.copy_(self.forward(h, alpha, residual))
        return h

    def tensors(self) -> dict[str, Tensor]:
        return {name: getattr(self, name) for name in self.TENSORS}

    @classmethod
    def check_header(cls, path: str, shapes: dict[str, tuple[int, ...]], meta: dict[str, str]) -> None:
        try:
            hidden_size = int(meta["hidden_size"])
        except (KeyError, ValueError) as error:
            raise SteerFileError(f"{path}: unreadable steerer metadata ({error})") from error
        check_tensor_names(path, shapes, {name: (hidden_size,) for name in cls.TENSORS}, f"a '{cls.KIND}' steer file")

    @classmethod
    def from_file(cls, path: str, tensors: dict[str, Tensor], meta: dict[str, str]) -> PerDimensionSteerer:
        fields = common_fields(path, meta)
        for name, tensor in tensors.items():
            if tensor.dtype != torch.float32:
                raise SteerFileError(f"{path}: tensor '{name}' has dtype {tensor.dtype}, expected torch.float32")
        fields.setdefault("method", cls.KIND)
        return cls(*(tensors[name] for name in cls.TENSORS), **fields)


class LinearSteerer(PerDimensionSteerer):
    """``steerer(h, alpha) = h + alpha * vector`` (CAA, PCA/RepE and probe directions)."""

    KIND = "linear"
    TENSORS = ("vector",)

    def __init__(
        self,
        vector: Tensor,
        layer: int,
        *,
        alpha: float = 1.0,
        model_id: str = "",
        behavior: str = "",
        method: str = "linear",
        extra: Optional[dict[str, Any]] = None,
    ):
        super().__init__(
            {"vector": vector}, layer, alpha=alpha, model_id=model_id, behavior=behavior, method=method, extra=extra
        )

    def _delta(self, h: Tensor, alpha: float) -> Tensor:
        return alpha * self.vector


class AffineSteerer(PerDimensionSteerer):
    """``steerer(h, alpha) = h + alpha * ((scale * h + shift) - h)`` (Linear-AcT).

    alpha = 1 applies the per-dimension affine map; alpha between 0 and 1 interpolates to it.
    """

    KIND = "affine"
    TENSORS = ("scale", "shift")

    def __init__(
        self,
        scale: Tensor,
        shift: Tensor,
        layer: int,
        *,
        alpha: float = 1.0,
        model_id: str = "",
        behavior: str = "",
        method: str = "linear_act",
        extra: Optional[dict[str, Any]] = None,
    ):
        super().__init__(
            {"scale": scale, "shift": shift},
            layer,
            alpha=alpha,
            model_id=model_id,
            behavior=behavior,
            method=method,
            extra=extra,
        )

    def _delta(self, h: Tensor, alpha: float) -> Tensor:
        return alpha * ((self.scale - 1) * h + self.shift)
