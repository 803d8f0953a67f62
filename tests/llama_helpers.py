"""Shared pieces of the llama.cpp tests: steerers with known behaviour and logits through llama.cpp."""

from __future__ import annotations

import numpy as np
import torch

from innsteer import INN, INNSteerer

SMOLLM_DIM = 576
SMOLLM_LAYERS = 30


def random_inn_steerer(
    dim: int = SMOLLM_DIM,
    *,
    mlp_hidden: int = 64,
    couplings: int = 4,
    layer: int = 10,
    alpha: float = 2.0,
    seed: int = 0,
    weight_scale: float = 0.05,
    **kwargs,
) -> INNSteerer:
    """A nonlinear INN steerer with random (nonzero) couplings and a data-like standardization."""
    gen = torch.Generator().manual_seed(seed)
    inn = INN(dim, num_couplings=couplings, mlp_hidden=mlp_hidden, seed=seed)
    with torch.no_grad():
        inn.mean.copy_(torch.randn(dim, generator=gen))
        inn.scale.copy_(torch.rand(dim, generator=gen) * 2 + 0.5)
        for params in (inn.w1, inn.b1, inn.w2, inn.b2):
            for p in params:
                p.copy_(torch.randn(p.shape, generator=gen) * weight_scale)
    direction = torch.randn(dim, generator=gen)
    return INNSteerer(inn, direction, layer, alpha=alpha, **kwargs).requires_grad_(False)


def linear_equivalent_steerer(vector: torch.Tensor, layer: int, *, seed: int = 0) -> INNSteerer:
    """An INN steerer whose steer is h + alpha * vector: couplings are the identity (zero last
    layers), so steer(h) = ((h - m) / s + alpha * v) * s + m with v = vector / s."""
    dim = vector.shape[0]
    gen = torch.Generator().manual_seed(seed)
    inn = INN(dim, num_couplings=2, mlp_hidden=16, seed=seed)
    with torch.no_grad():
        inn.mean.copy_(torch.randn(dim, generator=gen))
        inn.scale.copy_(torch.rand(dim, generator=gen) + 0.5)
    return INNSteerer(inn, vector / inn.scale, layer, alpha=1.0).requires_grad_(False)


def last_logits(llm, tokens) -> np.ndarray:
    """Logits of the last position after evaluating ``tokens`` from an empty cache."""
    import llama_cpp

    llm.reset()
    llm.eval(list(tokens))
    ptr = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(ptr, shape=(llm.n_vocab(),)).copy()


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))
