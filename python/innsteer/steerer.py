"""A trained INN plus its latent direction: steer(h) = phi^-1(phi(h) + alpha * v), saved as safetensors."""
from __future__ import annotations

import json
import math
import os
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from .flow import INN, ops

FORMAT_VERSION = 1
_META_KEYS = ("model_id", "layer", "behavior", "hidden_size", "method", "alpha")


class SteerFileError(ValueError):
    """A steer file that is corrupted, of another format version, or for another model."""


def check_steer_call(steerer, h: Tensor, alpha: Optional[float]) -> float:
    """The alpha a call of any steerer kind uses (its default when None), after checking alpha and h's hidden size."""
    alpha = steerer.alpha if alpha is None else float(alpha)
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha}")
    if h.shape[-1] != steerer.hidden_size:
        raise ValueError(
            f"this steerer was trained for hidden size {steerer.hidden_size} "
            f"({steerer.model_id or 'unknown model'}, layer {steerer.layer}); got activations of shape {tuple(h.shape)}"
        )
    return alpha


class Steerer(nn.Module):
    """``steerer(h, alpha)`` steers hidden states h [..., dim] at one layer.

    alpha = 0 returns h bit for bit. ``residual`` fuses the decoder layer's residual add:
    ``steerer(out, alpha, residual=res) == steerer(out + res, alpha)``.
    Metadata (model id, layer, behavior, hidden size, method, default alpha, extra) travels
    with ``save``/``load``.
    """

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
        super().__init__()
        if direction.shape != (inn.dim,):
            raise ValueError(f"direction must have shape ({inn.dim},), got {tuple(direction.shape)}")
        if not torch.isfinite(direction).all():
            raise ValueError("direction contains NaN or Inf")
        self.inn = inn
        self.register_buffer("direction", direction.detach().to(inn.dtype).clone())
        self.layer = int(layer)
        self.alpha = float(alpha)
        self.model_id = model_id
        self.behavior = behavior
        self.method = method
        self.extra = dict(extra or {})
        self.weight_dtype = weight_dtype  # e.g. torch.bfloat16: half the weight bytes per call

    @property
    def hidden_size(self) -> int:
        return self.inn.dim

    def _args(self, h: Tensor, alpha: Optional[float]) -> tuple[Tensor, float, tuple]:
        return self.direction, check_steer_call(self, h, alpha), self.inn.flow_args(self.weight_dtype)

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
        meta = {
            "innsteer.format_version": str(FORMAT_VERSION),
            "innsteer.kind": "inn",
            "inn_config": json.dumps(self.inn.config.to_dict()),
            "extra": json.dumps(self.extra),
        }
        meta.update({key: str(getattr(self, key)) for key in _META_KEYS})
        return meta

    def save(self, path: str | os.PathLike) -> None:
        tensors = {f"inn.{name}": t.detach().contiguous() for name, t in self.inn.state_dict().items()}
        tensors["direction"] = self.direction.contiguous()
        save_file(tensors, os.fspath(path), metadata=self.metadata())

    @classmethod
    def load(cls, path: str | os.PathLike, *, expect_hidden_size: Optional[int] = None,
             expect_model_id: Optional[str] = None) -> "Steerer":
        """Load a steer file; raises SteerFileError naming what is wrong with it."""
        path = os.fspath(path)
        tensors, meta = read_steer_file(path)
        if meta.get("innsteer.kind") != "inn":
            raise SteerFileError(f"{path} holds a '{meta.get('innsteer.kind')}' steerer, not an INN steerer")
        try:
            config = json.loads(meta["inn_config"])
            inn = INN(**config)
            layer, alpha = int(meta["layer"]), float(meta["alpha"])
            extra = json.loads(meta.get("extra", "{}"))
        except (KeyError, TypeError, ValueError) as error:
            raise SteerFileError(f"{path}: unreadable steerer metadata ({error})") from error
        expected = {f"inn.{name}": t for name, t in inn.state_dict().items()}
        expected["direction"] = torch.empty(inn.dim)
        missing = sorted(set(expected) - set(tensors))
        unexpected = sorted(set(tensors) - set(expected))
        if missing or unexpected:
            raise SteerFileError(f"{path}: tensors do not match the INN config {config}: "
                                 f"missing {missing[:5]}, unexpected {unexpected[:5]}")
        for name, ref in expected.items():
            if tensors[name].shape != ref.shape or tensors[name].dtype != ref.dtype:
                raise SteerFileError(f"{path}: tensor '{name}' has shape {tuple(tensors[name].shape)} "
                                     f"{tensors[name].dtype}, expected {tuple(ref.shape)} {ref.dtype}")
        inn.load_state_dict({name[len("inn."):]: t for name, t in tensors.items() if name.startswith("inn.")})
        check_partitions(inn, path)
        steerer = cls(inn, tensors["direction"], layer, alpha=alpha, model_id=meta.get("model_id", ""),
                      behavior=meta.get("behavior", ""), method=meta.get("method", "innsteer"), extra=extra)
        check_compatible(steerer, path, expect_hidden_size, expect_model_id)
        return steerer


