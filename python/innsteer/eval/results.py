"""What the comparison protocol measures, typed: a ``Curve`` (one method, one seed), a ``Comparison``
(the paired bootstrap of two methods' summaries) and a ``Run`` (every curve and comparison of one
protocol call, with what it was measured on); ``save`` and ``load`` them as JSON with a schema
version.

The JSON layout is the one result files had before this module (``"runs"``: {method: [curves]},
``"comparison"`` and ``"compare"``, ``"comparisons"``), so the committed files of ``results/`` load
as schema 0. Keys a run does not define (a report's tables, a bench script's command and code
version, the judge's scores) are kept in ``Run.extra`` and written back where they were.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Optional

from ..core.errors import ConfigError
from ..core.files import write_atomically

SCHEMA = 1


@dataclass
class Curve:
    """One method's points on one seed: per alpha (both signs, in measuring order) each test item's
    p_match per metric, each fluency prompt's reply NLL sum, token count, repetition (seq-rep-4) and
    text; and the same of the unsteered model (``base_*``). ``points``: the points are not joined (a
    prompt is on or off). ``repetition`` and ``replies`` are None in files written before they were
    recorded (``innsteer.eval.backfill`` adds them)."""

    seed: int
    alphas: list[float]
    scores: dict[str, list[list[float]]]
    nll: list[list[float]]
    tokens: list[list[float]]
    base_scores: dict[str, list[float]]
    base_nll: list[float]
    base_tokens: list[float]
    repetition: Optional[list[list[float]]] = None
    replies: Optional[list[list[str]]] = None
    base_repetition: Optional[list[float]] = None
    base_replies: Optional[list[str]] = None
    points: bool = False
    layer: Optional[int] = None
    extra: dict = field(default_factory=dict)  # the steerer's training record (INNSteer's kept epoch, ...)

    @property
    def has_replies(self) -> bool:
        return self.repetition is not None and self.base_repetition is not None

    def mirrored(self) -> Curve:
        """The curve with every alpha's sign flipped: its toward side is this curve's away side."""
        return replace(self, alphas=[-alpha for alpha in self.alphas])

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self)}
        for key in ("repetition", "replies", "base_repetition", "base_replies", "layer"):
            if out[key] is None:
                del out[key]
        if not out["points"]:
            del out["points"]
        if not out["extra"] and self.layer is None:
            del out["extra"]
        return out

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "curve") -> Curve:
        return _build(cls, data, where)


@dataclass(frozen=True)
class Difference:
    """A paired difference of one summary: A's and B's point estimates, A - B and its 95 % interval."""

    a: float
    b: float
    diff: float
    low: float
    high: float

    def cell(self) -> str:
        return interval_cell(self.diff, self.low, self.high)


def interval_cell(diff: float, low: float, high: float) -> str:
    """A difference with its interval, marked ✓ where the interval is above 0, ✗ where below."""
    mark = " ✓" if low > 0 else (" ✗" if high < 0 else "")
    return f"{diff:+.3f} [{low:+.3f}, {high:+.3f}]{mark}"


@dataclass
class Comparison:
    """Method ``a`` minus method ``b``: {"<metric>/<side>": {summary: Difference}} for the metrics and
    sides ("toward", "away") both were measured on."""

    a: str
    b: str
    sides: dict[str, dict[str, Difference]] = field(default_factory=dict)

    def get(self, metric: str = "answer", side: str = "toward") -> dict[str, Difference]:
        """The summaries of one metric and side ({} where the pair was not measured there)."""
        return self.sides.get(f"{metric}/{side}", {})

    @property
    def label(self) -> str:
        return f"{self.a} - {self.b}"

    def sides_dict(self) -> dict:
        return {key: {s: vars(d).copy() for s, d in rows.items()} for key, rows in self.sides.items()}

    @classmethod
    def from_sides(cls, a: str, b: str, sides: Mapping, where: str = "comparison") -> Comparison:
        try:
            built = {key: {s: Difference(**row) for s, row in rows.items()} for key, rows in sides.items()}
        except (TypeError, AttributeError) as error:
            raise ConfigError(f"{where}: not a comparison of summaries ({error})") from None
        return cls(a, b, built)


@dataclass
class Run:
    """One call of the comparison protocol (``innsteer.eval.protocol.run_protocol``): every method's
    curves (``curves[method][i]``: seed ``seeds[i]``), measured on the test items or (``evaluated_on``
    "validation") each seed's validation part; ``comparison`` of the compared pair, ``comparisons``
    of the others; ``specs``: each method's ``MethodSpec.record()``. ``steerers`` (the first seed's,
    where asked for) is never saved."""

    behavior: str
    model_id: str
    layer: int
    seeds: list[int]
    n_test: int
    n_prompts: int
    max_new_tokens: int
    metrics: list[str]
    specs: dict[str, dict]
    curves: dict[str, list[Curve]]
    evaluated_on: str = "test"
    comparison: Optional[Comparison] = None
    comparisons: dict[str, Comparison] = field(default_factory=dict)
    instructions: dict[str, str] = field(default_factory=dict)
    extra: dict[str, Any] = field(default_factory=dict)
    steerers: dict = field(default_factory=dict, repr=False, compare=False)

    @property
    def compare(self) -> tuple[str, ...]:
        return (self.comparison.a, self.comparison.b) if self.comparison else ()

    @property
    def method_layers(self) -> dict[str, int]:
        """Each method's layer: its spec's, else the protocol's."""
        return {name: self.layer if spec.get("layer") is None else spec["layer"] for name, spec in self.specs.items()}

    def to_dict(self) -> dict:
        out = {
            "schema": SCHEMA,
            "behavior": self.behavior,
            "model_id": self.model_id,
            "layer": self.layer,
            "evaluated_on": self.evaluated_on,
            "seeds": list(self.seeds),
            "n_test": self.n_test,
            "n_prompts": self.n_prompts,
            "max_new_tokens": self.max_new_tokens,
            "metrics": list(self.metrics),
            "specs": self.specs,
            "compare": list(self.compare),
            "comparison": self.comparison.sides_dict() if self.comparison else {},
            "runs": {name: [curve.to_dict() for curve in curves] for name, curves in self.curves.items()},
        }
        if self.comparisons:
            out["comparisons"] = {label: c.sides_dict() for label, c in self.comparisons.items()}
        if self.instructions:
            out["instructions"] = dict(self.instructions)
        clash = set(self.extra) & set(out)
        if clash:
            raise ValueError(f"extra keys {sorted(clash)} would overwrite the run's own")
        return {**out, **self.extra}

    @classmethod
    def from_dict(cls, data: Mapping, where: str = "run") -> Run:
        if not isinstance(data, Mapping):
            raise ConfigError(f"{where}: not a protocol result (a JSON object is expected)")
        schema = data.get("schema", 0)
        if schema not in (0, SCHEMA):
            raise ConfigError(f"{where}: schema {schema!r}; this innsteer reads schemas 0 to {SCHEMA}")
        missing = [key for key in _RUN_KEYS if key not in data]
        if missing:
            raise ConfigError(f"{where}: not a protocol result (no {', '.join(missing)})")
        curves = data["runs"]
        if not isinstance(curves, Mapping) or not all(isinstance(c, list) for c in curves.values()):
            raise ConfigError(f"{where}: 'runs' must map each method to its list of curves")
        compare = list(data.get("compare") or ())
        comparison = None
        if data.get("comparison") and len(compare) == 2:
            comparison = Comparison.from_sides(*compare, data["comparison"], f"{where}: comparison")
        comparisons = {}
        for label, sides in (data.get("comparisons") or {}).items():
            a, _, b = label.partition(" - ")
            comparisons[label] = Comparison.from_sides(a, b, sides, f"{where}: comparisons[{label!r}]")
        own = {*_RUN_KEYS, "schema", "evaluated_on", "compare", "comparison", "comparisons", "instructions", "runs"}
        return cls(
            behavior=data["behavior"],
            model_id=data["model_id"],
            layer=data["layer"],
            seeds=list(data["seeds"]),
            n_test=data["n_test"],
            n_prompts=data["n_prompts"],
            max_new_tokens=data["max_new_tokens"],
            metrics=list(data["metrics"]),
            specs=dict(data["specs"]),
            curves={
                name: [Curve.from_dict(c, f"{where}: runs[{name!r}][{i}]") for i, c in enumerate(cs)]
                for name, cs in curves.items()
            },
            evaluated_on=data.get("evaluated_on", "test"),
            comparison=comparison,
            comparisons=comparisons,
            instructions=dict(data.get("instructions") or {}),
            extra={key: value for key, value in data.items() if key not in own},
        )


