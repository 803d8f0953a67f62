"""Two INN maps, one per sign of alpha: steer(h, alpha) = toward(h, alpha) for alpha >= 0 and
away(h, alpha) for alpha < 0.

Why: a map trained for alpha = +1 extrapolates at negative alphas, and on some behaviors it steers
away worse than CAA (or not at all); training for both signs costs part of the gain toward the
behavior. Two maps keep each sign's best: ``innsteer tune`` picks each side's options on validation
(``fit_innsteer(..., away={...})`` trains the second map). Only one map runs per call, so a
steered token costs what one map costs. In llama.cpp the two maps are two hook entries at the
same layer, each given the alphas of its sign (``innsteer.llama.export.for_llama``).

File kind "signed": each side's tensors under ``toward.`` / ``away.``, each side's INN config and
weight dtype in ``toward.inn_config`` / ``away.inn_config`` (``*.weight_dtype``), each side's
training history in ``extra["toward"]`` / ``extra["away"]``.
"""

from __future__ import annotations

from typing import Any, Optional

from torch import Tensor

from ..errors import SteerFileError
from .base import SteererBase, common_fields
from .inn import INNSteerer

SIDES = ("toward", "away")
_SIDE_META = ("inn_config", "weight_dtype", "scaling")  # the INN kind's own metadata, kept per side


class SignedSteerer(SteererBase):
    """``steerer(h, alpha)``: ``toward(h, alpha)`` for alpha >= 0, ``away(h, alpha)`` for alpha < 0
    (alpha 0 returns h bit for bit, as each map does). Both maps steer the same layer and hidden size."""

    KIND = "signed"
    DESCRIPTION = "a signed (two-map) INN steerer"

    def __init__(
        self,
        toward: INNSteerer,
        away: INNSteerer,
        *,
        alpha: Optional[float] = None,
        model_id: Optional[str] = None,
        behavior: Optional[str] = None,
        method: str = "innsteer",
        extra: Optional[dict[str, Any]] = None,
    ):
        if not isinstance(toward, INNSteerer) or not isinstance(away, INNSteerer):
            raise ValueError(
                f"a signed steerer takes two INN steerers, got {type(toward).__name__} and {type(away).__name__}"
            )
        if toward.layer != away.layer or toward.hidden_size != away.hidden_size:
            raise ValueError(
                f"both maps must steer one layer and hidden size: toward is layer {toward.layer} "
                f"(hidden size {toward.hidden_size}), away layer {away.layer} (hidden size {away.hidden_size})"
            )
        extra = {"toward": toward.extra, "away": away.extra} if extra is None else extra
        super().__init__(
            toward.layer,
            alpha=toward.alpha if alpha is None else alpha,
            model_id=toward.model_id if model_id is None else model_id,
            behavior=toward.behavior if behavior is None else behavior,
            method=method,
            extra=extra,
        )
        self.toward = toward
        self.away = away

    @property
    def hidden_size(self) -> int:
        return self.toward.hidden_size

    def side(self, alpha: float) -> INNSteerer:
        """The map a call with ``alpha`` runs."""
        return self.away if alpha < 0 else self.toward

    def forward(self, h: Tensor, alpha: Optional[float] = None, residual: Optional[Tensor] = None) -> Tensor:
        alpha = self.check_call(h, alpha)
        return self.side(alpha)(h, alpha, residual)

    def steer_(self, h: Tensor, alpha: Optional[float] = None, residual: Optional[Tensor] = None) -> Tensor:
        """In-place steer of h (as ``INNSteerer.steer_``); returns h."""
        alpha = self.check_call(h, alpha)
        return self.side(alpha).steer_(h, alpha, residual)

    def metadata(self) -> dict[str, str]:
        meta = super().metadata()
        for side in SIDES:
            side_meta = getattr(self, side).metadata()
            meta.update({f"{side}.{key}": side_meta[key] for key in _SIDE_META if key in side_meta})
        return meta

    def tensors(self) -> dict[str, Tensor]:
        return {f"{side}.{name}": t for side in SIDES for name, t in getattr(self, side).tensors().items()}

    @staticmethod
    def _side_file(side: str, shapes_or_tensors: dict, meta: dict[str, str]) -> tuple[dict, dict[str, str]]:
        """One side's entries and metadata, as an INN steer file of its own would hold them."""
        prefix = f"{side}."
        entries = {name[len(prefix) :]: v for name, v in shapes_or_tensors.items() if name.startswith(prefix)}
        side_meta = {key: value for key, value in meta.items() if not key.startswith(("toward.", "away."))}
        side_meta.update({key: meta[prefix + key] for key in _SIDE_META if prefix + key in meta})
        return entries, side_meta

    @classmethod
    def check_header(cls, path: str, shapes: dict[str, tuple[int, ...]], meta: dict[str, str]) -> None:
        unexpected = sorted(name for name in shapes if not name.startswith(("toward.", "away.")))
        if unexpected:
            raise SteerFileError(
                f"{path}: a signed steer file holds 'toward.*' and 'away.*' tensors, not {unexpected[:5]}"
            )
        for side in SIDES:
            if f"{side}.inn_config" not in meta:
                raise SteerFileError(f"{path}: a signed steer file needs metadata '{side}.inn_config'")
            INNSteerer.check_header(f"{path} ({side} map)", *cls._side_file(side, shapes, meta))

    @classmethod
    def from_file(cls, path: str, tensors: dict[str, Tensor], meta: dict[str, str]) -> SignedSteerer:
        fields = common_fields(path, meta)
        extra = fields.pop("extra")
        maps = {}
        for side in SIDES:
            side_tensors, side_meta = cls._side_file(side, tensors, meta)
            maps[side] = INNSteerer.from_file(f"{path} ({side} map)", side_tensors, side_meta)
            side_extra = extra.get(side)
            maps[side].extra = dict(side_extra) if isinstance(side_extra, dict) else {}
        fields.pop("layer")
        return cls(maps["toward"], maps["away"], extra=extra, **fields)
