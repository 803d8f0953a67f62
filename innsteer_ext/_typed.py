"""Typed entry points of the innsteer ops, after pytorch/extension-cpp's ops.py: a flow travels as
one FlowParams instead of nine positional arguments splatted into every call."""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple, Optional

import torch
from torch import Tensor


class FlowParams(NamedTuple):
    """A flow in the ops' argument order, so ``*flow`` also splats into ``torch.ops.innsteer``.

    Per coupling k: ``cond_idx[k]`` / ``trans_idx[k]`` (int64) partition range(dim); the MLP maps
    the cond coordinates through ``w1[k]`` [n_cond, mlp_hidden], ``b1[k]``, tanh, ``w2[k]``
    [mlp_hidden, 2 * n_trans] and ``b2[k]`` to interleaved (log-scale, shift) pairs, bounded by
    ``clamp`` (within [MIN_CLAMP, MAX_CLAMP]). Activations are standardized by ``mean`` and
    ``scale`` [dim] first.
    """

    mean: Tensor
    scale: Tensor
    cond_idx: Sequence[Tensor]
    trans_idx: Sequence[Tensor]
    w1: Sequence[Tensor]
    b1: Sequence[Tensor]
    w2: Sequence[Tensor]
    b2: Sequence[Tensor]
    clamp: float


def coupling_forward(x: Tensor, flow: FlowParams) -> tuple[Tensor, Tensor]:
    """z = phi(x) and log|det dphi/dx| per row of x [..., dim]."""
    return torch.ops.innsteer.coupling_forward.default(x, *flow)


def coupling_inverse(z: Tensor, flow: FlowParams) -> Tensor:
    """x = phi^-1(z)."""
    return torch.ops.innsteer.coupling_inverse.default(z, *flow)


def steer(hidden: Tensor, residual: Optional[Tensor], direction: Tensor, alpha: float, flow: FlowParams) -> Tensor:
    """phi^-1(phi(h) + alpha * direction) with h = hidden (+ residual); h itself when alpha == 0."""
    return torch.ops.innsteer.steer.default(hidden, residual, direction, alpha, *flow)


def steer_(hidden: Tensor, residual: Optional[Tensor], direction: Tensor, alpha: float, flow: FlowParams) -> Tensor:
    """``steer`` written into hidden in place; returns hidden. Records no gradients: under grad mode
    it refuses arguments that require grad."""
    torch.ops.innsteer.steer_.default(hidden, residual, direction, alpha, *flow)
    return hidden
