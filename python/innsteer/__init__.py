"""innsteer: nonlinear activation steering with invertible networks (INNSteer).

steer(h) = phi^-1(phi(h) + alpha * v), phi a RealNVP flow trained on contrastive activations,
run by the fused `torch.ops.innsteer` kernels.

Layers, each importing only those before it: ``core`` (flow, steerers, training, methods) ->
``datasets`` -> ``hf`` (Hugging Face models, hooks, activations) -> ``eval`` -> ``llama``
(llama.cpp) -> ``cli``. The names below load on first use, so ``import innsteer`` (and the CLI's
``--help``) does not import torch; optional parts (llama.cpp, plots) import only when used.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "INN": "innsteer.core.flow",
    "FlowConfig": "innsteer.core.flow",
    "INNSteerer": "innsteer.core.steerers",
    "Steerer": "innsteer.core.steerers",  # deprecated: INNSteerer
    "SteererBase": "innsteer.core.steerers",
    "LinearSteerer": "innsteer.core.steerers",
    "AffineSteerer": "innsteer.core.steerers",
    "load_steerer": "innsteer.core.steerers",
    "TrainConfig": "innsteer.core.train",
    "TrainResult": "innsteer.core.train",
    "train_innsteer": "innsteer.core.train",
    "METHODS": "innsteer.core.methods",
    "InnsteerError": "innsteer.core.errors",
    "ConfigError": "innsteer.core.errors",
    "SteerFileError": "innsteer.core.errors",
    "steering": "innsteer.core.hooks",
    "load_model": "innsteer.hf.models",
    "fit": "innsteer.hf.fit",
    "tune": "innsteer.eval.tune",
    "load": ("innsteer.core.steerers", "load_steerer"),
}

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'innsteer' has no attribute {name!r}")
    module, attribute = _EXPORTS[name] if isinstance(_EXPORTS[name], tuple) else (_EXPORTS[name], name)
    value = getattr(importlib.import_module(module), attribute)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
