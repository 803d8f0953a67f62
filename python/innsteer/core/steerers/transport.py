"""Full-covariance affine transport (MiMiC): steer(h) = h + alpha * ((A h + b) - h).

MiMiC (Singh et al. 2024, "Representation Surgery: Theory and Practice of Affine Steering") moves
the negative class onto the positive one with the optimal-transport map between their Gaussian
fits; ``innsteer.core.methods_nonlinear.fit_mimic`` computes A and b. alpha = 1 applies the map
(the negatives' mean lands on the positives' mean, as CAA's shift moves it); alpha in (0, 1)
interpolates toward it.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from .nonadditive import NonAdditiveSteerer, TensorSpec


class TransportSteerer(NonAdditiveSteerer):
    """``steerer(h, alpha) = h + alpha * (h @ matrix.T + shift - h)`` (file kind "transport")."""

    KIND = "transport"
    METHOD = "mimic"
    DESCRIPTION = "an affine transport (MiMiC) steerer"
    HIDDEN_TENSOR = "shift"

    @classmethod
    def tensor_specs(cls, hidden_size: int, config: dict[str, Any]) -> dict[str, TensorSpec]:
        return {"matrix": ((hidden_size, hidden_size), torch.float32), "shift": ((hidden_size,), torch.float32)}

    def transport(self, h: Tensor) -> Tensor:
        """The map A h + b of rows h (float32 or float64)."""
        return h @ self._buffer("matrix", h).T + self._buffer("shift", h)

    def _steer(self, h: Tensor, alpha: float) -> Tensor:
        return h + alpha * (self.transport(h) - h)
