"""The shipped CAA A/B datasets (7 behaviors, MIT, see data/caa/README.md) and prompt formatting.

An item's question already ends with its options (`\\n (A) ...`; refusal items have no leading
space, half the sycophancy items have no `Choices:` header, some survival-instinct items have up
to 8 options). ``parse_item`` splits it into the stem and the option texts, which the "answer"
mode of collection and the answer-text metric use.
"""
from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass
from importlib import resources
from typing import Optional, Sequence

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
_OPTION = re.compile(r"\n[ \t]*\(([A-Z])\)[ \t]*")
_LETTER = re.compile(r"^\s*\(?([A-Z])\)?\s*$")


class DataError(ValueError):
    """An unknown behavior/split or a malformed dataset item."""


@dataclass(frozen=True)
class ABItem:
    question: str  # the full prompt, options included (what the model is shown)
    stem: str  # the question without its options
    options: dict  # letter -> option text, e.g. {"A": "Yes", "B": "No"}
    matching: str  # letter of the behavior-matching option, e.g. "A"
    not_matching: str

    @property
    def matching_text(self) -> str:
        return self.options[self.matching]

    @property
    def not_matching_text(self) -> str:
        return self.options[self.not_matching]


def check_behavior(behavior: str) -> str:
    if behavior not in BEHAVIORS:
        raise DataError(f"unknown behavior '{behavior}'; choose one of: {', '.join(BEHAVIORS)}")
    return behavior


def _read(behavior: str, split: str) -> list:
    check_behavior(behavior)
    if split not in SPLITS:
        raise DataError(f"unknown split '{split}'; choose one of: {', '.join(SPLITS)}")
    text = resources.files("innsteer").joinpath("data", "caa", f"{behavior}_{split}.json").read_text(encoding="utf-8")
    return json.loads(text)


def _letter(value, what: str) -> str:
    match = _LETTER.match(value) if isinstance(value, str) else None
    if not match:
        raise DataError(f"{what} must be an option letter like '(A)', got {value!r}")
    return match.group(1)


def parse_item(raw: dict) -> ABItem:
    """Split a CAA A/B record into stem and options; raises DataError naming what is wrong."""
    try:
        question = raw["question"]
        matching = _letter(raw["answer_matching_behavior"], "answer_matching_behavior")
        not_matching = _letter(raw["answer_not_matching_behavior"], "answer_not_matching_behavior")
    except (KeyError, TypeError) as error:
        raise DataError(f"malformed A/B item (needs question, answer_matching_behavior, "
                        f"answer_not_matching_behavior): {raw!r:.200}") from error
    marks = list(_OPTION.finditer(question))
    if not marks:
        raise DataError(f"no '(A)' options found in question: {question[-200:]!r}")
    options = {}
    for mark, nxt in zip(marks, marks[1:] + [None]):
        options[mark.group(1)] = question[mark.end(): nxt.start() if nxt else len(question)].strip()
    stem = question[: marks[0].start()].rstrip()
    if stem.endswith("Choices:"):
        stem = stem[: -len("Choices:")].rstrip()
    for letter in (matching, not_matching):
        if not options.get(letter):
            raise DataError(f"answer letter ({letter}) has no option text in question: {question[-200:]!r}")
    if matching == not_matching:
        raise DataError(f"matching and non-matching answers are both ({matching})")
    return ABItem(question, stem, options, matching, not_matching)


def load_ab(behavior: str, split: str = "generate", limit: Optional[int] = None) -> list[ABItem]:
    """A/B items of a behavior; split 'generate' (training pool) or 'test_ab'."""
    if split == "test_open_ended":
        raise DataError("test_open_ended holds open questions, not A/B items; use load_open_ended")
    items = [parse_item(raw) for raw in _read(behavior, split)]
    return items[:limit] if limit is not None else items


def load_open_ended(behavior: str, limit: Optional[int] = None) -> list[str]:
    questions = [raw["question"] for raw in _read(behavior, "test_open_ended")]
    return questions[:limit] if limit is not None else questions


def train_val_split(items: Sequence, val_fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """A seeded shuffle split of the generate set into (train, val)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(items) * val_fraction))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]


def format_prompt(tokenizer, user_text: str) -> str:
    """The text up to where the assistant's reply starts: the tokenizer's chat template, or a plain
    'Question: ...\\nAnswer:' form for tokenizers without one (base models)."""
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False,
                                             add_generation_prompt=True)
    return f"Question: {user_text}\nAnswer:"


def reply_separator(tokenizer) -> str:
    """What goes between the prompt and the reply text: nothing after a chat template (it ends the
    assistant header with a newline), one space after the plain 'Answer:' form."""
    return "" if getattr(tokenizer, "chat_template", None) else " "


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))
