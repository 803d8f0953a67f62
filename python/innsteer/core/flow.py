"""The invertible network phi: standardization followed by RealNVP affine couplings.

Each coupling splits the coordinates into a conditioning part and a transformed part with a
fixed seeded permutation (a fresh one per pair of couplings, the two couplings of a pair
swapping roles, so every coordinate is transformed); an MLP of the conditioning part gives
(s, t) and the transformed part becomes x * exp(s) + t with s = clamp * tanh(raw / clamp),
so exp(s) stays within [e^-clamp, e^clamp] and the inverse stays well conditioned.
All math runs in the compiled `torch.ops.innsteer` ops.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Optional

import torch
from torch import Tensor, nn

from innsteer_ext import MAX_CLAMP, MIN_CLAMP, FlowParams, coupling_forward, coupling_inverse

from .errors import ConfigError
from .fieldtypes import check_field_types

# Bounds on the flow's shape, far above anything trained (4 or 8 couplings, 512 wide): a typo of
# 1000000 couplings would otherwise be allocated coupling by coupling until memory runs out.
MAX_COUPLINGS, MAX_MLP_HIDDEN = 64, 1 << 16


@dataclass(frozen=True)
class FlowConfig:
    """The flow's shape, shared by ``INN`` and ``TrainConfig``: couplings, the width of each
    coupling MLP's hidden layer (``mlp_hidden``; "hidden size" is the LLM's), and the scale clamp
    (within [innsteer_ext.MIN_CLAMP, innsteer_ext.MAX_CLAMP], the bounds the kernels accept)."""

    num_couplings: int = 4
    mlp_hidden: int = 512
    clamp: float = 2.0

    def check(self) -> None:
        check_field_types(self)
        if not (1 <= self.num_couplings <= MAX_COUPLINGS and 1 <= self.mlp_hidden <= MAX_MLP_HIDDEN):
            raise ConfigError(
                f"need num_couplings in [1, {MAX_COUPLINGS}] and mlp_hidden in [1, {MAX_MLP_HIDDEN}], got "
                f"{self.num_couplings}, {self.mlp_hidden}"
            )
        if not MIN_CLAMP <= self.clamp <= MAX_CLAMP:
            raise ConfigError(
                f"clamp must be in [{MIN_CLAMP}, {MAX_CLAMP}] (exp(clamp) scales the activations; larger "
                f"clamps overflow float32), got {self.clamp}"
            )


def coupling_partitions(dim: int, num_couplings: int, seed: int) -> list[tuple[Tensor, Tensor]]:
    """(cond_idx, trans_idx) per coupling: a seeded permutation per pair, halves swapped within it."""
    if dim < 2:
        raise ValueError(f"an INN needs dim >= 2, got {dim}")
    parts = []
    generator = torch.Generator().manual_seed(seed)
    for k in range(num_couplings):
        if k % 2 == 0:
            perm = torch.randperm(dim, generator=generator)
            first, second = perm[: dim // 2].sort().values, perm[dim // 2 :].sort().values
        parts.append((first, second) if k % 2 == 0 else (second, first))
    return parts


class INN(nn.Module):
    """phi: R^dim -> R^dim. ``inn(x) -> (z, logdet)``, ``inn.inverse(z) -> x``.

    Any float dtype in, the same dtype out; the math runs in float32 (float64 after
    ``inn.double()``). Starts as the identity (zero-initialized last layers) up to the
    standardization, which ``fit_standardization`` sets from data.
    """

    def __init__(self, dim: int, num_couplings: int = 4, mlp_hidden: int = 512, clamp: float = 2.0, seed: int = 0):
        super().__init__()
        self.config = FlowConfig(num_couplings, mlp_hidden, float(clamp))
        self.config.check()
        self.seed = seed
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("scale", torch.ones(dim))
        self.w1, self.b1, self.w2, self.b2 = (nn.ParameterList() for _ in range(4))
        for k, (cond, trans) in enumerate(coupling_partitions(dim, num_couplings, seed)):
            # clones: a pair's two couplings share index tensors, and safetensors refuses shared storage
            self.register_buffer(f"cond_idx_{k}", cond.clone())
            self.register_buffer(f"trans_idx_{k}", trans.clone())
            w1 = torch.empty(len(cond), mlp_hidden)
            nn.init.normal_(w1, std=1.0 / math.sqrt(len(cond)))
            self.w1.append(nn.Parameter(w1))
            self.b1.append(nn.Parameter(torch.zeros(mlp_hidden)))
            self.w2.append(nn.Parameter(torch.zeros(mlp_hidden, 2 * len(trans))))
            self.b2.append(nn.Parameter(torch.zeros(2 * len(trans))))

    @staticmethod
    def state_shapes(dim: int, num_couplings: int, mlp_hidden: int) -> dict[str, tuple[int, ...]]:
        """The shapes of the state_dict of ``INN(dim, num_couplings, mlp_hidden)``, without building it."""
        shapes = {"mean": (dim,), "scale": (dim,)}
        first, second = dim // 2, dim - dim // 2  # coupling_partitions' halves, swapped every other coupling
        for k in range(num_couplings):
            n_cond, n_trans = (first, second) if k % 2 == 0 else (second, first)
            shapes.update(
                {
                    f"cond_idx_{k}": (n_cond,),
                    f"trans_idx_{k}": (n_trans,),
                    f"w1.{k}": (n_cond, mlp_hidden),
                    f"b1.{k}": (mlp_hidden,),
                    f"w2.{k}": (mlp_hidden, 2 * n_trans),
                    f"b2.{k}": (2 * n_trans,),
                }
            )
        return shapes

    @classmethod
    def from_config(cls, dim: int, config: FlowConfig, seed: int = 0) -> INN:
        return cls(dim, config.num_couplings, config.mlp_hidden, config.clamp, seed)

    def config_dict(self) -> dict:
        """What a steer file records to rebuild this INN (``from_config_dict``)."""
        return {"dim": self.dim, **asdict(self.config), "seed": self.seed}

    @classmethod
    def from_config_dict(cls, config: dict) -> INN:
        if not isinstance(config, dict):
            raise ValueError(f"an INN config must be a JSON object, got {type(config).__name__}")
        if "hidden" in config and "mlp_hidden" not in config:  # files written before the rename
            config = {("mlp_hidden" if key == "hidden" else key): value for key, value in config.items()}
        return cls(**config)

    @property
    def dim(self) -> int:
        return self.mean.shape[0]

    @property
    def dtype(self) -> torch.dtype:
        return self.mean.dtype

    def partitions(self) -> tuple[list[Tensor], list[Tensor]]:
        n = self.config.num_couplings
        return [getattr(self, f"cond_idx_{k}") for k in range(n)], [getattr(self, f"trans_idx_{k}") for k in range(n)]

    def flow_args(self, weight_dtype: Optional[torch.dtype] = None) -> FlowParams:
        """The flow as the ops take it (weights cast to ``weight_dtype`` when given)."""
        cond, trans = self.partitions()
        cast = (lambda w: w.to(weight_dtype)) if weight_dtype is not None else (lambda w: w)
        return FlowParams(
            self.mean,
            self.scale,
            cond,
            trans,
            [cast(w) for w in self.w1],
            list(self.b1),
            [cast(w) for w in self.w2],
            list(self.b2),
            self.config.clamp,
        )

    def _compute_input(self, x: Tensor) -> Tensor:
        if x.shape[-1] != self.dim:
            raise ValueError(f"INN expects hidden size {self.dim}, got input of shape {tuple(x.shape)}")
        if not x.is_floating_point():
            raise TypeError(f"INN expects floating-point activations, got {x.dtype}")
        if self.dtype == torch.float64:
            return x.double()
        return x.float() if x.dtype == torch.float64 else x

    def forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        z, logdet = coupling_forward(self._compute_input(x), self.flow_args())
        return z.to(x.dtype), logdet

    def inverse(self, z: Tensor) -> Tensor:
        return coupling_inverse(self._compute_input(z), self.flow_args()).to(z.dtype)

    @torch.no_grad()
    def fit_standardization(self, x: Tensor, eps: float = 1e-4) -> None:
        """Set mean/scale from samples x [n, dim] (scale floored at eps times its median)."""
        x = x.reshape(-1, self.dim).to(self.mean.dtype)
        if x.shape[0] < 2:
            raise ValueError("fit_standardization needs at least 2 samples")
        if not torch.isfinite(x).all():
            raise ValueError("fit_standardization got NaN or Inf activations")
        std = x.std(0)
        self.mean.copy_(x.mean(0))
        self.scale.copy_(std.clamp_min(eps * float(std.median().clamp_min(1e-12))))
