"""The Markdown tables of docs/RESULTS.md, made from the result files in results/ (written by
bench/quality.py and bench/validation.py), so that no number is copied by hand.

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
from typing import Optional

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT)]

from bench.quality import option_text  # noqa: E402
from bench.validation import interval  # noqa: E402
from bench.validation import table as validation_table  # noqa: E402
from innsteer.eval.judge import judged_summary  # noqa: E402
from innsteer.eval.tradeoff import REPETITION_GATE, has_replies, mirrored, paired_bootstrap  # noqa: E402
from innsteer.eval.tune import tune_table  # noqa: E402

# --gate: the repetition gate of every summary (innsteer.eval.tradeoff); files whose runs did not
# record their replies are summarized without it, and the tables say which.
GATE: Optional[float] = REPETITION_GATE
UNGATED: set[str] = set()


def bootstrap(runs_a: list, runs_b: list, label: str, **kwargs) -> dict:
    """``paired_bootstrap`` with the gate where both methods' runs recorded their replies."""
    if GATE is not None and not has_replies([*runs_a, *runs_b]):
        UNGATED.add(label)
        return paired_bootstrap(runs_a, runs_b, gate=None, **kwargs)
    return paired_bootstrap(runs_a, runs_b, gate=GATE, **kwargs)


def gate_note() -> str:
    """What the tables above were summarized with (and clears the list of ungated files)."""
    if GATE is None:
        text = "No repetition gate (every measured point counts)."
    elif UNGATED:
        text = (
            f"Repetition gate {GATE:g} on every row except {', '.join(sorted(UNGATED))} "
            "(replies not recorded: every point counts)."
        )
    else:
        text = f"Repetition gate {GATE:g} on every row (each curve ends before its first degenerate point)."
    UNGATED.clear()
    return text


def verdict(row: dict) -> str:
    return "above" if row["low"] > 0 else ("below" if row["high"] < 0 else "at least")


def options(result: dict) -> str:
    """INNSteer's training options in a result file: those given beyond the defaults, and the
    transport term's weight as the runs recorded it, since its default changed (finding 7)."""
    chosen = dict(result["specs"]["innsteer"]["options"])
    # files from before the transport term existed record no training config: it was 0 then
    chosen.setdefault(
        "transport_weight", result["runs"]["innsteer"][0]["extra"].get("train", {}).get("transport_weight", 0.0)
    )
    return ", ".join(f"{key}={option_text(value)}" for key, value in chosen.items())


def layers(result: dict) -> str:
    """The steered layer, or each method's where CAA ran at another (``bench/quality.py --caa-layer``)."""
    caa = result["specs"]["caa"].get("layer")
    return str(result["layer"]) if caa in (None, result["layer"]) else f"INNSteer {result['layer']}, CAA {caa}"


