"""The Markdown tables of docs/RESULTS.md, made from saved protocol runs (``innsteer.eval.results``)
so that no number is copied by hand: the test comparison of INNSteer and CAA on both sides, the
two-sided check, every method of a run, the repetition gate's sensitivity, and the validation
study's variant and layer tables. ``bench/summarize.py`` is the command line over them.

Every summary goes through one ``Summaries`` object: its repetition gate applies wherever both
compared methods' curves recorded their replies, and ``note()`` says which rows went without.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

from .results import Curve, Difference, Run, option_text
from .tradeoff import REPETITION_GATE, has_replies, mirrored, paired_bootstrap


def interval(row: Difference) -> str:
    """A paired difference as 'difference [low, high]'."""
    return f"{row.diff:+.3f} [{row.low:+.3f}, {row.high:+.3f}]"


def verdict(row: Difference) -> str:
    return "above" if row.low > 0 else ("below" if row.high < 0 else "at least")


def options(run: Run) -> str:
    """INNSteer's training options in a run: those given beyond the defaults, and the transport
    term's weight as its curves recorded it, since its default changed (finding 7)."""
    chosen = dict(run.specs["innsteer"]["options"])
    # files from before the transport term existed record no training config: it was 0 then
    chosen.setdefault("transport_weight", run.curves["innsteer"][0].extra.get("train", {}).get("transport_weight", 0.0))
    return ", ".join(f"{key}={option_text(value)}" for key, value in chosen.items())


def layers(run: Run) -> str:
    """The steered layer, or each method's where CAA ran at another (``bench/quality.py --caa-layer``)."""
    caa = run.specs["caa"].get("layer")
    return str(run.layer) if caa in (None, run.layer) else f"INNSteer {run.layer}, CAA {caa}"


def first_degenerate(curve: Curve) -> str:
    """The smallest positive alpha whose replies fail the repetition gate ("—": none)."""
    base = sum(curve.base_repetition) / len(curve.base_repetition)
    means = {alpha: sum(r) / len(r) for alpha, r in zip(curve.alphas, curve.repetition)}
    failing = [alpha for alpha, mean in means.items() if alpha > 0 and mean - base > REPETITION_GATE]
    return f"{min(failing):g}" if failing else "—"


def _cells(values: dict, names: list[str], text) -> list[str]:
    """``text(values[name])`` for each name, "—" where that name was not measured."""
    return [text(values[name]) if name in values else "—" for name in names]


