"""The steers a server offers, by name, and the steering a request asks for.

A steer is an INN steer GGUF (run by the native hook), a stock llama.cpp control vector GGUF, or a
steer file written by ``innsteer train`` (.safetensors): an INN steerer is exported as a steer GGUF
on the fly, a linear one (CAA, PCA, probe) as a control vector. A request's steering is a
``Setting``: the (name, alpha) pairs it turns on, in the catalog's order, so two requests that
ask for the same steering in a different order get the same setting (and may share a KV prefix).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from ..core.errors import ConfigError, MissingFileError
from ..llama.bindings import SteerGGUF, float32_alpha
from ..llama.export import for_llama, read_control_vector

INN = "innsteer"
CONTROL_VECTOR = "control_vector"
NAME_PATTERN = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]*")

Setting = tuple[tuple[str, float], ...]  # (steer name, alpha) in catalog order; () is no steering
NO_STEERING: Setting = ()


class SteeringError(ValueError):
    """A request's steering that cannot be served; ``param`` names the offending field."""

    def __init__(self, message: str, param: str, code: str = "invalid_steering"):
        super().__init__(message)
        self.param = param
        self.code = code


@dataclass(frozen=True)
class NamedSteer:
    """One steer the server offers. ``gguf`` is set for an INN steer, ``directions`` ({layer:
    float32 vector}, to be scaled by alpha) for a control vector."""

    name: str
    source: str
    kind: str
    default_alpha: float
    layers: tuple[int, ...]
    gguf: Optional[SteerGGUF] = None
    away_gguf: Optional[SteerGGUF] = None  # a signed steerer's map for alpha < 0 (``gguf`` for alpha > 0)
    directions: Optional[dict[int, np.ndarray]] = None
    model_hint: str = ""  # a control vector's architecture (an INN steer GGUF carries its own)

    def describe(self) -> dict[str, Any]:
        return {"name": self.name, "kind": self.kind, "layers": list(self.layers), "default_alpha": self.default_alpha}


def load_steer(name: str, path: str, *, model_id: str, workdir: str) -> NamedSteer:
    """Load the steer file ``path`` as ``name``; a .safetensors steerer is exported into ``workdir``.
    Checks the file itself; whether it fits the served model is checked when a context takes it."""
    if not NAME_PATTERN.fullmatch(name):
        raise ConfigError(f"steer name '{name}' must be letters, digits, '_', '.' or '-' (not starting with those)")
    if os.path.isdir(path):
        raise ConfigError(f"{path} is a directory, not a steer file")
    if not os.path.isfile(path):
        raise MissingFileError(f"no file at {path}")
    prepared = for_llama(path, model_id=model_id, workdir=workdir, name=name)
    if prepared.kind == "controlvector":
        alpha = 1.0 if prepared.steerer is None else float(prepared.steerer.alpha)
        return _control_vector(name, path, prepared.path, alpha)
    steer = SteerGGUF.load(prepared.path)
    away = None if prepared.away_path is None else SteerGGUF.load(prepared.away_path)
    return NamedSteer(name, path, INN, steer.alpha, (steer.layer,), gguf=steer, away_gguf=away)


def _control_vector(name: str, source: str, path: str, alpha: float) -> NamedSteer:
    directions, info = read_control_vector(path)
    layers = tuple(sorted(directions))
    return NamedSteer(name, source, CONTROL_VECTOR, alpha, layers, directions=directions, model_hint=info["model_hint"])


class SteerCatalog:
    """The named steers, in the order given on the command line."""

    def __init__(self, steers: list[NamedSteer]):
        self.steers = {steer.name: steer for steer in steers}
        if len(self.steers) != len(steers):
            repeated = sorted({s.name for s in steers if sum(t.name == s.name for t in steers) > 1})
            raise ConfigError(f"steer name '{repeated[0]}' is given more than once")
        self._order = {name: i for i, name in enumerate(self.steers)}

    def __getitem__(self, name: str) -> NamedSteer:
        return self.steers[name]

    def of_kind(self, kind: str) -> list[NamedSteer]:
        return [steer for steer in self.steers.values() if steer.kind == kind]

    def parse(self, value: Any, where: str = "steering") -> Setting:
        """A request's ``steering``: null or [] (none), {"steer": NAME, "alpha": A} (alpha defaults to the
        steer's), or a list of those for several steers at once."""
        if value is None:
            return NO_STEERING
        items = value if isinstance(value, list) else [value]
        chosen: dict[str, float] = {}
        for i, item in enumerate(items):
            at = f"{where}[{i}]" if isinstance(value, list) else where
            if not isinstance(item, dict):
                raise SteeringError(f'{at} must be an object like {{"steer": "NAME", "alpha": 1.5}}', at)
            unknown = sorted(set(item) - {"steer", "alpha"})
            if unknown:
                raise SteeringError(f"{at} has unknown field '{unknown[0]}' (expected 'steer' and 'alpha')", at)
            name = item.get("steer")
            if not isinstance(name, str):
                raise SteeringError(f"{at}.steer must name a steer: {self.names()}", f"{at}.steer")
            if name not in self.steers:
                raise SteeringError(
                    f"unknown steer '{name}' in {at}.steer; this server has: {self.names()}",
                    f"{at}.steer",
                    "unknown_steer",
                )
            if name in chosen:
                raise SteeringError(f"steer '{name}' is listed twice in {where}", f"{at}.steer")
            chosen[name] = self._alpha(item.get("alpha"), self.steers[name], f"{at}.alpha")
        return tuple(sorted(chosen.items(), key=lambda pair: self._order[pair[0]]))

    @staticmethod
    def _alpha(value: Any, steer: NamedSteer, at: str) -> float:
        if value is None:
            return steer.default_alpha
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise SteeringError(f"{at} must be a number, got {value!r}", at)
        try:
            alpha = float32_alpha(value)
        except (ValueError, OverflowError):
            raise SteeringError(f"{at} must be a finite float32 number, got {value!r}", at) from None
        if steer.directions is not None:
            with np.errstate(over="ignore"):
                finite = all(np.isfinite(v * np.float32(alpha)).all() for v in steer.directions.values())
            if not finite:
                raise SteeringError(f"{at} {value!r} times the control vector '{steer.name}' overflows float32", at)
        return alpha

    def names(self) -> str:
        return ", ".join(self.steers) if self.steers else "(none: start the server with --steer NAME=FILE)"


def describe_setting(setting: Setting) -> list[dict[str, Any]]:
    return [{"steer": name, "alpha": alpha} for name, alpha in setting]