def comparison(results: list[dict], metric: str, side: str = "toward") -> str:
    lines = [
        "| behavior | layer | INNSteer options | seeds | unsteered p_match | CAA @0.5 | INNSteer @0.5 | "
        "INNSteer − CAA @0.5 | CAA AUC | INNSteer AUC | INNSteer − CAA, AUC | verdict (AUC) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    counts = {"above": 0, "at least": 0, "below": 0}
    for result in results:
        if metric not in result["metrics"] or "innsteer" not in result["runs"]:
            continue
        label = f"{result['behavior']} ({layers(result)})"
        sign = 1 if side == "toward" else -1
        rows = bootstrap(result["runs"]["innsteer"], result["runs"]["caa"], label, sign=sign, metric=metric)
        base = result["runs"]["caa"][0]["base_scores"][metric]
        at, auc = rows["at0.5"], rows["auc"]
        counts[verdict(auc)] += 1
        lines.append(
            f"| {result['behavior']} | {layers(result)} | {options(result)} | {','.join(map(str, result['seeds']))} | "
            f"{sum(base) / len(base):.3f} | "
            f"{at['b']:+.3f} | {at['a']:+.3f} | {interval(at)} | {auc['b']:+.3f} | {auc['a']:+.3f} | "
            f"{interval(auc)} | {verdict(auc)} |"
        )
    lines.append(
        f"\nINNSteer's area to 1 nat: above CAA (interval excluding 0) on {counts['above']}, at least CAA "
        f"(interval containing 0) on {counts['at least']}, below on {counts['below']} of {sum(counts.values())}."
    )
    return "\n".join(lines)


def two_sided(results: list[dict], metric: str) -> str:
    """Per behavior and method: the area to 1 nat of p_match's rise steering toward the behavior, of
    its rise steering away, and the paired interval of the difference (``tradeoff.mirrored``). Where
    that interval contains 0 the method moves p_match alike both ways: its "toward" shift is
    disruption, not steering, and a comparison of two methods there compares how they disrupt."""
    lines = [
        "| behavior | layer | method | rise toward, AUC | rise away, AUC | toward − away, AUC | steers? |",
        "|---|---|---|---|---|---|---|",
    ]
    for result in results:
        if metric not in result["metrics"]:
            continue
        layer = layers(result)
        for method in ("caa", "innsteer"):
            runs = result["runs"].get(method)
            if not runs:
                continue
            auc = bootstrap(runs, mirrored(runs), f"{result['behavior']} ({layer})", metric=metric)["auc"]
            steers = "yes" if auc["low"] > 0 else ("reversed" if auc["high"] < 0 else "not shown")
            lines.append(
                f"| {result['behavior']} | {layer} | {method} | {auc['a']:+.3f} | {auc['b']:+.3f} | "
                f"{interval(auc)} | {steers} |"
            )
    return "\n".join(lines)


def gate_sensitivity(results: list[dict], metric: str, gates: list[Optional[float]]) -> str:
    """INNSteer - CAA in area to 1 nat toward the behavior [95 % CI] under each repetition gate (None:
    every point counts), and each method's first degenerate alpha toward the behavior per seed."""
    names = ["none" if gate is None else f"{gate:g}" for gate in gates]
    lines = [
        "| behavior | layer | "
        + " | ".join(f"gate {name}" for name in names)
        + f" | first degenerate alpha (gate {REPETITION_GATE:g}): CAA | INNSteer |",
        "|---|---|" + "---|" * (len(gates) + 2),
    ]
    for result in results:
        runs = result["runs"]
        if not has_replies([*runs["caa"], *runs["innsteer"]]):
            continue
        diffs = [
            interval(paired_bootstrap(runs["innsteer"], runs["caa"], metric=metric, gate=gate)["auc"]) for gate in gates
        ]
        firsts = [", ".join(first_degenerate(run) for run in runs[name]) for name in ("caa", "innsteer")]
        lines.append(f"| {result['behavior']} | {layers(result)} | " + " | ".join(diffs + firsts) + " |")
    return "\n".join(lines)


def first_degenerate(run: dict) -> str:
    """The smallest positive alpha whose replies fail the repetition gate ("—": none)."""
    base = sum(run["base_repetition"]) / len(run["base_repetition"])
    means = {alpha: sum(r) / len(r) for alpha, r in zip(run["alphas"], run["repetition"])}
    failing = [alpha for alpha, mean in means.items() if alpha > 0 and mean - base > REPETITION_GATE]
    return f"{min(failing):g}" if failing else "—"


def other_methods(result: dict, metric: str) -> str:
    """Every method's curve summaries at the file's first seed, and the paired bootstrap interval of
    its difference to CAA at that seed (over items and prompts only: one seed)."""
    seed = result["seeds"][0]
    at_seed = {name: [run for run in runs if run["seed"] == seed] for name, runs in result["runs"].items()}
    lines = [
        f"| method ({result['behavior']}, seed {seed}) | shift@0.25 | shift@0.5 | shift@1.0 | AUC≤1 | "
        "− CAA at 0.5 | − CAA, AUC |",
        "|---|---|---|---|---|---|---|",
    ]
    for name in sorted(at_seed, key=lambda n: (n not in ("caa", "innsteer"), n != "caa", n)):
        row = bootstrap(at_seed[name], at_seed["caa"], result["behavior"], metric=metric, n_resamples=500)
        shifts = " | ".join(f"{row[key]['a']:+.3f}" for key in ("at0.25", "at0.5", "at1", "auc"))
        versus = "— | —" if name == "caa" else f"{interval(row['at0.5'])} | {interval(row['auc'])}"
        lines.append(f"| {name} | {shifts} | {versus} |")
    return "\n".join(lines)


def cells(values: dict, names: list[str], text) -> list[str]:
    """``text(values[name])`` for each name, "—" where that name was not measured."""
    return [text(values[name]) if name in values else "—" for name in names]


def layer_choice(results: list[dict], reference: str, metric: str, only: Optional[set[str]] = None) -> str:
    """Validation files of behaviors at several layers: each variant's area to 1 nat toward the
    behavior (and away) per layer, the difference with ``reference`` there, and the layer where each
    variant's area toward is largest (the protocol's per-behavior layer choice)."""
    lines = []
    for behavior in sorted({r["behavior"] for r in results}):
        at_layers = sorted((r for r in results if r["behavior"] == behavior), key=lambda r: r["layer"])
        names = {name for r in at_layers for name in r["runs"] if only is None or name in only or name == reference}
        variants = sorted(names, key=lambda n: (n != reference, n))
        others = [name for name in variants if name != reference]
        lines += [
            f"\n| {behavior}: layer | seeds | "
            + " | ".join(f"{name} AUC≤1" for name in variants)
            + "".join(f" | {name} − {reference}, AUC" for name in others)
            + " | "
            + " | ".join(f"away: {name} AUC≤1" for name in variants)
            + " |",
            "|" + "---|" * (2 + 2 * len(variants) + len(others)),
        ]
        best: dict[str, tuple[float, int]] = {}
        measured: dict[str, list[int]] = {name: [] for name in variants}
        for result in at_layers:
            runs = result["runs"]
            # a variant run at some of the layers only (an option validated where it was chosen) shows "—" elsewhere
            present = [name for name in variants if name in runs]
            label = f"{behavior} layer {result['layer']}"
            toward = {
                name: bootstrap(runs[name], runs[reference], label, metric=metric, n_resamples=500)["auc"]
                for name in present
            }
            away = {
                name: bootstrap(runs[name], runs[reference], label, sign=-1, metric=metric, n_resamples=500)["auc"]
                for name in present
            }
            for name in present:
                measured[name].append(result["layer"])
                if toward[name]["a"] > best.get(name, (-float("inf"), 0))[0]:
                    best[name] = (toward[name]["a"], result["layer"])

            seeds = ",".join(str(run["seed"]) for run in runs[reference])
            lines.append(
                f"| {result['layer']} | {seeds} | "
                + " | ".join(cells(toward, variants, lambda row: f"{row['a']:+.3f}"))
                + "".join(f" | {cell}" for cell in cells(toward, others, interval))
                + " | "
                + " | ".join(cells(away, variants, lambda row: f"{row['a']:+.3f}"))
                + " |"
            )
        chosen = ", ".join(
            f"{name} layer {layer}" if len(measured[name]) > 1 else f"{name} (run at layer {layer} only)"
            for name, (_, layer) in best.items()
        )
        lines.append(f"\nLargest area toward {behavior} on validation: {chosen}.")
    return "\n".join(lines)


def plot_every_method(result: dict, path: Path) -> None:
    """The first seed's behaviour-fluency curves of every method in one figure."""
    from innsteer.eval.protocol import protocol_report
    from innsteer.eval.report import plot_tradeoff

    plot_tradeoff(protocol_report(result), path)
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
    global GATE
    GATE = None if args.gate == "none" else float(args.gate)
    results = [json.loads(Path(f).read_text()) for f in args.files]
    if args.tune:
        print(tune_table(results))
        return 0
    if args.judged:
        print(judged_summary(results))
        return 0
    if args.gate_sensitivity:
        gates = [None if g == "none" else float(g) for g in args.gate_sensitivity.split(",")]
        print("#### INNSteer − CAA, area to 1 nat toward the behavior, answer metric, by repetition gate\n")
        print(gate_sensitivity(results, "answer", gates))
        return 0
    if args.two_sided:
        for metric in results[0]["metrics"]:
            print(f"\n#### two-sided check, {metric} metric (test items)\n")
            print(two_sided(results, metric))
            print(f"\n{gate_note()}")
        return 0
    for metric in results[0]["metrics"]:
        if args.layers:
            print(f"\n#### layer per behavior, {metric} metric (validation)")
            print(
                layer_choice(results, args.reference, metric, set(args.variants.split(",")) if args.variants else None)
            )
            print(f"\n{gate_note()}")
            continue
        if args.validation:
            for result in results:
                print(f"\n#### {result['behavior']}, layer {result['layer']}, {metric} metric (validation)\n")
                print(validation_table(result, args.reference, metric, bootstrap))
                print(f"\n{gate_note()}")
            continue
        for side in ("toward", "away"):
            direction = "toward the behavior" if side == "toward" else "away from it (shift = decrease of p_match)"
            print(f"\n#### {metric} metric, steering {direction} (test items)\n")
            print(comparison(results, metric, side))
            print(f"\n{gate_note()}")
        for result in results:
            if len(result["runs"]) > 2:
                print(f"\n#### every method, {result['behavior']}, {metric} metric (test items)\n")
                print(other_methods(result, metric))
                print(f"\n{gate_note()}")
    if args.plot:
        for result in results:
            if len(result["runs"]) > 2:
                name = f"{result['model_id']}-{result['behavior']}-L{result['layer']}-every-method.png"
                plot_every_method(result, Path(args.plot) / name)
    return 0


if __name__ == "__main__":
    sys.exit(main())
