"""Where a command's items come from: a shipped CAA behavior, or a user's files.

A ``DataSource`` holds the training pool (methods are fitted on a seeded split of it), the test
items (scored, never trained on) and the open-ended prompts of the fluency measure.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from .ab import ABItem, DataError, hold_out
from .behaviors import BEHAVIOR_TEXT, BehaviorText
from .caa import load_ab, load_open_ended
from .files import NEUTRAL_PROMPTS, load_items, load_prompts


@dataclass
class DataSource:
    name: str  # the behavior, or the data file's stem (steerers and caches record it)
    train: list[ABItem]
    test: list[ABItem]
    prompts: list[str]
    text: BehaviorText = BehaviorText()  # the behavior in words: the prompt baselines' instructions, the judge's
    notes: tuple[str, ...] = ()  # what reading the files changed (repeated items left out), for the user

    @property
    def lettered(self) -> bool:
        """Whether every item shows lettered options (the letter metric and 'letter' activations exist)."""
        return all(item.lettered for item in self.train + self.test)


def shipped(behavior: str, prompts: Optional[str] = None) -> DataSource:
    """A shipped CAA behavior: its generate split to train on, its test_ab split, its open-ended prompts."""
    return DataSource(
        behavior,
        load_ab(behavior, "generate"),
        load_ab(behavior, "test_ab"),
        load_prompts(prompts) if prompts else load_open_ended(behavior),
        BEHAVIOR_TEXT[behavior],
    )


def from_files(
    data: str, test_data: Optional[str] = None, prompts: Optional[str] = None, *, test_fraction: float = 0.2
) -> DataSource:
    """A user's items (``datasets.files.load_items``); tested on ``test_data``, or on a seeded
    ``test_fraction`` of ``data`` held out from training. Prompts from ``prompts`` or the neutral set."""
    items = load_items(data)  # first: its errors name it before the test file's
    train, test, left_out = hold_out(
        items, load_items(test_data) if test_data else None, fraction=test_fraction, seed=0
    )
    notes = [
        f"{file}: {left_out[where]} repeated item(s) left out"
        for file, where in ((data, "items"), (test_data, "test"))
        if left_out[where]
    ]
    if left_out["shared"]:
        notes.append(f"{left_out['shared']} item(s) of {data} are also in {test_data}: left out of training")
    if test_data and len(train) < 2:
        raise DataError(
            f"{data} leaves {len(train)} item(s) to train on: {left_out['shared']} of its items are also in "
            f"{test_data}, and a method is never tested on what it trained on"
        )
    if not test:
        raise DataError(f"{data} holds too few items to hold out a test part; pass --test-data")
    prompt_texts = load_prompts(prompts) if prompts else list(NEUTRAL_PROMPTS)
    return DataSource(Path(data).stem, train, test, prompt_texts, notes=tuple(notes))
