"""Pure-PyTorch reference of every innsteer op, with the ops' exact semantics.

Differentiable (autograd) and dtype-generic: the tests feed it float64 copies of the inputs
as ground truth, and the ops' backward recomputes through it. Same argument order as the
`torch.ops.innsteer` schemas.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

# Shifts are bounded like the log-scales: |t| <= SHIFT_CLAMP_FACTOR * clamp, so rows far outside
# the training data still invert to float32 precision. The kernels' constant (csrc/flow_types.h).
from ._C import SHIFT_CLAMP_FACTOR


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype a flow computes in for activations of x's dtype (float64 stays float64)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _coupling(
    u: Tensor,
    cond_idx: Tensor,
    trans_idx: Tensor,
    w1: Tensor,
    b1: Tensor,
    w2: Tensor,
    b2: Tensor,
    clamp: float,
    inverse: bool,
) -> tuple[Tensor, Tensor]:
    """One affine coupling on rows u; returns (new u, sum of log-scales added to log|det J|)."""
    hidden = torch.tanh(u.index_select(-1, cond_idx) @ w1.to(u.dtype) + b1)
    st = hidden @ w2.to(u.dtype) + b2
    s = clamp * torch.tanh(st[..., 0::2] / clamp)
    shift_clamp = SHIFT_CLAMP_FACTOR * clamp
    shift = shift_clamp * torch.tanh(st[..., 1::2] / shift_clamp)
    x_trans = u.index_select(-1, trans_idx)
    if inverse:
        y_trans, log_scale = (x_trans - shift) * torch.exp(-s), -s.sum(-1)
    else:
        y_trans, log_scale = x_trans * torch.exp(s) + shift, s.sum(-1)
    return u.index_copy(-1, trans_idx, y_trans), log_scale


def coupling_forward(
    x: Tensor,
    mean: Tensor,
    scale: Tensor,
    cond_idx: Sequence[Tensor],
    trans_idx: Sequence[Tensor],
    w1: Sequence[Tensor],
    b1: Sequence[Tensor],
    w2: Sequence[Tensor],
    b2: Sequence[Tensor],
    clamp: float,
) -> tuple[Tensor, Tensor]:
    """z = phi(x) and log|det dphi/dx| per row."""
    acc = compute_dtype(x)
    u = (x.to(acc) - mean.to(acc)) / scale.to(acc)
    logdet = (-torch.log(scale.to(acc)).sum()).expand(x.shape[:-1])
    for k in range(len(w1)):
        u, log_scale = _coupling(
            u, cond_idx[k], trans_idx[k], w1[k], b1[k].to(acc), w2[k], b2[k].to(acc), clamp, inverse=False
        )
        logdet = logdet + log_scale
    return u.to(x.dtype), logdet.to(mean.dtype)


def coupling_inverse(
    z: Tensor,
    mean: Tensor,
    scale: Tensor,
    cond_idx: Sequence[Tensor],
    trans_idx: Sequence[Tensor],
    w1: Sequence[Tensor],
    b1: Sequence[Tensor],
    w2: Sequence[Tensor],
    b2: Sequence[Tensor],
    clamp: float,
) -> Tensor:
    """x = phi^-1(z)."""
    acc = compute_dtype(z)
    u = z.to(acc)
    for k in reversed(range(len(w1))):
        u, _ = _coupling(u, cond_idx[k], trans_idx[k], w1[k], b1[k].to(acc), w2[k], b2[k].to(acc), clamp, inverse=True)
    return (u * scale.to(acc) + mean.to(acc)).to(z.dtype)


def steer(
    hidden: Tensor,
    residual: Optional[Tensor],
    direction: Tensor,
    alpha: float,
    mean: Tensor,
    scale: Tensor,
    cond_idx: Sequence[Tensor],
    trans_idx: Sequence[Tensor],
    w1: Sequence[Tensor],
    b1: Sequence[Tensor],
    w2: Sequence[Tensor],
    b2: Sequence[Tensor],
    clamp: float,
) -> Tensor:
    """phi^-1(phi(h) + alpha * direction) with h = hidden (+ residual); h itself when alpha == 0."""
    h = hidden if residual is None else hidden + residual
    if alpha == 0:
        return h.clone()
    flow = (mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp)
    acc = compute_dtype(h)
    z, _ = coupling_forward(h.to(acc), *flow)
    return coupling_inverse(z + alpha * direction.to(acc), *flow).to(h.dtype)
