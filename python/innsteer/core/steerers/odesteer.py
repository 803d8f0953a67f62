"""ODESteer: follow a kernel classifier's normalized gradient field by a few Euler steps.

ODESteer (Zhao et al., ICLR 2026) casts steering as an ODE dh/dt = grad f(h) / |grad f(h)| whose
field is the gradient of a classifier's logit f (positive vs negative activations), integrated
from each activation: an input-dependent nonlinear steer. f is logistic regression on polynomial
kernel features, approximated by a TensorSketch (Pham & Pagh 2013): with x = [(h - center) /
input_scale, sqrt(offset)], each of ``degree`` count sketches hashes x into ``sketch_dim``
buckets, and their circular convolution (a product of FFTs) approximates the degree-``degree``
polynomial features of (x.y + offset)^degree. The gradient is computed in closed form (a circular
cross-correlation per sketch), so steering needs no autograd and runs under inference mode.
``innsteer.core.methods_nonadditive.fit_odesteer`` fits the classifier.

alpha scales the path length: ``n_steps`` Euler steps of length alpha * step_length / n_steps, with
step_length = |mu+ - mu-| (CAA's shift), so alpha = 1 moves every activation along a path as long
as CAA's step, toward the positives; a negative alpha steers toward the negatives.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from ..errors import ConfigError
from .nonadditive import NonAdditiveSteerer, TensorSpec

MAX_DEGREE = 8


def sketch_spectra(x: Tensor, buckets: Tensor, signs: Tensor, sketch_dim: int) -> list[Tensor]:
    """The rfft of each count sketch of rows x [n, k]: sketch j adds signs[j, i] * x[:, i] into
    bucket buckets[j, i]."""
    spectra = []
    for bucket, sign in zip(buckets, signs):
        sketch = x.new_zeros(x.shape[0], sketch_dim).index_add_(1, bucket, x * sign)
        spectra.append(torch.fft.rfft(sketch, dim=-1))
    return spectra


def sketch_features(x: Tensor, buckets: Tensor, signs: Tensor, sketch_dim: int) -> Tensor:
    """TensorSketch features [n, sketch_dim]: the circular convolution of the count sketches."""
    product = torch.stack(sketch_spectra(x, buckets, signs, sketch_dim)).prod(0)
    return torch.fft.irfft(product, n=sketch_dim, dim=-1)


class ODESteerer(NonAdditiveSteerer):
    """``steerer(h, alpha)``: ``n_steps`` Euler steps along the classifier's normalized gradient
    (file kind "odesteer").

    Tensors: ``center`` [d]; the sketches' ``buckets`` [degree, d + 1] (int64 in [0, sketch_dim)) and
    ``signs`` [degree, d + 1] (+-1); the logistic weight on the sketch features ``weight``
    [sketch_dim]. Config: ``degree``, ``sketch_dim``, ``n_steps``, ``step_length``, ``input_scale``,
    ``offset``, ``bias``.
    """

    KIND = "odesteer"
    DESCRIPTION = "an ODESteer steerer"
    HIDDEN_TENSOR = "center"
    CONFIG = {
        "degree": int,
        "sketch_dim": int,
        "n_steps": int,
        "step_length": float,
        "input_scale": float,
        "offset": float,
        "bias": float,
    }

    @classmethod
    def tensor_specs(cls, hidden_size: int, config: dict[str, Any]) -> dict[str, TensorSpec]:
        inputs = (config["degree"], hidden_size + 1)
        return {
            "center": ((hidden_size,), torch.float32),
            "buckets": (inputs, torch.int64),
            "signs": (inputs, torch.float32),
            "weight": ((config["sketch_dim"],), torch.float32),
        }

    def check_values(self) -> None:
        c = self.config
        if not (1 <= c["degree"] <= MAX_DEGREE and c["sketch_dim"] >= 1 and c["n_steps"] >= 1):
            raise ConfigError(f"ODESteer needs 1 <= degree <= {MAX_DEGREE}, sketch_dim >= 1, n_steps >= 1; got {c}")
        if not (c["step_length"] >= 0 and c["input_scale"] > 0 and c["offset"] >= 0):
            raise ConfigError(f"ODESteer needs step_length >= 0, input_scale > 0, offset >= 0; got {c}")
        if self.buckets.numel() and not (0 <= int(self.buckets.min()) and int(self.buckets.max()) < c["sketch_dim"]):
            raise ConfigError(f"ODESteer's buckets must lie in [0, sketch_dim = {c['sketch_dim']})")
        if not (self.signs.abs() == 1).all():
            raise ConfigError("ODESteer's signs must be +1 or -1")

    def _inputs(self, h: Tensor) -> Tensor:
        x = (h - self._buffer("center", h)) / self.config["input_scale"]
        return torch.cat([x, x.new_full((x.shape[0], 1), self.config["offset"] ** 0.5)], dim=-1)

    def _sketch_args(self, h: Tensor) -> tuple[Tensor, Tensor, int]:
        return self.buckets.to(h.device), self._buffer("signs", h), self.config["sketch_dim"]

    def logit(self, h: Tensor) -> Tensor:
        """The classifier's logit for rows h (float32 or float64): positive means the positive class."""
        features = sketch_features(self._inputs(h), *self._sketch_args(h))
        return features @ self._buffer("weight", h) + self.config["bias"]

    def gradient(self, h: Tensor) -> Tensor:
        """d logit / d h for rows h, in closed form: the gradient with respect to sketch j is the
        circular cross-correlation of the weight with the convolution of the other sketches."""
        buckets, signs, sketch_dim = self._sketch_args(h)
        spectra = sketch_spectra(self._inputs(h), buckets, signs, sketch_dim)
        weight_spectrum = torch.fft.rfft(self._buffer("weight", h))
        grad_inputs = h.new_zeros(h.shape[0], buckets.shape[1])
        for j, (bucket, sign) in enumerate(zip(buckets, signs)):
            others = weight_spectrum.expand_as(spectra[j])
            for k, spectrum in enumerate(spectra):
                if k != j:
                    others = others * spectrum.conj()
            grad_sketch = torch.fft.irfft(others, n=sketch_dim, dim=-1)
            grad_inputs += grad_sketch.index_select(1, bucket) * sign
        return grad_inputs[:, :-1] / self.config["input_scale"]

    def _steer(self, h: Tensor, alpha: float) -> Tensor:
        step = alpha * self.config["step_length"] / self.config["n_steps"]
        for _ in range(self.config["n_steps"]):
            grad = self.gradient(h)
            norm = grad.norm(dim=-1, keepdim=True)
            # a flat field (zero gradient) leaves the row where it is
            h = h + step * torch.where(norm > 0, grad / norm.clamp_min(torch.finfo(h.dtype).tiny), 0.0)
        return h