def read_steer_file(path: str) -> tuple[dict[str, Tensor], dict[str, str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"no steer file at {path}")
    try:
        tensors = load_file(path)
        from safetensors import safe_open

        with safe_open(path, framework="pt") as handle:
            meta = dict(handle.metadata() or {})
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        raise SteerFileError(f"{path} is not a readable safetensors steer file ({error})") from error
    version = meta.get("innsteer.format_version")
    if version != str(FORMAT_VERSION):
        raise SteerFileError(f"{path} has steer format version {version!r}; this innsteer reads {FORMAT_VERSION}")
    for name, tensor in tensors.items():
        if tensor.is_floating_point() and not torch.isfinite(tensor).all():
            raise SteerFileError(f"{path}: tensor '{name}' contains NaN or Inf")
    return tensors, meta


def check_partitions(inn: INN, path: str) -> None:
    for k, (cond, trans) in enumerate(zip(*inn.partitions())):
        if not torch.equal(torch.cat([cond, trans]).sort().values, torch.arange(inn.dim)):
            raise SteerFileError(f"{path}: coupling {k}'s indices do not partition 0..{inn.dim - 1}")
    if not (inn.scale > 0).all():
        raise SteerFileError(f"{path}: standardization scale must be positive")


def check_compatible(steerer, path: str, hidden_size: Optional[int], model_id: Optional[str]) -> None:
    """Raise SteerFileError if a loaded steerer was made for another hidden size or model."""
    if hidden_size is not None and steerer.hidden_size != hidden_size:
        raise SteerFileError(f"{path} was trained for hidden size {steerer.hidden_size} "
                             f"({steerer.model_id or 'unknown model'}), but this model has {hidden_size}")
    if model_id and steerer.model_id and steerer.model_id != model_id:
        raise SteerFileError(f"{path} was trained for model '{steerer.model_id}', not '{model_id}'")


def load_steerer(path: str | os.PathLike, *, expect_hidden_size: Optional[int] = None,
                 expect_model_id: Optional[str] = None):
    """Load any steer file (INN, linear or affine, by its `innsteer.kind`); raises SteerFileError
    for a corrupted file, another format version, an unknown kind, or another model / hidden size."""
    from .linear import AffineSteerer, LinearSteerer  # linear.py builds on this module

    path = os.fspath(path)
    _, meta = read_steer_file(path)
    kinds = {"inn": Steerer, "linear": LinearSteerer, "affine": AffineSteerer}
    kind = meta.get("innsteer.kind")
    if kind not in kinds:
        raise SteerFileError(f"{path} holds an unknown steerer kind {kind!r} (known: {', '.join(kinds)})")
    return kinds[kind].load(path, expect_hidden_size=expect_hidden_size, expect_model_id=expect_model_id)
