"""Householder pseudo-rotation (HPR): rotate the activations a probe marks negative, keeping their norm.

HPR (Pham & Nguyen, EMNLP 2024, "Householder Pseudo-Rotation: A Novel Approach to Activation
Editing in LLMs with Direction-Magnitude Perspective"): a linear probe w.h + b separates positive
from negative activations; the Householder reflection H = I - 2 v v^T about its hyperplane
(v = w / |w|) maps a negative activation h to Hh on the positive side. HPR rotates h in the plane
of h and Hh (= the plane of h and v) toward the positive side by an angle that a small network
predicts from h, so only h's direction changes, never its norm. Activations the probe marks
positive are left as they are. ``innsteer.core.methods_nonadditive.fit_hpr`` fits the probe and
the angle network (trained on the angle between each negative activation and its positive pair).

alpha scales the angle: alpha * theta(h), clamped to [-pi, pi] (a rotation by more than a half
turn would come back around). alpha = 1 rotates by the fitted angle, which turns a training
negative about as far as its positive pair lies from it, so the class means move about as far as
CAA's mean difference moves them (``extra["mean_shift_ratio_to_mean_difference"]`` records how far
on the training negatives).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from .nonadditive import NonAdditiveSteerer, TensorSpec


class HouseholderSteerer(NonAdditiveSteerer):
    """``steerer(h, alpha)``: h rotated toward the probe's positive side by alpha * angle(h) where
    ``probe_logit(h) < 0``, h itself elsewhere (file kind "hpr").

    Tensors: the probe's ``probe_weight`` [d]; the angle network's input ``center`` [d] and layers
    ``w1`` [mlp_hidden, d], ``b1`` [mlp_hidden], ``w2`` [mlp_hidden]. Config: ``probe_bias``,
    ``input_scale``, ``out_bias``, ``mlp_hidden``.
    """

    KIND = "hpr"
    DESCRIPTION = "a Householder pseudo-rotation (HPR) steerer"
    HIDDEN_TENSOR = "probe_weight"
    CONFIG = {"probe_bias": float, "input_scale": float, "out_bias": float, "mlp_hidden": int}

    @classmethod
    def tensor_specs(cls, hidden_size: int, config: dict[str, Any]) -> dict[str, TensorSpec]:
        width, f32 = config["mlp_hidden"], torch.float32
        return {
            "probe_weight": ((hidden_size,), f32),
            "center": ((hidden_size,), f32),
            "w1": ((width, hidden_size), f32),
            "b1": ((width,), f32),
            "w2": ((width,), f32),
        }

    def check_values(self) -> None:
        if self.config["mlp_hidden"] < 1 or self.config["input_scale"] <= 0:
            raise ConfigError(f"HPR needs mlp_hidden >= 1 and input_scale > 0, got {self.config}")
        if float(self.probe_weight.norm()) == 0:
            raise ConfigError("HPR's probe_weight is zero: it defines no reflection")

    def probe_logit(self, h: Tensor) -> Tensor:
        """The probe's w.h + b for rows h (float32 or float64): negative means 'rotate'."""
        return h @ self._buffer("probe_weight", h) + self.config["probe_bias"]

    def angle(self, h: Tensor) -> Tensor:
        """The predicted rotation angle in [0, pi] for rows h (float32 or float64)."""
        x = (h - self._buffer("center", h)) / self.config["input_scale"]
        hidden = torch.tanh(x @ self._buffer("w1", h).T + self._buffer("b1", h))
        return math.pi * torch.sigmoid(hidden @ self._buffer("w2", h) + self.config["out_bias"])

    def _steer(self, h: Tensor, alpha: float) -> Tensor:
        normal = self._buffer("probe_weight", h)
        normal = normal / normal.norm()
        norm = h.norm(dim=-1, keepdim=True)
        unit = h / norm.clamp_min(torch.finfo(h.dtype).tiny)
        # the part of the probe's normal orthogonal to h (twice: one pass leaves rounding along h)
        toward = normal - (unit @ normal).unsqueeze(-1) * unit
        toward = toward - (unit * toward).sum(-1, keepdim=True) * unit
        toward_norm = toward.norm(dim=-1, keepdim=True)
        # a zero h, or h along the normal, spans no plane with it: nothing to rotate
        rotate = (self.probe_logit(h) < 0).unsqueeze(-1) & (norm > 0) & (toward_norm > torch.finfo(h.dtype).eps)
        theta = (alpha * self.angle(h)).clamp(-math.pi, math.pi).unsqueeze(-1)
        rotated = torch.cos(theta) * h + torch.sin(theta) * norm * (toward / toward_norm.clamp_min(1e-30))
        return torch.where(rotate, rotated, h)
