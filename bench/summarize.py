"""The Markdown tables of docs/RESULTS.md (``innsteer.eval.summaries``), made from the result files in
results/ (written by bench/quality.py, bench/validation.py and innsteer eval / tune), so that no
number is copied by hand.

    python bench/summarize.py results/SmolLM2-135M-Instruct.Q4_1-*-L10-s012.json
    python bench/summarize.py --validation results/validation/*.json
    python bench/summarize.py --layers results/validation/layers-s0/*.json
    python bench/summarize.py --two-sided results/*-s012*.json
    python bench/summarize.py --tune results/tune/*/tune.json

For the test comparison: per behavior and metric, CAA's and INNSteer's seed-mean shift at the
0.5-nat budget and the area to 1 nat, the paired bootstrap 95 % interval of INNSteer - CAA, and the
verdict on the area: "above" (interval above 0), "at least" (interval contains 0), "below".
Other methods in the files (fitted on one seed) get a table of their own, beside that seed's CAA
and INNSteer.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

from innsteer.eval.judge import judged_summary  # noqa: E402
from innsteer.eval.results import load  # noqa: E402
from innsteer.eval.summaries import Summaries, gate_sensitivity  # noqa: E402
from innsteer.eval.tradeoff import REPETITION_GATE  # noqa: E402
from innsteer.eval.tune import tune_table  # noqa: E402


def plot_every_method(run, path: Path) -> None:
    """The first seed's behaviour-fluency curves of every method in one figure."""
    from innsteer.eval.protocol import protocol_report
    from innsteer.eval.report import plot_tradeoff

    plot_tradeoff(protocol_report(run), path)
    print(f"wrote {path}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--validation", action="store_true", help="the files are bench/validation.py's")
    parser.add_argument("--tune", action="store_true", help="the files are innsteer tune's tune.json records")
    parser.add_argument("--judged", action="store_true", help="the files are judged reports (innsteer eval --judge)")
    parser.add_argument(
        "--layers", action="store_true", help="the files are bench/validation.py's at several layers: the layer choice"
    )
    parser.add_argument(
        "--reference", default="caa-token", help="(--validation, --layers) the variant compared against"
    )
    parser.add_argument("--variants", default=None, help="(--layers) only these variants, comma-separated")
    parser.add_argument(
        "--two-sided",
        action="store_true",
        help="instead of the tables: whether each method steers at all (p_match's rise toward vs away)",
    )
    parser.add_argument("--plot", default=None, metavar="DIR", help="write each file's curves of every method here")
    parser.add_argument(
        "--gate-sensitivity",
        default=None,
        metavar="GATES",
        help="instead of the tables: INNSteer - CAA under each of these gates, e.g. none,0.1,0.2,0.4",
    )
    parser.add_argument(
        "--gate",
        default=str(REPETITION_GATE),
        help="the repetition gate of the summaries, or 'none' (default: %(default)s, innsteer.eval.tradeoff)",
    )
    args = parser.parse_args()
    if args.tune:
        print(tune_table([json.loads(Path(f).read_text()) for f in args.files]))  # tune.json records
        return 0
    results = [load(f) for f in args.files]
    tables = Summaries(None if args.gate == "none" else float(args.gate))
    if args.judged:
        print(judged_summary(results))
        return 0
    if args.gate_sensitivity:
        gates = [None if g == "none" else float(g) for g in args.gate_sensitivity.split(",")]
        print("#### INNSteer − CAA, area to 1 nat toward the behavior, answer metric, by repetition gate\n")
        print(gate_sensitivity(results, "answer", gates))
        return 0
    if args.two_sided:
        for metric in results[0].metrics:
            print(f"\n#### two-sided check, {metric} metric (test items)\n")
            print(tables.two_sided(results, metric))
            print(f"\n{tables.note()}")
        return 0
    for metric in results[0].metrics:
        if args.layers:
            print(f"\n#### layer per behavior, {metric} metric (validation)")
            only = set(args.variants.split(",")) if args.variants else None
            print(tables.layer_choice(results, args.reference, metric, only))
            print(f"\n{tables.note()}")
            continue
        if args.validation:
            for result in results:
                print(f"\n#### {result.behavior}, layer {result.layer}, {metric} metric (validation)\n")
                print(tables.variants(result, args.reference, metric))
                print(f"\n{tables.note()}")
            continue
        for side in ("toward", "away"):
            direction = "toward the behavior" if side == "toward" else "away from it (shift = decrease of p_match)"
            print(f"\n#### {metric} metric, steering {direction} (test items)\n")
            print(tables.comparison(results, metric, side))
            print(f"\n{tables.note()}")
        for result in results:
            if len(result.curves) > 2:
                print(f"\n#### every method, {result.behavior}, {metric} metric (test items)\n")
                print(tables.other_methods(result, metric))
                print(f"\n{tables.note()}")
    if args.plot:
        for result in results:
            if len(result.curves) > 2:
                name = f"{result.model_id}-{result.behavior}-L{result.layer}-every-method.png"
                plot_every_method(result, Path(args.plot) / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
