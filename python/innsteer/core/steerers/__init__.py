"""Steerers: the INN steerer and the linear/affine ones of the baselines, one base and one file format.

``load_steerer(path)`` reads any kind (by the file's ``innsteer.kind``).
"""

from __future__ import annotations

import os
from typing import Optional

from .base import SteererBase
from .inn import Steerer
from .linear import AffineSteerer, LinearSteerer, PerDimensionSteerer

__all__ = ["SteererBase", "Steerer", "LinearSteerer", "AffineSteerer", "PerDimensionSteerer", "load_steerer"]


def load_steerer(
    path: str | os.PathLike, *, expect_hidden_size: Optional[int] = None, expect_model_id: Optional[str] = None
) -> SteererBase:
    """Load any steer file (INN, linear or affine); raises SteerFileError for a corrupted file,
    another format version, an unknown kind, or another model / hidden size."""
    return SteererBase.load(path, expect_hidden_size=expect_hidden_size, expect_model_id=expect_model_id)
