"""The layers and options ``innsteer tune`` chose, shipped as data.

Each ``tuned/<model id>/<behavior>.json`` is the ``tune.json`` one tuning run wrote, copied
unchanged from ``results/tune/<run>/`` with its provenance (command, commit, machine), so every
shipped choice is reproduced by the command it names.
``innsteer demo``, ``collect``, ``train`` and ``eval`` steer a shipped behavior on a model with a
record where its record says; elsewhere (your own data, another model) at ``default_layer``: the
median depth, relative to the model's, of the layers the shipped records chose for the method.
"""

from __future__ import annotations

import functools
import json
import statistics
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

TUNED_DIR = Path(__file__).with_name("tuned")
UNTUNED_FRACTION = 0.55  # the middle of tune's grid, while no record exists at all


@dataclass(frozen=True)
class Choice:
    """Where and how a method steers: its layer, its training options, and what chose them."""

    layer: int
    options: dict = field(default_factory=dict)
    source: str = "default"  # the record's path relative to TUNED_DIR, or "default"


@functools.cache
def records() -> dict[tuple[str, str], dict]:
    """{(model id, behavior): the shipped tune record}."""
    found = {}
    for path in sorted(TUNED_DIR.glob("*/*.json")):
        record = json.loads(path.read_text())
        found[(record["model_id"], record["behavior"])] = record
    return found


def record_path(model_id: str, behavior: str) -> Path:
    """Where ``innsteer tune``'s record for this model and behavior ships."""
    return TUNED_DIR / model_id / f"{behavior}.json"


def default_layer(n_layers: int, method: str = "innsteer") -> int:
    """The layer for data or a model without a record: the median of the depths the shipped records
    chose for ``method`` (each a fraction of its model's depth, as ``candidate_layers`` places the
    grid), on this model."""
    fractions = [
        record["chosen"][method]["layer"] / (record["n_layers"] - 1)
        for record in records().values()
        if method in record["chosen"]
    ]
    if not fractions:  # a method no record tuned: the others' choices
        fractions = [c["layer"] / (r["n_layers"] - 1) for r in records().values() for c in r["chosen"].values()]
    fractions = fractions or [UNTUNED_FRACTION]
    return min(n_layers - 2, max(0, round(statistics.median(fractions) * (n_layers - 1))))


def choice(model_id: str, behavior: Optional[str], method: str, n_layers: int) -> Choice:
    """The shipped record's layer and options for ``method`` on this model and behavior (None: data
    of one's own, which never takes a shipped behavior's record), else ``default_layer`` and the
    method's defaults."""
    record = records().get((model_id, behavior)) if behavior else None
    if record is not None and method in record["chosen"]:
        chosen = record["chosen"][method]
        source = record_path(model_id, behavior).relative_to(TUNED_DIR)
        return Choice(chosen["layer"], dict(chosen["options"]), str(source))
    return Choice(default_layer(n_layers, method))
