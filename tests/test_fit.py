"""A steerer from a user's own texts: innsteer.fit, steerer.apply, and users' dataset files."""

import csv
import json
import re
from pathlib import Path

import pytest
import torch

import innsteer
from innsteer.core.errors import ConfigError, SteerFileError
from innsteer.datasets.ab import ABItem, DataError
from innsteer.datasets.files import NEUTRAL_PROMPTS, load_items, load_prompts
from innsteer.eval.metrics import ABScorer, generate

ROOT = Path(__file__).resolve().parents[1]

# Cheerful vs gloomy replies to everyday questions: the behaviour the pairs describe.
QUESTIONS = [
    "How was your weekend?",
    "What do you think of the new park?",
    "How do you feel about Mondays?",
    "What was the concert like?",
    "How is the weather today?",
    "How did the exam go?",
    "What do you think of the neighbours?",
    "How was the trip to the coast?",
    "How do you like your new job?",
    "What did you think of the film?",
    "How was dinner at the restaurant?",
    "How are the flowers in your garden?",
    "How was the first day of school?",
    "What do you think of the city?",
    "How was your birthday?",
    "How did the match go?",
]
CHEERFUL = [
    "It was wonderful, I loved every minute!",
    "It is beautiful, I am so happy we have it!",
    "I love them, a fresh start full of joy!",
    "It was amazing, pure happiness!",
    "It is lovely and bright, what a joy!",
    "It went great, I am thrilled!",
    "They are delightful, I adore them!",
    "It was fantastic, such a happy time!",
    "I love it, every day is a pleasure!",
    "It was brilliant, it made me so happy!",
    "It was delicious, a wonderful evening!",
    "They are gorgeous, blooming with joy!",
    "It was great fun, I loved it!",
    "It is wonderful, I am so glad to live here!",
    "It was the best day, I felt so loved!",
    "It went wonderfully, a joyful win!",
]
GLOOMY = [
    "It was awful, I hated every minute.",
    "It is ugly, I am so sad we have it.",
    "I hate them, a miserable start.",
    "It was terrible, pure misery.",
    "It is grey and dreary, how depressing.",
    "It went badly, I am miserable.",
    "They are dreadful, I can't stand them.",
    "It was horrible, such a sad time.",
    "I hate it, every day is a burden.",
    "It was dreadful, it made me so sad.",
    "It was disgusting, a miserable evening.",
    "They are dying, wilted and sad.",
    "It was awful, I hated it.",
    "It is horrible, I am so unhappy here.",
    "It was the worst day, I felt so alone.",
    "It went terribly, a miserable loss.",
]
TRIPLES = list(zip(QUESTIONS, CHEERFUL, GLOOMY))


@pytest.fixture(scope="module")
def held_out_scorer(default_lm):
    return ABScorer(default_lm, [ABItem.plain(*t) for t in TRIPLES[10:]], ("answer",))


@pytest.mark.slow
@pytest.mark.parametrize("method", ["caa", "innsteer"])
def test_fit_from_text_pairs_moves_the_behaviour_they_describe(default_lm, held_out_scorer, method):
    steerer = innsteer.fit(default_lm.model, default_lm.tokenizer, TRIPLES[:10], layer=10, method=method, tokens="all")
    assert steerer.layer == 10 and steerer.model_id == default_lm.model_id and steerer.extra["tokens"] == "all"
    base = held_out_scorer.scores()["answer"]
    steered = held_out_scorer.scores(steerer, 4.0)["answer"]
    print(f"{method}: held-out p(cheerful) {base.mean():.3f} -> {steered.mean():.3f}")
    assert steered.mean() > base.mean() + 0.05
    assert (steered > base).float().mean() >= 0.8  # most held-out pairs move, not one outlier
    against = held_out_scorer.scores(steerer, -4.0)["answer"]
    assert against.mean() < base.mean()


@pytest.mark.slow
def test_bare_text_pairs_and_every_token_choice(default_lm):
    pairs = list(zip(CHEERFUL[:8], GLOOMY[:8]))
    for tokens in ("mean", "last", "all"):
        steerer = innsteer.fit(default_lm, None, pairs, layer=6, method="caa", tokens=tokens)
        assert steerer.hidden_size == 576 and torch.isfinite(steerer.vector).all() and steerer.vector.norm() > 0


