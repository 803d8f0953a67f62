"""A/B items: a question with lettered options, the behavior-matching and the non-matching answer.

An item's question already ends with its options (`\\n (A) ...`; refusal items have no leading
space, half the sycophancy items have no `Choices:` header, some survival-instinct items have up
to 8 options). ``parse_item`` splits it into the stem and the option texts, which the "answer"
mode of collection and the answer-text metric use.
"""

from __future__ import annotations

import random
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

from ..core.errors import InnsteerError

_OPTION = re.compile(r"\n[ \t]*\(([A-Z])\)[ \t]*")
_LETTER = re.compile(r"^\s*\(?([A-Z])\)?\s*$")
# Anthropic's evals end a question with an answer cue after its options ("\n\nAnswer:"). Left in, it
# would be read as part of the last option's text (the reply the answer metric scores and the answer
# activations are read from); the chat template marks where the reply starts instead, as in CAA's sets.
_ANSWER_CUE = re.compile(r"\n[ \t]*\n[ \t]*[^\n]{1,40}:[ \t]*$")
# "fork": the answers' texts scored at their first differing token only (``eval.metrics.ABScorer``):
# the comparison a steer that acts on each state differently cannot win by telling the two forced
# answers apart (docs/RESULTS.md, "What the answer metric's lead is made of")
METRICS = ("answer", "letter", "fork")
# What ``innsteer tune`` ranks layers and options by (and leads its test comparison with) unless told
# otherwise. Not the answer metric: it scores each answer's whole text with the steer acting on that
# text, and a map trained on those very states can raise it by wrecking the non-matching text's
# likelihood while the model's choice does not move; the fork metric sees only states both answers share.
RANKED_BY = "fork"
# A text's length bound: the shipped items reach 2 200 characters; one of 100 000 made collection
# hold gigabytes of attention and activations before anything said why.
MAX_TEXT_CHARS = 8192


class DataError(InnsteerError, ValueError):
    """An unknown behavior/split or a malformed dataset item."""


@dataclass(frozen=True)
class ABItem:
    question: str  # the full prompt, options included (what the model is shown)
    stem: str  # the question without its options
    options: dict  # letter -> option text, e.g. {"A": "Yes", "B": "No"}
    matching: str  # letter of the behavior-matching option, e.g. "A"
    not_matching: str
    lettered: bool = True  # the model is shown the options by letter (CAA A/B); False: plain answers

    def __post_init__(self):
        check_text(self.question, "the question")
        for letter, text in self.options.items():
            check_text(text, f"option ({letter})")

    @classmethod
    def plain(cls, prompt: str, positive: str, negative: str) -> ABItem:
        """An item whose answers are plain replies (no lettered options in the prompt), e.g. a
        model-written-evals " Yes" / " No" item or a user's (prompt, positive, negative) pair;
        an empty prompt means bare texts (no chat template). The replies' leading whitespace goes: the
        prompt's format puts what separates it from the reply (``hf.prompts.reply_separator``), and
        " Yes" after a chat template's assistant header, or after "Answer: ", is not how replies start."""
        positive, negative = positive.lstrip(), negative.lstrip()
        if not positive or not negative:
            raise DataError("the positive and the negative answers must not be empty")
        if positive == negative:
            raise DataError(f"the positive and the negative text are the same ({positive!r}): nothing to contrast")
        return cls(prompt, prompt, {"A": positive, "B": negative}, "A", "B", lettered=False)

    @property
    def matching_text(self) -> str:
        return self.options[self.matching]

    @property
    def not_matching_text(self) -> str:
        return self.options[self.not_matching]

    def continuations(self, metric: str) -> tuple[str, str]:
        """The (matching, non-matching) reply strings a metric scores: '(A' / '(B' for 'letter'
        (CAA's metric), the options' own texts for 'answer' and 'fork'."""
        if metric == "letter":
            if not self.lettered:
                raise DataError("items with plain answers (no lettered options) have no letter metric; use 'answer'")
            return f"({self.matching}", f"({self.not_matching}"
        if metric in ("answer", "fork"):
            return self.matching_text, self.not_matching_text
        raise DataError(f"unknown metric '{metric}'; choose one of: {', '.join(METRICS)}")