_RUN_KEYS = ("behavior", "model_id", "layer", "seeds", "n_test", "n_prompts", "max_new_tokens", "metrics", "specs")
_RUN_KEYS += ("runs",)


def _build(cls, data: Mapping, where: str):
    """``cls(**data)`` with one clear error for a missing or unknown field."""
    if not isinstance(data, Mapping):
        raise ConfigError(f"{where}: a JSON object is expected")
    names = {f.name for f in fields(cls)}
    unknown, missing = set(data) - names, [f.name for f in fields(cls) if f.name not in data and _required(f)]
    if unknown or missing:
        parts = ([f"unknown {', '.join(sorted(unknown))}"] if unknown else []) + (
            [f"no {', '.join(missing)}"] if missing else []
        )
        raise ConfigError(f"{where}: not a {cls.__name__.lower()} ({'; '.join(parts)})")
    return cls(**data)


def _required(f) -> bool:
    return f.default is MISSING and f.default_factory is MISSING


def save(run: Run, path: str | os.PathLike) -> Path:
    """Write ``run`` as JSON to ``path`` whole or not at all (a temporary file renamed over it: an
    interrupted save leaves the earlier file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, json.dumps(run.to_dict(), indent=1, default=str))
    return path


def load(path: str | os.PathLike) -> Run:
    """The run saved at ``path`` (also result files and reports from before schema 1)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except OSError as error:
        raise ConfigError(f"cannot read {path}: {error.strerror or error}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ConfigError(f"{path} is not JSON ({error})") from None
    return Run.from_dict(data, str(path))


def result_path(out: Path, run: Run) -> Path:
    """<model>-<behavior>-L<layer>-s<seeds>[-<INNSteer options>][-caaL<layer>][-<dtype>].json: INNSteer
    options other than TrainConfig's defaults are in the name, so runs of both can sit side by side."""
    options, caa_layer = run.specs["innsteer"]["options"], run.specs["caa"].get("layer")
    tag = "".join(f"-{key}{option_text(value)}" for key, value in _flat(options))
    dtype = run.extra.get("dtype", "float32")
    tag += ("" if caa_layer is None else f"-caaL{caa_layer}") + ("" if dtype == "float32" else f"-{dtype}")
    seeds = "".join(str(seed) for seed in run.seeds)
    return out / f"{run.model_id}-{run.behavior}-L{run.layer}-s{seeds}{tag}.json"


def _flat(options: dict, prefix: str = ""):
    """(key, value) of options, a signed steerer's away options as ``away.<key>``."""
    for key, value in options.items():
        if isinstance(value, dict):
            yield from _flat(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


SAME_SETTINGS = ("behavior", "model_id", "layer", "seeds", "n_test", "n_prompts", "max_new_tokens", "metrics")


def same_settings(earlier: Run, run: Run, keys: tuple[str, ...] = SAME_SETTINGS) -> bool:
    """Whether two runs were measured alike (runs saved before a dtype was recorded are float32)."""
    dtypes = (earlier.extra.get("dtype", "float32"), run.extra.get("dtype", "float32"))
    return dtypes[0] == dtypes[1] and all(getattr(earlier, key) == getattr(run, key) for key in keys)


def option_text(value) -> str:
    """An option's value as tables show it (1.0 -> '1'; a signed steerer's away options as
    '(transport_sides=both)')."""
    if isinstance(value, dict):
        return "(" + ", ".join(f"{key}={option_text(v)}" for key, v in value.items()) + ")"
    return f"{value:g}" if isinstance(value, float) else str(value)
