"""Random flows for the op tests: non-trivial weights and standardization, float64 twins."""

from __future__ import annotations

import torch

import innsteer


def random_inn(
    dim: int, mlp_hidden: int = 32, num_couplings: int = 4, seed: int = 0, strength: float = 0.3
) -> innsteer.INN:
    """An INN whose couplings actually transform (the default init is the identity)."""
    generator = torch.Generator().manual_seed(seed)
    inn = innsteer.INN(dim, num_couplings=num_couplings, mlp_hidden=mlp_hidden, seed=seed)
    with torch.no_grad():
        for w2, b2, b1 in zip(inn.w2, inn.b2, inn.b1):
            w2.copy_(torch.randn(w2.shape, generator=generator) * strength / mlp_hidden**0.5)
            b2.copy_(torch.randn(b2.shape, generator=generator) * strength)
            b1.copy_(torch.randn(b1.shape, generator=generator) * 0.1)
        inn.mean.copy_(torch.randn(dim, generator=generator))
        inn.scale.copy_(torch.rand(dim, generator=generator) + 0.5)
    return inn


def as_float64(flow_args: tuple) -> tuple:
    """The same flow arguments with every floating tensor in float64."""

    def convert(a):
        if isinstance(a, list):
            return [convert(t) for t in a]
        if isinstance(a, torch.Tensor) and a.is_floating_point():
            return a.detach().double()
        return a

    return tuple(convert(a) for a in flow_args)


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    actual, expected = actual.detach().double(), expected.detach().double()
    return float((actual - expected).norm() / expected.norm().clamp_min(1e-30))
