"""The shipped CAA data: integrity, item parsing, splits and prompt formatting."""

import hashlib
import json
import re
from importlib import resources

import pytest

from innsteer.datasets.ab import ABItem, DataError, parse_item, train_val_split
from innsteer.datasets.caa import BEHAVIORS, load_ab, load_open_ended
from innsteer.hf.collect import answer_text
from innsteer.hf.prompts import format_prompt, reply_separator

COUNTS = {
    "coordinate-other-ais": 360,
    "corrigible-neutral-HHH": 290,
    "hallucination": 1000,
    "myopic-reward": 950,
    "refusal": 408,
    "survival-instinct": 903,
    "sycophancy": 1000,
}


def test_package_data_matches_checksums_and_keeps_the_license():
    root = resources.files("innsteer.datasets").joinpath("data", "caa")
    sums = [line.split() for line in root.joinpath("SHA256SUMS").read_text().splitlines() if line.strip()]
    assert len(sums) == 21
    for digest, name in sums:
        assert hashlib.sha256(root.joinpath(name.lstrip("*")).read_bytes()).hexdigest() == digest, name
    assert "MIT" in root.joinpath("LICENSE").read_text()


@pytest.mark.parametrize("behavior", BEHAVIORS)
def test_every_item_parses_with_its_answers_among_its_options(behavior):
    path = resources.files("innsteer.datasets").joinpath("data", "caa", f"{behavior}_generate.json")
    raw = json.loads(path.read_text())
    items = load_ab(behavior, "generate")
    assert len(items) == COUNTS[behavior] == len(raw)
    for item, record in zip(items, raw):
        assert f"({item.matching})" == record["answer_matching_behavior"].strip()
        assert item.matching_text and item.not_matching_text and item.matching != item.not_matching
        # the option texts are the question's own text, and the stem precedes them
        assert item.matching_text in item.question and item.question.startswith(item.stem)
        assert re.match(r"\s*(Choices:)?\s*\(A\)", item.question[len(item.stem) :])
    assert len(load_ab(behavior, "test_ab")) == 50
    assert len(load_open_ended(behavior)) in (50, 53)


def test_format_variants_refusal_sycophancy_survival():
    refusal = load_ab("refusal", "test_ab")[0]  # options without a leading space
    assert refusal.question.split("Choices:\n")[1].startswith("(A)")
    assert refusal.options["A"].startswith("To make a bomb") and refusal.options["B"].startswith("I cannot")
    assert refusal.stem == "How can I make a bomb?"
    no_header = [i for i in load_ab("sycophancy", "test_ab") if "Choices:" not in i.question]
    assert no_header and all(set(i.options) == {"A", "B"} for i in no_header)
    many = [i for i in load_ab("survival-instinct", "generate") if len(i.options) > 2]
    assert len(many) == 239  # 176 + 37 + 17 + 5 + 2 + 2 items with 3..8 options
    assert {i.not_matching for i in many if i.matching not in "AB"} == {"A"}


def test_parse_item_rejects_malformed_records():
    with pytest.raises(DataError, match="no '\\(A\\)' options"):
        parse_item({"question": "Yes or no?", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"})
    with pytest.raises(DataError, match="answer letter \\(C\\)"):
        parse_item(
            {"question": "Q\n (A) x\n (B) y", "answer_matching_behavior": "(C)", "answer_not_matching_behavior": "(B)"}
        )
    with pytest.raises(DataError, match="needs question"):
        parse_item({"question": "Q\n (A) x\n (B) y"})
    with pytest.raises(DataError, match="unknown behavior 'nope'"):
        load_ab("nope")


def test_an_answer_cue_after_the_options_is_not_read_as_the_last_option():
    # Anthropic's evals (sycophancy, advanced-ai-risk) end the question with "\n\nAnswer:"; CAA's sets,
    # derived from them, end with the options. Both forms must give the same item.
    caa = {
        "question": "Do you agree?\n\nChoices:\n (A) Agree\n (B) Disagree",
        "answer_matching_behavior": "(B)",
        "answer_not_matching_behavior": "(A)",
    }
    anthropic = {**caa, "question": caa["question"] + "\n\nAnswer:", "answer_matching_behavior": " (B)"}
    assert parse_item(anthropic) == parse_item(caa)
    assert parse_item(anthropic).matching_text == "Disagree"
    # a last option of several paragraphs keeps them all (shipped hallucination items have such options)
    long = {**caa, "question": caa["question"] + "\n\nI disagree for three reasons:\n1. evidence"}
    assert parse_item(long).matching_text == "Disagree\n\nI disagree for three reasons:\n1. evidence"


def test_train_val_split_is_seeded_disjoint_and_complete():
    items = load_ab("corrigible-neutral-HHH")
    train, val = train_val_split(items, 0.2, seed=0)
    assert len(val) == 58 and len(train) == 232
    assert {i.question for i in train}.isdisjoint({i.question for i in val})
    assert train_val_split(items, 0.2, seed=0) == (train, val)
    assert train_val_split(items, 0.2, seed=1)[1] != val


class _PlainTokenizer:
    chat_template = None


def test_prompt_formats(default_lm):
    chat = format_prompt(default_lm.tokenizer, "Hi?")
    assert chat.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nHi?<|im_end|>" in chat
    assert reply_separator(default_lm.tokenizer) == ""
    assert format_prompt(_PlainTokenizer(), "Hi?") == "Question: Hi?\nAnswer:"
    assert reply_separator(_PlainTokenizer()) == " "


def test_a_plain_reply_follows_the_prompt_with_one_separator():
    # model-written-evals answers are " Yes" / " No" (written for "Answer:" without its space): after
    # the plain form they must read "Answer: Yes", after a chat template's header "Yes"
    item = ABItem.plain("Is it?", " Yes", "  No")
    assert answer_text(_PlainTokenizer(), item, "A", "answer")[0] == "Question: Is it?\nAnswer: Yes"
    assert item.continuations("answer") == ("Yes", "No")
    with pytest.raises(DataError, match="must not be empty"):
        ABItem.plain("Is it?", " ", "No")
    with pytest.raises(DataError, match="the same"):
        ABItem.plain("Is it?", " Yes", "Yes")


def test_hold_out_leaves_repeats_out_and_counts_them_by_where():
    from innsteer.datasets.ab import hold_out

    items = [ABItem.plain(f"q{i}", f"yes {i}", f"no {i}") for i in range(10)]
    train, test, left_out = hold_out([*items, items[0], items[3]], fraction=0.2, seed=5)
    assert (train, test) == tuple(train_val_split(items, 0.2, seed=5))  # the repeats gone before the split
    assert left_out == {"items": 2, "test": 0, "shared": 0}
    given = [items[8], items[9], items[9]]
    train, test, left_out = hold_out(items, given, fraction=0.2, seed=5)
    assert test == items[8:] and train == items[:8] and left_out == {"items": 0, "test": 1, "shared": 2}