@pytest.mark.slow
def test_apply_steers_generate_and_refuses_another_model(default_lm):
    steerer = innsteer.fit(default_lm, None, TRIPLES[:8], layer=10, method="caa")
    prompts = ["Tell me about your day."]
    plain = generate(default_lm, prompts, max_new_tokens=12)[0]
    with steerer.apply(default_lm.model, alpha=8.0):
        enc = default_lm.tokenizer(
            default_lm.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompts[0]}], tokenize=False, add_generation_prompt=True
            ),
            return_tensors="pt",
        )
        steered = default_lm.model.generate(**enc, max_new_tokens=12, do_sample=False)
    steered_text = default_lm.tokenizer.decode(steered[0, enc.input_ids.shape[1] :], skip_special_tokens=True)
    assert steered_text.strip() != plain[0].strip()
    assert generate(default_lm, prompts, max_new_tokens=12)[0] == plain  # leaving the block removes the hook
    steerer.model_id = "another-model"
    with pytest.raises(SteerFileError, match="trained on 'another-model'"):
        with steerer.apply(default_lm.model):
            pass


def test_bad_pairs_are_refused_before_any_model_work(default_lm):
    for pairs, message in (
        ([("only one", "pair")], "at least 2"),
        ([("a", "b"), ("a", "b", "c", "d")], "pair 1 must be"),
        ([("a", "b"), ("same", "same")], "nothing to contrast"),
        ([("a", "b"), ("", "x")], "empty"),
    ):
        with pytest.raises((ConfigError, DataError), match=message):
            innsteer.fit(default_lm, None, pairs, layer=3)
    with pytest.raises(ConfigError, match="unknown method"):
        innsteer.fit(default_lm, None, TRIPLES[:4], layer=3, method="nope")
    with pytest.raises(ConfigError, match="unknown token choice"):
        innsteer.fit(default_lm, None, TRIPLES[:4], layer=3, tokens="first")


def _write(path: Path, lines) -> Path:
    path.write_text("\n".join(json.dumps(line) if not isinstance(line, str) else line for line in lines) + "\n")
    return path


def test_the_three_file_formats(tmp_path):
    caa = _write(
        tmp_path / "caa.jsonl",
        [
            {
                "question": "Do you agree?\n\nChoices:\n (A) Yes\n (B) No",
                "answer_matching_behavior": "(A)",
                "answer_not_matching_behavior": "(B)",
            }
        ]
        * 2,
    )
    items = load_items(caa)
    assert items[0].lettered and items[0].matching_text == "Yes" and items[0].continuations("letter") == ("(A", "(B")
    mwe = _write(
        tmp_path / "persona.jsonl",
        [
            {
                "question": 'Is the following statement something you would say?\n"I like rules"',
                "answer_matching_behavior": " Yes",
                "answer_not_matching_behavior": " No",
            },
            {
                "question": 'Is the following statement something you would say?\n"I hate rules"',
                "answer_matching_behavior": " No",
                "answer_not_matching_behavior": [" Yes", " Maybe"],
            },
        ],
    )
    items = load_items(mwe)
    assert len(items) == 3 and not items[0].lettered
    # replies start where the prompt's format says: no leading space after the chat template or "Answer:"
    assert items[1].continuations("answer") == ("No", "Yes") and items[2].continuations("answer") == ("No", "Maybe")
    with pytest.raises(DataError, match="no letter metric"):
        items[0].continuations("letter")
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps([{"prompt": q, "positive": p, "negative": n} for q, p, n in TRIPLES[:3]]))
    items = load_items(plain)
    assert [(i.question, i.matching_text, i.not_matching_text) for i in items] == TRIPLES[:3]


def test_malformed_files_name_the_file_and_line(tmp_path):
    good = json.dumps({"prompt": "p", "positive": "a", "negative": "b"})
    cases = [
        ([good, "{not json"], r"bad.jsonl:2: not valid JSON"),
        ([good, "", json.dumps({"prompt": "p", "positive": "a"})], r"bad.jsonl:3: a record needs either"),
        ([good, json.dumps([1, 2])], r"bad.jsonl:2: expected a JSON object"),
        ([good, json.dumps({"prompt": "p", "positive": "a", "negative": "a"})], r"bad.jsonl:2: .*nothing to contrast"),
        (
            [
                good,
                json.dumps(
                    {"question": "no options", "answer_matching_behavior": "(A)", "answer_not_matching_behavior": "(B)"}
                ),
            ],
            r"bad.jsonl:2: no '\(A\)' options",
        ),
        ([good], r"holds 1 contrastive item"),
        ([""], r"holds 0 contrastive item"),
    ]
    for lines, message in cases:
        with pytest.raises(DataError, match=message):
            load_items(_write(tmp_path / "bad.jsonl", lines))
    array = tmp_path / "bad.json"
    array.write_text(json.dumps([json.loads(good), {"prompt": 3, "positive": "a", "negative": "b"}]))
    with pytest.raises(DataError, match=r"bad.json: record 2: 'prompt', 'positive' and 'negative' must be strings"):
        load_items(array)
    (tmp_path / "latin1.jsonl").write_bytes(b'{"prompt": "caf\xe9"}\n')
    with pytest.raises(DataError, match="not UTF-8"):
        load_items(tmp_path / "latin1.jsonl")
    with pytest.raises(FileNotFoundError, match="no data file"):
        load_items(tmp_path / "missing.jsonl")


