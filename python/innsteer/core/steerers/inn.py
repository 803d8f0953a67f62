"""The INN steerer: a trained flow phi plus its latent direction v, steer(h) = phi^-1(phi(h) + alpha * v)."""

from __future__ import annotations

import json
from typing import Any, Optional

import torch
from torch import Tensor

from ..errors import SteerFileError
from ..flow import INN, ops
from .base import SteererBase, common_fields


class Steerer(SteererBase):
    """``steerer(h, alpha)`` steers hidden states h [..., dim] at one layer through the fused op.

    alpha = 0 returns h bit for bit. ``residual`` fuses the decoder layer's residual add:
    ``steerer(out, alpha, residual=res) == steerer(out + res, alpha)``.
    Metadata (model id, layer, behavior, hidden size, method, default alpha, extra) travels
    with ``save``/``load``.
    """

    KIND = "inn"
    DESCRIPTION = "an INN steerer"

    def __init__(
        self,
        inn: INN,
        direction: Tensor,
        layer: int,
        *,
        alpha: float = 1.0,
        model_id: str = "",
        behavior: str = "",
        method: str = "innsteer",
        extra: Optional[dict[str, Any]] = None,
        weight_dtype: Optional[torch.dtype] = None,
    ):
        super().__init__(layer, alpha=alpha, model_id=model_id, behavior=behavior, method=method, extra=extra)
        if direction.shape != (inn.dim,):
            raise ValueError(f"direction must have shape ({inn.dim},), got {tuple(direction.shape)}")
        if not torch.isfinite(direction).all():
            raise ValueError("direction contains NaN or Inf")
        self.inn = inn
        self.register_buffer("direction", direction.detach().to(inn.dtype).clone())
        self.weight_dtype = weight_dtype  # e.g. torch.bfloat16: half the weight bytes per call

    @property
    def hidden_size(self) -> int:
        return self.inn.dim

    def _args(self, h: Tensor, alpha: Optional[float]) -> tuple[Tensor, float, tuple]:
        return self.direction, self.check_call(h, alpha), self.inn.flow_args(self.weight_dtype)

    def forward(self, h: Tensor, alpha: Optional[float] = None, residual: Optional[Tensor] = None) -> Tensor:
        direction, alpha, flow = self._args(h, alpha)
        if (h.dtype == torch.float64) != (self.inn.dtype == torch.float64):
            dtype = self.inn.dtype if self.inn.dtype == torch.float64 else torch.float32
            res = None if residual is None else residual.to(dtype)
            return ops.steer(h.to(dtype), res, direction, alpha, *flow).to(h.dtype)
        return ops.steer(h, residual, direction, alpha, *flow)

    @torch.no_grad()
    def steer_(self, h: Tensor, alpha: Optional[float] = None, residual: Optional[Tensor] = None) -> Tensor:
        """In-place steer of h (float32/bfloat16/float16 activations); returns h."""
        direction, alpha, flow = self._args(h, alpha)
        ops.steer_(h, residual, direction, alpha, *flow)
        return h

    def metadata(self) -> dict[str, str]:
        return {**super().metadata(), "inn_config": json.dumps(self.inn.config_dict())}

    def tensors(self) -> dict[str, Tensor]:
        tensors = {f"inn.{name}": t for name, t in self.inn.state_dict().items()}
        tensors["direction"] = self.direction
        return tensors

    @classmethod
    def from_file(cls, path: str, tensors: dict[str, Tensor], meta: dict[str, str]) -> Steerer:
        fields = common_fields(path, meta)
        try:
            config = json.loads(meta["inn_config"])
            inn = INN.from_config_dict(config)
        except (KeyError, TypeError, ValueError) as error:
            raise SteerFileError(f"{path}: unreadable INN config ({error})") from error
        expected = {f"inn.{name}": t for name, t in inn.state_dict().items()}
        expected["direction"] = torch.empty(inn.dim)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise SteerFileError(
                f"{path}: tensors do not match the INN config {config}: "
                f"missing {missing[:5]}, unexpected {unexpected[:5]}"
            )
        for name, ref in expected.items():
            if tensors[name].shape != ref.shape or tensors[name].dtype != ref.dtype:
                raise SteerFileError(
                    f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)} "
                    f"{tensors[name].dtype}, expected {tuple(ref.shape)} {ref.dtype}"
                )
        inn.load_state_dict({name[len("inn.") :]: t for name, t in tensors.items() if name.startswith("inn.")})
        check_partitions(inn, path)
        return cls(inn, tensors["direction"], **fields)


def check_partitions(inn: INN, path: str) -> None:
    for k, (cond, trans) in enumerate(zip(*inn.partitions())):
        if not torch.equal(torch.cat([cond, trans]).sort().values, torch.arange(inn.dim)):
            raise SteerFileError(f"{path}: coupling {k}'s indices do not partition 0..{inn.dim - 1}")
    if not (inn.scale > 0).all():
        raise SteerFileError(f"{path}: standardization scale must be positive")