def check_text(text: str, what: str) -> None:
    """Raise DataError unless ``text`` is Unicode text (JSON can hold lone surrogates, which no
    tokenizer encodes) of at most MAX_TEXT_CHARS characters."""
    try:
        text.encode()
    except UnicodeEncodeError as error:
        raise DataError(
            f"{what} holds {text[error.start]!r} at character {error.start}, a lone surrogate: not Unicode text"
        ) from None
    if len(text) > MAX_TEXT_CHARS:
        raise DataError(
            f"{what} is {len(text)} characters long, more than the {MAX_TEXT_CHARS} innsteer takes: shorten or split it"
        )


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
        raise DataError(
            f"malformed A/B item (needs question, answer_matching_behavior, answer_not_matching_behavior): {raw!r:.200}"
        ) from error
    marks = list(_OPTION.finditer(question))
    if not marks:
        raise DataError(f"no '(A)' options found in question: {question[-200:]!r}")
    cue = _ANSWER_CUE.search(question)
    if cue and cue.start() > marks[-1].end():
        question = question[: cue.start()]
    options = {}
    for mark, nxt in zip(marks, marks[1:] + [None]):
        options[mark.group(1)] = question[mark.end() : nxt.start() if nxt else len(question)].strip()
    stem = question[: marks[0].start()].rstrip()
    if stem.endswith("Choices:"):
        stem = stem[: -len("Choices:")].rstrip()
    for letter in (matching, not_matching):
        if not options.get(letter):
            raise DataError(f"answer letter ({letter}) has no option text in question: {question[-200:]!r}")
    if matching == not_matching:
        raise DataError(f"matching and non-matching answers are both ({matching})")
    return ABItem(question, stem, options, matching, not_matching)


def without_repeats(items: Sequence[ABItem], also_in: Sequence[ABItem] = ()) -> tuple[list[ABItem], int]:
    """``items`` less those that repeat an earlier one or one of ``also_in`` (question, options and
    answers the same), and how many were left out. A repeat on both sides of a held-out split would
    be tested on what was trained."""
    seen = {_key(item) for item in also_in}
    kept = []
    for item in items:
        key = _key(item)
        if key not in seen:
            seen.add(key)
            kept.append(item)
    return kept, len(items) - len(kept)


def hold_out(
    items: Sequence[ABItem], test_items: Optional[Sequence[ABItem]] = None, *, fraction: float, seed: int
) -> tuple[list[ABItem], list[ABItem], dict[str, int]]:
    """(training items, test items, how many were left out): ``test_items`` as given, else a seeded
    ``fraction`` of ``items`` held out. Repeats go first, counted by where they were: "items" (a repeat
    of an earlier item), "test" (of an earlier test item) and "shared" (a training item that is also a
    test item: it would be tested on what was trained)."""
    items, repeats = without_repeats(items)
    left_out = {"items": repeats, "test": 0, "shared": 0}
    if test_items is None:
        train, test = train_val_split(items, fraction, seed=seed)
    else:
        test, left_out["test"] = without_repeats(test_items)
        train, left_out["shared"] = without_repeats(items, also_in=test)
    return train, test, left_out


def _key(item: ABItem) -> tuple:
    return item.question, item.matching, item.not_matching, tuple(sorted(item.options.items()))


def train_val_split(items: Sequence, val_fraction: float = 0.2, seed: int = 0) -> tuple[list, list]:
    """A seeded shuffle split of the generate set into (train, val)."""
    if not 0 <= val_fraction < 1:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    order = list(range(len(items)))
    random.Random(seed).shuffle(order)
    n_val = int(round(len(items) * val_fraction))
    return [items[i] for i in order[n_val:]], [items[i] for i in order[:n_val]]
