"""Contrastive pairs for sentiment, built from the VADER lexicon (vaderSentiment, MIT): a data set
from outside the shipped CAA behaviors, for ``innsteer tune --data``.

Each item asks a one-word question about an everyday topic; the positive answer is a word raters
scored clearly positive in VADER (mean valence >= 2 on -4..4, standard deviation <= 1), the negative
answer one they scored clearly negative (<= -2), profanity, slurs and violent crimes left out
(``EXCLUDED``). Words and topics are drawn with a fixed seed.

    pip download --no-deps vaderSentiment==3.3.2 -d /tmp/vader && unzip -o /tmp/vader/*.whl -d /tmp/vader
    python bench/sentiment_pairs.py --lexicon /tmp/vader/vaderSentiment/vader_lexicon.txt \\
        --out results/data/vader-sentiment.jsonl
"""

from __future__ import annotations

import argparse
import json
import random
import re
from pathlib import Path

# VADER rates profanity, slurs and violent crimes strongly negative: they are kept out of the answers
# (a sentiment set, not a toxicity one).
EXCLUDED = re.compile(
    r"fuck|fuk|shit|bitch|bastard|slut|whore|fag|retard|tard$|^rap(e|ing|ist)|cock|dick|twat|wank|piss|jackass|asshole"
    r"|douche|damn|goddam|moron|idiot|imbecile|cwot|dumbhead|lamebrain|smartass|suicid|murder|kill|terror|tortur|assault"
    r"|abus|abduct|assassin|slave|racis|prison|jail|bomb|cancer|victim|casualt|fatalit"
)
QUESTIONS = (
    "How would you describe {topic}? Answer in one word.",
    "In one word, how do you feel about {topic}?",
    "Give me one word for {topic}.",
    "What one word comes to mind when you think of {topic}?",
    "Sum up {topic} in a single word.",
)
TOPICS = (
    "your weekend", "the weather today", "your neighbours", "the new library", "Monday mornings",
    "the local bakery", "your commute", "the city park", "the film you saw last night", "your job",
    "the hotel you stayed at", "online shopping", "the school play", "your first car", "the concert",
    "the restaurant down the street", "public transport", "your last holiday", "the football match",
    "the museum",
)  # fmt: skip


def clear_words(lexicon: Path, sign: int, min_valence: float = 2.0, max_std: float = 1.0) -> list[str]:
    """Lower-case alphabetic words of four letters or more whose mean valence is at least
    ``min_valence`` in the direction ``sign``, with raters agreeing (std <= ``max_std``)."""
    words = []
    for line in lexicon.read_text(encoding="utf-8").splitlines():
        word, mean, std, _ = line.split("\t", 3)
        if word.isalpha() and word.islower() and len(word) >= 4 and float(std) <= max_std and not EXCLUDED.search(word):
            if sign * float(mean) >= min_valence:
                words.append(word)
    return sorted(words)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lexicon", type=Path, required=True, help="vader_lexicon.txt from vaderSentiment 3.3.2")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--n", type=int, default=250)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    positive, negative = clear_words(args.lexicon, 1), clear_words(args.lexicon, -1)
    rng = random.Random(args.seed)
    items = []
    for pos, neg in zip(rng.sample(positive, args.n), rng.sample(negative, args.n)):
        question = rng.choice(QUESTIONS).format(topic=rng.choice(TOPICS))
        items.append({"prompt": question, "positive": pos.capitalize() + ".", "negative": neg.capitalize() + "."})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("".join(json.dumps(item) + "\n" for item in items))
    print(f"wrote {args.out}: {len(items)} items from {len(positive)} positive and {len(negative)} negative words")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
