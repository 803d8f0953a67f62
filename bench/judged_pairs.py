"""Paired judged comparisons for judged reports written before ``innsteer eval --judge`` kept them.

    python bench/judged_pairs.py results/judged/smollm2-refusal/report.json [...] [--judge default]

For each report (a shipped behavior's): judges again the behavior of the stored replies at each
method's alpha of equal coherence (the report names it), checks the means equal the report's, and
writes ``judged_comparisons`` into the report (INNSteer − CAA, prompt+INNSteer − prompt, ...,
paired over prompts) with ``judged_comparisons_by`` naming this command.
"""

from __future__ import annotations

import argparse
import sys

from innsteer.datasets.source import shipped
from innsteer.eval.judge import compare_stored_replies, judged_summary
from innsteer.eval.results import load, save


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("reports", nargs="+")
    parser.add_argument("--judge", default="default")
    args = parser.parse_args()
    from innsteer.llama.judge import load_judge

    judge = load_judge(args.judge)
    reports = []
    for path in args.reports:
        report = load(path)
        source = shipped(report.behavior)
        prompts = source.prompts[: report.n_prompts]
        report.extra["judged_comparisons"] = compare_stored_replies(
            report, judge, prompts, source.text.description, source.text.opposite
        )
        report.extra["judged_comparisons_by"] = "python bench/judged_pairs.py " + " ".join(sys.argv[1:])
        save(report, path)
        reports.append(report)
    print(judged_summary(reports))
    return 0


if __name__ == "__main__":
    sys.exit(main())
