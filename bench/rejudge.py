"""Judge written judged reports again, from their stored replies (nothing is generated).

    python bench/rejudge.py results/judged/smollm2-hallucination/report.json [...] [--judge default]
    python bench/rejudge.py --stored results/judged/*/report.json

For a report on a shipped behavior, after its description was reworded or with another judge: the
judge's validation, judged scores and comparisons are replaced and report.json / report.md
rewritten (``innsteer.eval.report.rejudge``). A ``stages/judge.jsonl`` beside a report keeps the
judge's answers, so a rerun asks only what changed. With --stored, no judge: the methods are
compared at equal coherence again from the judged scores the reports hold (after a change to how
that alpha is chosen, ``innsteer.eval.report.reselect``). Prints the judged summary table.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from innsteer.core.errors import InnsteerError
from innsteer.eval.judge import judged_summary
from innsteer.eval.report import rejudge, reselect
from innsteer.eval.results import load


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--judge", default="default")
    parser.add_argument("--stored", action="store_true", help="no judge: compare again from the stored scores")
    args = parser.parse_args()
    from innsteer.llama.judge import load_judge

    command = "python bench/rejudge.py " + " ".join(sys.argv[1:])
    try:
        for path in args.reports:
            load(path)  # every report read before the judge loads (a minute) and any is rewritten
        if args.stored:
            for path in args.reports:
                reselect(path, command=command)
        else:
            judge = load_judge(args.judge)
            for path in args.reports:
                rejudge(path, judge, answers=Path(path).parent / "stages" / "judge.jsonl", command=command)
    except (InnsteerError, OSError) as error:
        print(f"rejudge: {error}", file=sys.stderr)
        return 2
    print(judged_summary([load(path) for path in args.reports]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
