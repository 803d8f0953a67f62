"""How well a judge tells a behavior's matching answers from its non-matching ones, by the words
its behavior question offers: the AUROC of each wording on items of a shipped behavior.

    python bench/judge_wording.py hallucination wordings.json --split generate --n 20 [--judge default]

``wordings.json``: {"name": ["description", "opposite"], ...}. Choose on the generate split (the
training items); the test items are where ``innsteer eval --judge`` validates the judge.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from innsteer.datasets.caa import load_ab
from innsteer.eval.judge import auroc, scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("behavior")
    parser.add_argument("wordings")
    parser.add_argument("--split", default="generate", choices=["generate", "test_ab"])
    parser.add_argument("--n", type=int, default=20, help="items, a seeded sample (seed 1)")
    parser.add_argument("--judge", default="default")
    args = parser.parse_args()
    from innsteer.llama.judge import load_judge

    with open(args.wordings) as file:
        wordings = json.load(file)
    judge = load_judge(args.judge)
    items = load_ab(args.behavior, args.split)
    items = [items[i] for i in sorted(np.random.default_rng(1).permutation(len(items))[: args.n])]
    pairs = [(item.stem, item.matching_text) for item in items]
    pairs += [(item.stem, item.not_matching_text) for item in items]
    print(f"| {args.behavior} ({args.split}, {len(items)} items) | behavior AUROC | seconds |\n|---|---|---|")
    for name, (description, opposite) in wordings.items():
        start = time.perf_counter()
        got = scores(judge, ["behavior"], pairs, description, opposite)["behavior"]
        area = auroc(got[: len(items)], got[len(items) :])
        seconds = time.perf_counter() - start
        print(f"| {name}: {description!r} / {opposite!r} | {area:.3f} | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
