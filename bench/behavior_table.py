"""Merge `innsteer eval --all --out DIR` runs (e.g. a second run extending some methods' alpha grid)
into one behaviors × methods trade-off table (the one in docs/RESULTS.md).

    python bench/behavior_table.py results/all results/extended > table.md

Points of the same behavior, method and alpha are taken from the first directory that has them;
the unsteered baselines of all runs must agree (the pipeline is deterministic).
"""

import json
import os
import sys
from pathlib import Path

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "python"), os.path.join(os.path.dirname(__file__), "..")]

from innsteer.datasets.caa import BEHAVIORS  # noqa: E402
from innsteer.eval.experiment import BUDGETS  # noqa: E402
from innsteer.eval.report import summary_markdown  # noqa: E402
from innsteer.eval.sweeps import SweepPoint, tradeoff  # noqa: E402


def merge(dirs: list[Path]) -> list[dict]:
    results = []
    for behavior in BEHAVIORS:
        runs = [
            json.loads((d / behavior / "report.json").read_text())
            for d in dirs
            if (d / behavior / "report.json").is_file()
        ]
        if not runs:
            continue
        merged, seen = dict(runs[0]), {}
        base = next(p for p in runs[0]["points"] if p["method"] == "none")
        for run in runs:
            other = next(p for p in run["points"] if p["method"] == "none")
            if abs(other["answer"] - base["answer"]) > 1e-6 or abs(other["nll"] - base["nll"]) > 1e-6:
                raise SystemExit(f"{behavior}: the runs' unsteered baselines differ; they are not comparable")
            for p in run["points"]:
                seen.setdefault((p["method"], p["alpha"]), p)
        merged["points"] = sorted(seen.values(), key=lambda p: (p["method"] != "none", p["method"], p["alpha"]))
        methods = list(dict.fromkeys(p["method"] for run in runs for p in run["points"] if p["method"] != "none"))
        baseline = SweepPoint(**base)
        merged["tradeoff"] = {
            m: tradeoff([SweepPoint(**p) for p in merged["points"] if p["method"] == m], baseline, "answer", BUDGETS)
            for m in methods
        }
        results.append(merged)
    return results


def main() -> None:
    dirs = [Path(d) for d in sys.argv[1:]]
    if not dirs:
        raise SystemExit(__doc__)
    results = merge(dirs)
    commands = "; ".join(
        f"`{json.loads((d / r['behavior'] / 'report.json').read_text())['command']}`"
        for d in dirs
        for r in results[:1]
        if (d / r["behavior"] / "report.json").is_file()
    )
    print(summary_markdown(results, commands.strip("`")))
    print("\n### Alpha grids per method\n")
    for r in results[:1]:
        for m in r["tradeoff"]:
            print(f"- {m}: " + ", ".join(f"{p['alpha']:g}" for p in r["points"] if p["method"] == m))


if __name__ == "__main__":
    main()
