"""How well a judge tells a behavior's matching answers from its non-matching ones, by the words
its behavior question offers: the AUROC of each wording on items of a shipped behavior.

    python bench/judge_wording.py wordings.json --behavior hallucination [--split generate] [--n 20]
    python bench/judge_wording.py wordings.json --data my_items.jsonl [--judge default]

``wordings.json``: {"name": ["description", "opposite"], ...}: candidates for ``innsteer eval
--behavior-description / --opposite-description``. Choose on training items (a shipped behavior's
generate split, or your training file); the test items are where ``innsteer eval --judge``
validates the judge, so a wording chosen there would be validated on what it was chosen on.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from innsteer.core.errors import ConfigError, InnsteerError
from innsteer.datasets.caa import load_ab
from innsteer.datasets.source import from_files
from innsteer.eval.judge import auroc, scores


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("wordings")
    items_from = parser.add_mutually_exclusive_group(required=True)
    items_from.add_argument("--behavior", help="a shipped behavior's items")
    items_from.add_argument("--data", help="your items (any format innsteer tune --data reads)")
    parser.add_argument("--split", default="generate", choices=["generate", "test_ab"], help="with --behavior")
    parser.add_argument("--n", type=int, default=20, help="items, a seeded sample (seed 1)")
    parser.add_argument("--judge", default="default")
    args = parser.parse_args()
    from innsteer.llama.judge import load_judge

    try:
        with open(args.wordings) as file:
            wordings = json.load(file)
        if (
            not isinstance(wordings, dict)
            or not wordings
            or not all(
                isinstance(pair, list) and len(pair) == 2 and all(isinstance(w, str) and w for w in pair)
                for pair in wordings.values()
            )
        ):
            raise ConfigError(f'{args.wordings}: expected {{"name": ["description", "opposite"], ...}}')
        # --data: the training part only (eval holds the same seeded test part out)
        items = load_ab(args.behavior, args.split) if args.behavior else from_files(args.data).train
        judge = load_judge(args.judge)
    except (InnsteerError, OSError, ValueError) as error:  # ValueError: the file is not JSON
        print(f"judge_wording: {error}", file=sys.stderr)
        return 2
    items = [items[i] for i in sorted(np.random.default_rng(1).permutation(len(items))[: args.n])]
    pairs = [(item.stem, item.matching_text) for item in items]
    pairs += [(item.stem, item.not_matching_text) for item in items]
    where = f"{args.behavior} ({args.split}, " if args.behavior else f"{args.data} ("
    print(f"| {where}{len(items)} items) | behavior AUROC | seconds |\n|---|---|---|")
    for name, (description, opposite) in wordings.items():
        start = time.perf_counter()
        got = scores(judge, ["behavior"], pairs, description, opposite)["behavior"]
        area = auroc(got[: len(items)], got[len(items) :])
        seconds = time.perf_counter() - start
        print(f"| {name}: {description!r} / {opposite!r} | {area:.3f} | {seconds:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
