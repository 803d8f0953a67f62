"""The L2-regularized logistic regression behind the probe, HPR and ODESteer methods."""

from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def fit_logistic(
    features: Tensor, labels: Tensor, *, l2: Optional[float] = None, max_iter: int = 200
) -> tuple[Tensor, Tensor, float]:
    """(weight [k], bias [], training accuracy) of ``sigmoid(features @ weight + bias)`` fitted to
    0/1 ``labels`` with L-BFGS in float64; ``l2`` (on the weight only) defaults to 1 / (number of
    rows), like scikit-learn's C = 1. Condition the features (center, scale) before calling."""
    l2 = 1.0 / len(features) if l2 is None else float(l2)
    # fitting needs autograd even when the caller runs under no_grad / inference_mode
    with torch.inference_mode(False), torch.enable_grad():
        x, y = features.double().clone(), labels.double().clone()
        weight = torch.zeros(x.shape[1], dtype=torch.float64, requires_grad=True)
        bias = torch.zeros((), dtype=torch.float64, requires_grad=True)
        optimizer = torch.optim.LBFGS([weight, bias], max_iter=max_iter, line_search_fn="strong_wolfe")

        def closure() -> Tensor:
            optimizer.zero_grad()
            logits = x @ weight + bias
            loss = torch.nn.functional.binary_cross_entropy_with_logits(logits, y) + 0.5 * l2 * weight @ weight
            loss.backward()
            return loss

        optimizer.step(closure)
    weight, bias = weight.detach(), bias.detach()
    if not (torch.isfinite(weight).all() and torch.isfinite(bias)) or float(weight.norm()) == 0:
        raise ValueError("the logistic regression did not converge to a usable classifier")
    accuracy = float(((x @ weight + bias > 0).double() == y).double().mean())
    return weight, bias, accuracy


def fit_linear_probe(
    pos: Tensor, neg: Tensor, *, l2: Optional[float] = None, max_iter: int = 200
) -> tuple[Tensor, float, float]:
    """(weight [d] float64, bias, training accuracy) of the logistic probe pos (1) vs neg (0), as
    ``weight @ h + bias`` on raw activations h.

    Fitted on centered activations divided by one global scale (conditioning without changing the
    direction: a per-dimension standardization would reweight the L2 penalty and blow the normal
    up along near-constant dimensions).
    """
    x = torch.cat([pos, neg]).double()
    labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    mean, scale = x.mean(0), x.std(0).pow(2).mean().sqrt().clamp_min(1e-12)
    weight, bias, accuracy = fit_logistic((x - mean) / scale, labels, l2=l2, max_iter=max_iter)
    # (x - mean) / scale @ w + b == x @ (w / scale) + (b - mean @ w / scale)
    raw_weight = weight / scale
    return raw_weight, float(bias - mean @ raw_weight), accuracy