class Summaries:
    """The tables, summarized with repetition gate ``gate`` (None: every point counts)."""

    def __init__(self, gate: Optional[float] = REPETITION_GATE):
        self.gate = gate
        self.ungated: set[str] = set()

    def bootstrap(self, curves_a: list[Curve], curves_b: list[Curve], label: str, **kwargs) -> dict[str, Difference]:
        """``paired_bootstrap`` with the gate where both methods' curves recorded their replies."""
        if self.gate is not None and not has_replies([*curves_a, *curves_b]):
            self.ungated.add(label)
            return paired_bootstrap(curves_a, curves_b, gate=None, **kwargs)
        return paired_bootstrap(curves_a, curves_b, gate=self.gate, **kwargs)

    def note(self) -> str:
        """What the tables since the last note were summarized with."""
        if self.gate is None:
            text = "No repetition gate (every measured point counts)."
        elif self.ungated:
            text = (
                f"Repetition gate {self.gate:g} on every row except {', '.join(sorted(self.ungated))} "
                "(replies not recorded: every point counts)."
            )
        else:
            text = f"Repetition gate {self.gate:g} on every row (each curve ends before its first degenerate point)."
        self.ungated.clear()
        return text

    def comparison(self, runs: Sequence[Run], metric: str, side: str = "toward") -> str:
        """Per behavior: CAA's and INNSteer's seed-mean shift at 0.5 nat and area to 1 nat, the
        paired interval of INNSteer - CAA and the verdict on the area."""
        lines = [
            "| behavior | layer | INNSteer options | seeds | unsteered p_match | CAA @0.5 | INNSteer @0.5 | "
            "INNSteer − CAA @0.5 | CAA AUC | INNSteer AUC | INNSteer − CAA, AUC | verdict (AUC) |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        counts = {"above": 0, "at least": 0, "below": 0}
        for run in runs:
            if metric not in run.metrics or "innsteer" not in run.curves:
                continue
            label = f"{run.behavior} ({layers(run)})"
            sign = 1 if side == "toward" else -1
            rows = self.bootstrap(run.curves["innsteer"], run.curves["caa"], label, sign=sign, metric=metric)
            base = run.curves["caa"][0].base_scores[metric]
            at, auc = rows["at0.5"], rows["auc"]
            counts[verdict(auc)] += 1
            lines.append(
                f"| {run.behavior} | {layers(run)} | {options(run)} | {','.join(map(str, run.seeds))} | "
                f"{sum(base) / len(base):.3f} | "
                f"{at.b:+.3f} | {at.a:+.3f} | {interval(at)} | {auc.b:+.3f} | {auc.a:+.3f} | "
                f"{interval(auc)} | {verdict(auc)} |"
            )
        lines.append(
            f"\nINNSteer's area to 1 nat: above CAA (interval excluding 0) on {counts['above']}, at least CAA "
            f"(interval containing 0) on {counts['at least']}, below on {counts['below']} of {sum(counts.values())}."
        )
        return "\n".join(lines)

    def two_sided(self, runs: Sequence[Run], metric: str) -> str:
        """Per behavior and method: the area to 1 nat of p_match's rise steering toward the behavior,
        of its rise steering away, and the paired interval of the difference (``tradeoff.mirrored``).
        Where that interval contains 0 the method moves p_match alike both ways: its "toward" shift
        is disruption, not steering."""
        lines = [
            "| behavior | layer | method | rise toward, AUC | rise away, AUC | toward − away, AUC | steers? |",
            "|---|---|---|---|---|---|---|",
        ]
        for run in runs:
            if metric not in run.metrics:
                continue
            layer = layers(run)
            for method in ("caa", "innsteer"):
                curves = run.curves.get(method)
                if not curves:
                    continue
                auc = self.bootstrap(curves, mirrored(curves), f"{run.behavior} ({layer})", metric=metric)["auc"]
                steers = "yes" if auc.low > 0 else ("reversed" if auc.high < 0 else "not shown")
                cells = f"{auc.a:+.3f} | {auc.b:+.3f} | {interval(auc)} | {steers}"
                lines.append(f"| {run.behavior} | {layer} | {method} | {cells} |")
        return "\n".join(lines)

    def other_methods(self, run: Run, metric: str) -> str:
        """Every method's curve summaries at the run's first seed, and the paired bootstrap interval
        of its difference to CAA at that seed (over items and prompts only: one seed)."""
        seed = run.seeds[0]
        at_seed = {name: [c for c in curves if c.seed == seed] for name, curves in run.curves.items()}
        lines = [
            f"| method ({run.behavior}, seed {seed}) | shift@0.25 | shift@0.5 | shift@1.0 | AUC≤1 | "
            "− CAA at 0.5 | − CAA, AUC |",
            "|---|---|---|---|---|---|---|",
        ]
        for name in sorted(at_seed, key=lambda n: (n not in ("caa", "innsteer"), n != "caa", n)):
            row = self.bootstrap(at_seed[name], at_seed["caa"], run.behavior, metric=metric, n_resamples=500)
            shifts = " | ".join(f"{row[key].a:+.3f}" for key in ("at0.25", "at0.5", "at1", "auc"))
            versus = "— | —" if name == "caa" else f"{interval(row['at0.5'])} | {interval(row['auc'])}"
            lines.append(f"| {name} | {shifts} | {versus} |")
        return "\n".join(lines)

    def variants(self, run: Run, reference: str, metric: str = "answer") -> str:
        """A validation run's variants: each one's seed-mean summaries toward the behavior, its
        difference with ``reference`` [95 % CI] at 0.5 nats and in area, and its area away."""
        lines = [
            f"| variant | seeds | shift@0.25 | shift@0.5 | shift@1.0 | AUC≤1 | − {reference} at 0.5 | "
            f"− {reference}, AUC | away: AUC≤1 | away: − {reference}, AUC |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        curves = run.curves
        for name in sorted(curves, key=lambda n: (n != reference, n)):
            label = f"{run.behavior} layer {run.layer}"
            row = self.bootstrap(curves[name], curves[reference], label, metric=metric, n_resamples=500)
            away = self.bootstrap(curves[name], curves[reference], label, sign=-1, metric=metric, n_resamples=500)
            away = away["auc"]
            cells = [f"{row[k].a:+.3f}" for k in ("at0.25", "at0.5", "at1", "auc")]
            diffs = ["—", "—"] if name == reference else [interval(row["at0.5"]), interval(row["auc"])]
            away_cells = [f"{away.a:+.3f}", "—" if name == reference else interval(away)]
            seeds = ",".join(str(curve.seed) for curve in curves[name])
            lines.append(f"| {name} | {seeds} | " + " | ".join(cells + diffs + away_cells) + " |")
        return "\n".join(lines)

    def layer_choice(self, runs: Sequence[Run], reference: str, metric: str, only: Optional[set[str]] = None) -> str:
        """Validation runs of behaviors at several layers: each variant's area to 1 nat toward the
        behavior (and away) per layer, the difference with ``reference`` there, and the layer where
        each variant's area toward is largest."""
        lines = []
        for behavior in sorted({r.behavior for r in runs}):
            at_layers = sorted((r for r in runs if r.behavior == behavior), key=lambda r: r.layer)
            names = {n for r in at_layers for n in r.curves if only is None or n in only or n == reference}
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
            for run in at_layers:
                curves = run.curves
                # a variant run at some of the layers only (an option validated where it was chosen) shows "—"
                present = [name for name in variants if name in curves]
                label = f"{behavior} layer {run.layer}"
                toward = {
                    name: self.bootstrap(curves[name], curves[reference], label, metric=metric, n_resamples=500)["auc"]
                    for name in present
                }
                away = {
                    name: self.bootstrap(
                        curves[name], curves[reference], label, sign=-1, metric=metric, n_resamples=500
                    )["auc"]
                    for name in present
                }
                for name in present:
                    measured[name].append(run.layer)
                    if toward[name].a > best.get(name, (-float("inf"), 0))[0]:
                        best[name] = (toward[name].a, run.layer)
                seeds = ",".join(str(curve.seed) for curve in curves[reference])
                lines.append(
                    f"| {run.layer} | {seeds} | "
                    + " | ".join(_cells(toward, variants, lambda row: f"{row.a:+.3f}"))
                    + "".join(f" | {cell}" for cell in _cells(toward, others, interval))
                    + " | "
                    + " | ".join(_cells(away, variants, lambda row: f"{row.a:+.3f}"))
                    + " |"
                )
            chosen = ", ".join(
                f"{name} layer {layer}" if len(measured[name]) > 1 else f"{name} (run at layer {layer} only)"
                for name, (_, layer) in best.items()
            )
            lines.append(f"\nLargest area toward {behavior} on validation: {chosen}.")
        return "\n".join(lines)


def gate_sensitivity(runs: Sequence[Run], metric: str, gates: list[Optional[float]]) -> str:
    """INNSteer - CAA in area to 1 nat toward the behavior [95 % CI] under each repetition gate (None:
    every point counts), and each method's first degenerate alpha toward the behavior per seed."""
    names = ["none" if gate is None else f"{gate:g}" for gate in gates]
    lines = [
        "| behavior | layer | "
        + " | ".join(f"gate {name}" for name in names)
        + f" | first degenerate alpha (gate {REPETITION_GATE:g}): CAA | INNSteer |",
        "|---|---|" + "---|" * (len(gates) + 2),
    ]
    for run in runs:
        curves = run.curves
        if not has_replies([*curves["caa"], *curves["innsteer"]]):
            continue
        diffs = [
            interval(paired_bootstrap(curves["innsteer"], curves["caa"], metric=metric, gate=gate)["auc"])
            for gate in gates
        ]
        firsts = [", ".join(first_degenerate(curve) for curve in curves[name]) for name in ("caa", "innsteer")]
        lines.append(f"| {run.behavior} | {layers(run)} | " + " | ".join(diffs + firsts) + " |")
    return "\n".join(lines)
