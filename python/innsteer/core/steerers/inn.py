"""The INN steerer: a trained flow phi plus its latent direction v, steer(h) = phi^-1(phi(h) + alpha * v)."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterable
from typing import Any, Optional

import torch
from torch import Tensor

import innsteer_ext

from ..errors import SteerFileError
from ..flow import INN, FlowParams
from .base import SteererBase, check_tensor_names, common_fields

# The weight dtypes a float32 flow can run with (``weight_dtype``), by their name in a steer file.
WEIGHT_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
# How a steer grows with alpha (``scaling``):
#   "latent"        phi^-1(phi(h) + alpha * v), the translation in phi-space;
#   "displacement"  h + |alpha| * (phi^-1(phi(h) + sign(alpha) * v) - h): the map's displacement at
#                   alpha = +-1, where the transport term trains it, lengthened, instead of a latent
#                   translation the flow never saw beyond |alpha| = 1. Both are the same map at +-1.
SCALINGS = ("latent", "displacement")


class INNSteerer(SteererBase):
    """``steerer(h, alpha)`` steers hidden states h [..., dim] at one layer through the fused op.

    alpha = 0 returns h bit for bit. ``residual`` fuses the decoder layer's residual add:
    ``steerer(out, alpha, residual=res) == steerer(out + res, alpha)``. ``scaling``: how the steer
    grows with alpha (``SCALINGS``). Metadata (model id, layer, behavior, hidden size, method,
    default alpha, extra, weight_dtype, scaling) travels with ``save``/``load``; a float64 steerer
    loads back as float64.
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
        scaling: str = "latent",
    ):
        super().__init__(layer, alpha=alpha, model_id=model_id, behavior=behavior, method=method, extra=extra)
        if direction.shape != (inn.dim,):
            raise ValueError(f"direction must have shape ({inn.dim},), got {tuple(direction.shape)}")
        if not torch.isfinite(direction).all():
            raise ValueError("direction contains NaN or Inf")
        if weight_dtype is not None and (weight_dtype not in WEIGHT_DTYPES.values() or inn.dtype == torch.float64):
            raise ValueError(
                "weight_dtype must be None, torch.float32 or torch.bfloat16 (None for a float64 flow), "
                f"got {weight_dtype}"
            )
        if scaling not in SCALINGS:
            raise ValueError(f"scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
        self.scaling = scaling
        self.inn = inn
        self.register_buffer("direction", direction.detach().to(inn.dtype).clone())
        self.weight_dtype = weight_dtype  # e.g. torch.bfloat16: half the weight bytes per call

    @property
    def hidden_size(self) -> int:
        return self.inn.dim

    def _args(self, h: Tensor, alpha: Optional[float]) -> tuple[Tensor, float, FlowParams]:
        return self.direction, self.check_call(h, alpha), self.inn.flow_args(self.weight_dtype)

    def forward(self, h: Tensor, alpha: Optional[float] = None, residual: Optional[Tensor] = None) -> Tensor:
        direction, alpha, flow = self._args(h, alpha)
        if self.scaling == "displacement" and alpha != 0:
            base = h if residual is None else h + residual  # rounded as the fused add rounds it
            return _lengthened(base, self._steer(base, None, direction, math.copysign(1.0, alpha), flow), alpha)
        return self._steer(h, residual, direction, alpha, flow)

    def _steer(self, h: Tensor, residual: Optional[Tensor], direction: Tensor, alpha: float, flow: FlowParams):
        if (h.dtype == torch.float64) != (self.inn.dtype == torch.float64):
            dtype = self.inn.dtype if self.inn.dtype == torch.float64 else torch.float32
            res = None if residual is None else residual.to(dtype)
            return innsteer_ext.steer(h.to(dtype), res, direction, alpha, flow).to(h.dtype)
        return innsteer_ext.steer(h, residual, direction, alpha, flow)

    @torch.no_grad()
    def steer_(self, h: Tensor, alpha: Optional[float] = None, residual: Optional[Tensor] = None) -> Tensor:
        """In-place steer of h (float32/bfloat16/float16 activations); returns h."""
        direction, alpha, flow = self._args(h, alpha)
        if self.scaling == "displacement" and alpha != 0:  # the step needs h after the steer: out of place
            return h.copy_(self.forward(h, alpha, residual))
        return innsteer_ext.steer_(h, residual, direction, alpha, flow)

    def metadata(self) -> dict[str, str]:
        meta = {**super().metadata(), "inn_config": json.dumps(self.inn.config_dict())}
        if self.weight_dtype is not None:
            meta["weight_dtype"] = next(name for name, dtype in WEIGHT_DTYPES.items() if dtype == self.weight_dtype)
        if self.scaling != "latent":  # files written before scaling existed are "latent"
            meta["scaling"] = self.scaling
        return meta

    def tensors(self) -> dict[str, Tensor]:
        tensors = {f"inn.{name}": t for name, t in self.inn.state_dict().items()}
        tensors["direction"] = self.direction
        return tensors

    @classmethod
    def check_header(cls, path: str, shapes: dict[str, tuple[int, ...]], meta: dict[str, str]) -> None:
        config = _inn_config(path, meta)
        check_tensor_names(path, shapes, expected_shapes(path, config, shapes), f"the INN config {config}")

    @classmethod
    def from_file(cls, path: str, tensors: dict[str, Tensor], meta: dict[str, str]) -> INNSteerer:
        fields = common_fields(path, meta)
        weight_dtype = meta.get("weight_dtype")
        if weight_dtype is not None and weight_dtype not in WEIGHT_DTYPES:
            raise SteerFileError(f"{path}: weight_dtype must be one of {sorted(WEIGHT_DTYPES)}, got {weight_dtype!r}")
        scaling = meta.get("scaling", "latent")
        if scaling not in SCALINGS:
            raise SteerFileError(f"{path}: scaling must be one of {', '.join(SCALINGS)}, got {scaling!r}")
        config = _inn_config(path, meta)
        try:
            inn = INN.from_config_dict(config)
        except (TypeError, ValueError, OverflowError, RuntimeError) as error:
            raise SteerFileError(f"{path}: unreadable INN config ({error})") from error
        if tensors["direction"].dtype == torch.float64:  # a float64 steerer's file
            inn.double()
        state = {f"inn.{name}": t for name, t in inn.state_dict().items()}
        state["direction"] = inn.mean
        for name, ref in state.items():
            if tensors[name].dtype != ref.dtype:
                raise SteerFileError(f"{path}: tensor '{name}' has dtype {tensors[name].dtype}, expected {ref.dtype}")
        inn.load_state_dict({name[len("inn.") :]: t for name, t in tensors.items() if name.startswith("inn.")})
        check_partitions(inn, path)
        return cls(inn, tensors["direction"], **fields, weight_dtype=WEIGHT_DTYPES.get(weight_dtype), scaling=scaling)


def _lengthened(base: Tensor, steered: Tensor, alpha: float) -> Tensor:
    """base + |alpha| * (steered - base), in float32 (float64 for float64 rows) as the llama.cpp hook
    computes it, rounded once to base's dtype."""
    acc = torch.float64 if base.dtype == torch.float64 else torch.float32
    base_acc = base.to(acc)
    return (base_acc + abs(alpha) * (steered.to(acc) - base_acc)).to(base.dtype)


def _inn_config(path: str, meta: dict[str, str]) -> Any:
    try:
        return json.loads(meta["inn_config"])
    except (KeyError, ValueError, RecursionError) as error:
        raise SteerFileError(f"{path}: unreadable INN config ({error})") from error


def expected_shapes(path: str, config: Any, names: Iterable[str]) -> dict[str, tuple[int, ...]]:
    """The tensor shapes a steer file with this INN config holds, computed without allocating them
    (a config claiming a huge hidden size, MLP width or coupling count must not allocate)."""
    if not isinstance(config, dict):
        raise SteerFileError(f"{path}: the INN config must be a JSON object, got {type(config).__name__}")
    sizes = {key: config.get(key) for key in ("dim", "num_couplings")}
    sizes["mlp_hidden"] = config.get("mlp_hidden", config.get("hidden"))  # files written before the rename
    for key, value in sizes.items():
        if not isinstance(value, int) or isinstance(value, bool):
            raise SteerFileError(f"{path}: INN config {key} must be an integer, got {value!r}")
    # the distinct coupling indices among the tensor names bound how many names to list
    per_coupling = re.compile(r"inn\.(?:(?:w1|b1|w2|b2)\.|(?:cond|trans)_idx_)(\d+)")
    couplings = len({match.group(1) for match in map(per_coupling.fullmatch, names) if match})
    if sizes["num_couplings"] > couplings:
        raise SteerFileError(
            f"{path}: the file holds tensors of {couplings} couplings, but its INN config says "
            f"num_couplings {sizes['num_couplings']}"
        )
    shapes = {
        f"inn.{name}": shape
        for name, shape in INN.state_shapes(sizes["dim"], sizes["num_couplings"], sizes["mlp_hidden"]).items()
    }
    return {**shapes, "direction": (sizes["dim"],)}


def check_partitions(inn: INN, path: str) -> None:
    for k, (cond, trans) in enumerate(zip(*inn.partitions())):
        if not torch.equal(torch.cat([cond, trans]).sort().values, torch.arange(inn.dim)):
            raise SteerFileError(f"{path}: coupling {k}'s indices do not partition 0..{inn.dim - 1}")
    if not (inn.scale > 0).all():
        raise SteerFileError(f"{path}: standardization scale must be positive")