def test_prompt_files(tmp_path):
    (tmp_path / "p.txt").write_text("First question?\n\n  Second one.  \n")
    assert load_prompts(tmp_path / "p.txt") == ["First question?", "Second one."]
    _write(tmp_path / "p.jsonl", [{"question": "Q1"}, json.dumps("Q2"), {"prompt": "Q3"}])
    assert load_prompts(tmp_path / "p.jsonl") == ["Q1", "Q2", "Q3"]
    _write(tmp_path / "bad.jsonl", [{"question": "Q1"}, {"answer": 3}])
    with pytest.raises(DataError, match="bad.jsonl:2: expected a prompt"):
        load_prompts(tmp_path / "bad.jsonl")
    (tmp_path / "empty.txt").write_text("\n\n")
    with pytest.raises(DataError, match="holds no prompts"):
        load_prompts(tmp_path / "empty.txt")
    assert len(NEUTRAL_PROMPTS) >= 10 and len(set(NEUTRAL_PROMPTS)) == len(NEUTRAL_PROMPTS)


def test_csv_files_read_as_their_json_records(tmp_path):
    records = [{"prompt": q, "positive": p, "negative": n} for q, p, n in TRIPLES[:3]]
    records[0]["prompt"] = 'A prompt, with a comma, "quotes"\nand a second line'
    with (tmp_path / "pairs.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, ["prompt", "positive", "negative"])
        writer.writeheader()
        writer.writerows(records)
    _write(tmp_path / "pairs.jsonl", records)
    assert load_items(tmp_path / "pairs.csv") == load_items(tmp_path / "pairs.jsonl")
    (tmp_path / "prompts.csv").write_text("id,question\n1,First?\n2,Second?\n")
    assert load_prompts(tmp_path / "prompts.csv") == ["First?", "Second?"]
    (tmp_path / "wide.csv").write_text("prompt,positive,negative\na,b,c\nd,e,f,g\n")
    with pytest.raises(DataError, match="wide.csv:3: more fields than the header"):
        load_items(tmp_path / "wide.csv")
    (tmp_path / "keys.csv").write_text("text,label\na,1\n")
    with pytest.raises(DataError, match="keys.csv:2: a record needs either"):
        load_items(tmp_path / "keys.csv")
    (tmp_path / "short.csv").write_text("prompt,positive,negative\na,b,c\nd,e\n")
    with pytest.raises(DataError, match="short.csv:3: 'prompt', 'positive' and 'negative' must be strings"):
        load_items(tmp_path / "short.csv")


def test_a_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    # Windows editors start UTF-8 files with one; read as text it broke the first JSON line
    bom = b"\xef\xbb\xbf"
    (tmp_path / "p.txt").write_bytes(bom + b"First?\nSecond?\n")
    assert load_prompts(tmp_path / "p.txt") == ["First?", "Second?"]
    pairs = [{"prompt": q, "positive": p, "negative": n} for q, p, n in TRIPLES[:2]]
    (tmp_path / "pairs.jsonl").write_bytes(bom + "".join(json.dumps(r) + "\n" for r in pairs).encode())
    (tmp_path / "pairs.json").write_bytes(bom + json.dumps(pairs).encode())
    for name in ("pairs.jsonl", "pairs.json"):
        assert [(i.question, i.matching_text, i.not_matching_text) for i in load_items(tmp_path / name)] == TRIPLES[:2]


@pytest.mark.slow
def test_readme_python_example_runs(tmp_path, monkeypatch):
    """The README's "your own data" example, run as written."""
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"<!-- fit-example -->\s*```python\n(.*?)```", readme, re.S).group(1)
    namespace = {}
    monkeypatch.chdir(tmp_path)  # the example saves a file
    exec(compile(block, "README.md", "exec"), namespace)
    assert namespace["steerer"].layer == 10 and isinstance(namespace["reply"], str) and namespace["reply"]
    assert innsteer.load(tmp_path / "cheerful.safetensors").layer == 10
