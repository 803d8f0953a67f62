"""Steerers: the INN steerer, the linear/affine ones of the baselines and the input-dependent ones
(MiMiC transport, ODESteer, HPR, TruthFlow-style flow correction), the signed (two-map) INN
steerer, one base and one file format.

``load_steerer(path)`` reads any kind (by the file's ``innsteer.kind``).
"""

from __future__ import annotations

import os
import warnings
from typing import Any, Optional

from .base import SteererBase
from .flowcorrection import FlowCorrectionSteerer
from .hpr import HouseholderSteerer
from .inn import INNSteerer
from .linear import AffineSteerer, LinearSteerer, PerDimensionSteerer
from .nonadditive import NonAdditiveSteerer
from .odesteer import ODESteerer
from .signed import SignedSteerer
from .transport import TransportSteerer

__all__ = [
    "SteererBase",
    "INNSteerer",
    "SignedSteerer",
    "LinearSteerer",
    "AffineSteerer",
    "PerDimensionSteerer",
    "NonAdditiveSteerer",
    "TransportSteerer",
    "ODESteerer",
    "HouseholderSteerer",
    "FlowCorrectionSteerer",
    "load_steerer",
]


def load_steerer(
    path: str | os.PathLike, *, expect_hidden_size: Optional[int] = None, expect_model_id: Optional[str] = None
) -> SteererBase:
    """Load any steer file (any kind above); raises SteerFileError for a corrupted file,
    another format version, an unknown kind, or another model / hidden size."""
    return SteererBase.load(path, expect_hidden_size=expect_hidden_size, expect_model_id=expect_model_id)


def __getattr__(name: str) -> Any:
    if name == "Steerer":  # the INN kind's name before INNSteerer; kept for one release
        warnings.warn(
            "innsteer's Steerer is now INNSteerer (SteererBase is the type of every kind); the old name "
            "will be removed in the next release",
            DeprecationWarning,
            stacklevel=2,
        )
        return INNSteerer
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
