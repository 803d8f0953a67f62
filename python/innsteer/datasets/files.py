"""Users' own data files: contrastive items and open-ended prompts.

Contrastive items (``load_items``), a JSON array, JSON Lines or CSV (``.csv``, a header row naming
the fields), each record one of:
- CAA / Anthropic A/B: ``question`` ending with ``(A)``/``(B)`` options (an answer cue after them, as
  Anthropic's ``"\n\nAnswer:"``, is dropped), ``answer_matching_behavior`` and
  ``answer_not_matching_behavior`` as option letters (``"(A)"``);
- Anthropic model-written-evals style: the same keys, but the answers are plain replies
  (``" Yes"`` / ``" No"``) and the question has no options; scored by the answer text.
  ``answer_not_matching_behavior`` may be a list: one item per non-matching answer;
- plain: ``{"prompt", "positive", "negative"}``.
Prompts for fluency (``load_prompts``): a text file with one prompt per line, or JSON / JSON Lines
of strings or of records with a ``question`` or ``prompt`` (CSV: such a column). Errors name the
file and the line (JSON Lines, CSV) or the record number (a JSON array).
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from collections.abc import Iterator

from ..core.errors import MissingFileError
from .ab import ABItem, DataError, check_text, parse_item

_LETTER_ANSWER = re.compile(r"^\s*\([A-Z]\)\s*$")
# General requests, unrelated to every shipped behavior's A/B and open-ended sets: fluency is
# measured on these when a dataset brings no open-ended prompts of its own.
NEUTRAL_PROMPTS = (
    "Explain how a bicycle's gears make climbing hills easier.",
    "Write a short paragraph about the history of tea.",
    "What are some good habits for learning a new language?",
    "Describe what happens during a thunderstorm.",
    "Give me three tips for cooking rice on a stove.",
    "Why do leaves change color in autumn?",
    "Summarize the plot of a classic fairy tale in a few sentences.",
    "How does a refrigerator keep food cold?",
    "What should I pack for a weekend hiking trip?",
    "Tell me something interesting about octopuses.",
)


def _read_text(path: str) -> str:
    if not os.path.isfile(path):
        raise MissingFileError(f"no data file at {path}")
    try:
        # utf-8-sig: a byte-order mark (Windows editors write one) is not part of the first record
        with open(path, encoding="utf-8-sig") as handle:
            return handle.read()
    except UnicodeDecodeError as error:
        raise DataError(f"{path} is not UTF-8 text ({error})") from error


def _records(path: str, text: str) -> Iterator[tuple[str, object]]:
    """(where, record) for each record of a JSON array, a JSON Lines file or a CSV file (``.csv``: a
    header row naming the fields, then one record per row)."""
    if path.lower().endswith(".csv"):
        rows = csv.DictReader(io.StringIO(text, newline=""))
        try:
            for row in rows:
                if None in row:  # DictReader's key for the fields past the header's
                    raise DataError(f"{path}:{rows.line_num}: more fields than the header names ({rows.fieldnames})")
                yield f"{path}:{rows.line_num}", row
        except csv.Error as error:
            raise DataError(f"{path}:{rows.line_num}: not valid CSV ({error})") from None
        return
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{error.lineno}: not valid JSON ({error.msg})") from error
        except RecursionError:
            raise DataError(f"{path}: JSON nested too deeply to be a data file") from None
        for number, record in enumerate(records, 1):
            yield f"{path}: record {number}", record
        return
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataError(f"{path}:{number}: not valid JSON ({error.msg})") from error
        except RecursionError:
            raise DataError(f"{path}:{number}: JSON nested too deeply to be a record") from None
        yield f"{path}:{number}", record


def _items_of(record: object) -> list[ABItem]:
    if not isinstance(record, dict):
        raise DataError(f"expected a JSON object, got {type(record).__name__}")
    if {"prompt", "positive", "negative"} <= set(record):
        texts = [record["prompt"], record["positive"], record["negative"]]
        if not all(isinstance(t, str) for t in texts):
            raise DataError("'prompt', 'positive' and 'negative' must be strings")
        return [ABItem.plain(*texts)]
    keys = ("question", "answer_matching_behavior", "answer_not_matching_behavior")
    if not set(keys) <= set(record):
        raise DataError(
            "a record needs either 'prompt', 'positive', 'negative' or 'question', 'answer_matching_behavior', "
            f"'answer_not_matching_behavior'; found keys {sorted(record)}"
        )
    question, matching, others = (record[key] for key in keys)
    others = others if isinstance(others, list) else [others]
    if not isinstance(question, str) or not isinstance(matching, str) or not all(isinstance(o, str) for o in others):
        raise DataError("'question' and the answers must be strings (the non-matching answer may be a list)")
    if _LETTER_ANSWER.match(matching):
        return [parse_item({**record, "answer_not_matching_behavior": other}) for other in others]
    return [ABItem.plain(question, matching, other) for other in others]


def load_items(path: str | os.PathLike) -> list[ABItem]:
    """Contrastive items from a user's file (see the module docstring); raises DataError naming the
    file and the line of the first malformed record, or if the file holds fewer than two items."""
    path = os.fspath(path)
    items = []
    for where, record in _records(path, _read_text(path)):
        try:
            items += _items_of(record)
        except DataError as error:
            raise DataError(f"{where}: {error}") from None
    if len(items) < 2:
        raise DataError(f"{path} holds {len(items)} contrastive item(s); steering needs at least 2")
    return items


def load_prompts(path: str | os.PathLike) -> list[str]:
    """Open-ended prompts from a text, JSON, JSON Lines or CSV file (see the module docstring)."""
    path = os.fspath(path)
    text = _read_text(path)
    if path.lower().endswith((".json", ".jsonl", ".csv")):
        prompts = []
        for where, record in _records(path, text):
            if isinstance(record, dict):
                record = record.get("question", record.get("prompt"))
            if not isinstance(record, str) or not record.strip():
                raise DataError(f"{where}: expected a prompt string or an object with 'question' or 'prompt'")
            prompts.append((where, record))
    else:
        prompts = [(f"{path}:{number}", line.strip()) for number, line in enumerate(text.splitlines(), 1)]
        prompts = [(where, line) for where, line in prompts if line]
    for where, prompt in prompts:
        try:
            check_text(prompt, "the prompt")
        except DataError as error:
            raise DataError(f"{where}: {error}") from None
    prompts = [prompt for _, prompt in prompts]
    if not prompts:
        raise DataError(f"{path} holds no prompts")
    return prompts
