"""The shipped CAA A/B datasets (Rimsky et al.; 7 behaviors, MIT, see data/caa/README.md)."""

from __future__ import annotations

import json
from importlib import resources
from typing import Optional

from .ab import ABItem, DataError, parse_item

BEHAVIORS = (
    "coordinate-other-ais",
    "corrigible-neutral-HHH",
    "hallucination",
    "myopic-reward",
    "refusal",
    "survival-instinct",
    "sycophancy",
)
SPLITS = ("generate", "test_ab", "test_open_ended")


def check_behavior(behavior: str) -> str:
    if behavior not in BEHAVIORS:
        raise DataError(f"unknown behavior '{behavior}'; choose one of: {', '.join(BEHAVIORS)}")
    return behavior


def _read(behavior: str, split: str) -> list:
    check_behavior(behavior)
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
    path = resources.files("innsteer.datasets").joinpath("data", "caa", f"{behavior}_{split}.json")
    text = path.read_text(encoding="utf-8")
    return json.loads(text)


def load_ab(behavior: str, split: str = "generate", limit: Optional[int] = None) -> list[ABItem]:
    """A/B items of a behavior; split 'generate' (training pool) or 'test_ab'."""
    if split == "test_open_ended":
        raise DataError("test_open_ended holds open questions, not A/B items; use load_open_ended")
    items = [parse_item(raw) for raw in _read(behavior, split)]
    return items[:limit] if limit is not None else items


def load_open_ended(behavior: str, limit: Optional[int] = None) -> list[str]:
    questions = [raw["question"] for raw in _read(behavior, "test_open_ended")]
    return questions[:limit] if limit is not None else questions
