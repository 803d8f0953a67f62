"""TruthFlow-style flow correction: a flow-matching network turns h into its own correction vector.

TruthFlow (Wang et al., ICML 2025, "TruthFlow: Truthful LLM Generation via Representation Flow
Correction") learns, by flow matching, a velocity field that carries a source representation to
the correction vector (truthful minus hallucinated representation) of its query; at inference the
ODE is integrated from the activation, the resulting correction is projected on the top singular
directions of the training corrections (the "truth subspace"), and added at the layer. Here the
sources are the training activations of both classes and each one's target is its pair's
difference pos - neg; ``innsteer.core.methods_nonadditive.fit_truthflow`` trains the field.

steer(h) = h + alpha * P c(h): c(h) integrates the field by ``n_steps`` Euler steps from
(h - source_center) / source_scale at t = 0 to t = 1 and decodes target_center + target_scale * z;
P projects on the rows of ``basis`` (orthonormal). c averages about the mean difference on the
training activations, so alpha = 1 moves the class means about as far as CAA does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor
from torch.nn.functional import silu

from ..errors import ConfigError
from .nonadditive import NonAdditiveSteerer, TensorSpec


class FlowCorrectionSteerer(NonAdditiveSteerer):
    """``steerer(h, alpha) = h + alpha * correction(h)`` (file kind "flowcorrection").

    Tensors: ``source_center`` [d], ``target_center`` [d], the velocity MLP on [z, t]
    (``w1`` [mlp_hidden, d + 1], ``b1``, ``w2`` [mlp_hidden, mlp_hidden], ``b2``, ``w3`` [d, mlp_hidden],
    ``b3`` [d]) and ``basis`` [rank, d]. Config: ``mlp_hidden``, ``rank``, ``n_steps``,
    ``source_scale``, ``target_scale``.
    """

    KIND = "flowcorrection"
    METHOD = "truthflow"
    DESCRIPTION = "a TruthFlow-style flow-correction steerer"
    HIDDEN_TENSOR = "source_center"
    CONFIG = {"mlp_hidden": int, "rank": int, "n_steps": int, "source_scale": float, "target_scale": float}

    @classmethod
    def tensor_specs(cls, hidden_size: int, config: dict[str, Any]) -> dict[str, TensorSpec]:
        d, width, f32 = hidden_size, config["mlp_hidden"], torch.float32
        return {
            "source_center": ((d,), f32),
            "target_center": ((d,), f32),
            "w1": ((width, d + 1), f32),
            "b1": ((width,), f32),
            "w2": ((width, width), f32),
            "b2": ((width,), f32),
            "w3": ((d, width), f32),
            "b3": ((d,), f32),
            "basis": ((config["rank"], d), f32),
        }

    def check_values(self) -> None:
        c = self.config
        if not (c["mlp_hidden"] >= 1 and c["rank"] >= 1 and c["n_steps"] >= 1):
            raise ConfigError(f"a flow correction needs mlp_hidden, rank and n_steps >= 1; got {c}")
        if not (c["source_scale"] > 0 and c["target_scale"] > 0):
            raise ConfigError(f"a flow correction needs positive source_scale and target_scale; got {c}")
        gram = self.basis.double() @ self.basis.double().T
        if not torch.allclose(gram, torch.eye(c["rank"], dtype=torch.float64), atol=1e-4):
            raise ConfigError("a flow correction's basis rows must be orthonormal")

    def velocity(self, z: Tensor, t: float) -> Tensor:
        """The learned field at standardized points z [n, d] and time t."""
        w1 = self._buffer("w1", z)
        hidden = silu(z @ w1[:, :-1].T + t * w1[:, -1] + self._buffer("b1", z))
        hidden = silu(hidden @ self._buffer("w2", z).T + self._buffer("b2", z))
        return hidden @ self._buffer("w3", z).T + self._buffer("b3", z)

    def correction(self, h: Tensor) -> Tensor:
        """P c(h) for rows h (float32 or float64): the projected correction that alpha scales."""
        z = (h - self._buffer("source_center", h)) / self.config["source_scale"]
        steps = self.config["n_steps"]
        for step in range(steps):
            z = z + self.velocity(z, step / steps) / steps
        target = self._buffer("target_center", h) + self.config["target_scale"] * z
        basis = self._buffer("basis", h)
        return (target @ basis.T) @ basis

    def _steer(self, h: Tensor, alpha: float) -> Tensor:
        return h + alpha * self.correction(h)
