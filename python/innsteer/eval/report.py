"""Evaluation reports: JSON (everything), Markdown (tables) and PNG plots.

A behavior result is a dict made by ``cli``/``benchmark`` code:
  {"model_id", "behavior", "layer", "mode", "n_test", "n_open", "sanity",
   "points": [SweepPoint dicts, all methods, alpha 0 included as method "none"],
   "tradeoff": {method: {budget: shift}}, "training": {method: history dict}, "command": str}
matplotlib is imported only when plotting (install the ``plot`` extra).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from ..core.errors import ConfigError
from ..core.files import write_atomically
from ..datasets.ab import METRICS
from .results import Run, save

if TYPE_CHECKING:
    from .judge import Judge

PLOT_HINT = "plots need matplotlib: pip install 'innsteer[plot]' (or pass --no-plots)"


def pyplot():
    try:
        import matplotlib
    except ImportError as error:
        raise ImportError(PLOT_HINT) from error
    matplotlib.use("Agg")  # files only, no display needed
    import matplotlib.pyplot as plt

    return plt


def _by_method(points: Sequence[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for p in points:
        out.setdefault(p["method"], []).append(p)
    return {m: sorted(ps, key=lambda p: p["alpha"]) for m, ps in out.items()}


def baseline_point(points: Sequence[dict]) -> dict:
    return next(p for p in points if p["method"] == "none")


def _fmt(x, spec=".3f") -> str:
    return "–" if x is None else format(x, spec)


def sweep_table(result: dict) -> str:
    base = baseline_point(result["points"])
    lines = [
        "| method | alpha | p_match (answer text) | p_match (letter) | p_match (fork) | fluency NLL/token | Δ NLL "
        "| distinct-2 | seq-rep-4 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for method, points in _by_method(result["points"]).items():
        for p in points:
            cost = None if p["nll"] is None or base["nll"] is None else p["nll"] - base["nll"]
            lines.append(
                f"| {method} | {p['alpha']:g} | {_fmt(p['answer'])} | {_fmt(p['letter'])} | {_fmt(p.get('fork'))} "
                f"| {_fmt(p['nll'])} "
                f"| {_fmt(cost, '+.3f')} | {_fmt(p['distinct2'], '.2f')} | {_fmt(p.get('repetition'), '.2f')} |"
            )
    return "\n".join(lines)


def tradeoff_table(result: dict) -> str:
    budgets = sorted({float(b) for t in result["tradeoff"].values() for b in t})
    head = " | ".join(f"shift at Δ NLL ≤ {b:g}" for b in budgets)
    lines = [f"| method | {head} |", "|---|" + "---|" * len(budgets)]
    for method, shifts in result["tradeoff"].items():
        lines.append(
            f"| {method} | "
            + " | ".join(f"{shifts[b] if b in shifts else shifts[str(b)]:+.3f}" for b in budgets)
            + " |"
        )
    return "\n".join(lines)


def sanity_line(sanity: dict) -> str:
    letter = ", ".join(f"{p:.2f}" for p in sanity["p_correct_letter"])
    answer = ", ".join(f"{p:.2f}" for p in sanity["p_correct_answer"])
    verdict = (
        "can answer multiple choice by letter: the letter metric is meaningful"
        if sanity["letter_ok"]
        else "cannot map options to letters (fails 2+2 in one order): read the answer-text metric, "
        "the letter metric is near chance by construction"
    )
    return (
        f"Sanity item 'What is 2+2? (A) 4 (B) 7' and swapped: p(correct) letter [{letter}], "
        f"answer text [{answer}] — the model {verdict}."
    )


def markdown(result: dict) -> str:
    parts = [
        f"# innsteer report: {result['behavior']} on {result['model_id']}",
        f"Layer {result['layer']}, activations in '{result['mode']}' mode; {result['n_test']} test items, "
        f"{result['n_open']} open-ended prompts for fluency.",
        f"Command: `{result.get('command', '')}`",
        sanity_line(result["sanity"]),
        "## Trade-off (behaviour shift of the answer-text p_match over the unsteered model, best alpha "
        "whose fluency cost fits the budget)",
        tradeoff_table(result),
        "## Alpha sweeps",
        sweep_table(result),
    ]
    for metric, table in result.get("comparison_table", {}).items():
        parts += [f"## INNSteer - CAA, {metric} metric: seed means and paired bootstrap 95 % intervals", table]
    if result.get("instructions"):
        parts.append(
            "## Prompt baselines\n\nInstructions put before each question: "
            + "; ".join(f"{side}: {text!r}" for side, text in result["instructions"].items())
            + ". A prompt is one point per side (on or off), never interpolated."
        )
    for pair, table in result.get("comparisons_table", {}).items():
        parts += [f"## {pair}, answer metric: seed means and paired bootstrap 95 % intervals", table]
    if result.get("judged"):
        from .judge import judged_table

        self_judged = (
            " The judge is the steered model itself: it judges its own replies."
            if result["judge"].get("self_judged")
            else ""
        )
        parts += [
            "## Judged replies (the judge's p(yes) per question, mean over prompts [95 % bootstrap interval]; "
            "score: their harmonic mean over the questions the judge's validation kept)" + self_judged,
            judged_table(result),
        ]
    samples = result.get("samples")
    if samples:
        parts.append("## Sample generations")
        for label, texts in samples.items():
            parts.append(f"**{label}**\n\n" + "\n".join(f"- {t.strip()!r}" for t in texts))
    return "\n\n".join(parts) + "\n"


def plot_alpha(result: dict, path: Path) -> None:
    plt = pyplot()
    base = baseline_point(result["points"])
    fig, axes = plt.subplots(1, len(METRICS), figsize=(5 * len(METRICS), 4))
    for ax, metric in zip(axes, METRICS):
        if base.get(metric) is None:  # no letter metric for plain answers; no fork in reports from before it
            ax.set_axis_off()
            continue
        for method, points in _by_method(result["points"]).items():
            if method == "none" or points[0][metric] is None:
                continue
            if method in result.get("unjoined", ()):  # a prompt: on (+1, toward) or its opposite (-1)
                ax.plot([p["alpha"] for p in points], [p[metric] for p in points], "s", label=method)
                continue
            ax.plot(
                [0] + [p["alpha"] for p in points], [base[metric]] + [p[metric] for p in points], "o-", label=method
            )
        ax.axhline(base[metric], color="gray", ls=":", label="unsteered")
        ax.set(
            xlabel="alpha (each method's own scale)",
            ylabel=f"p_match ({metric})",
            ylim=(0, 1),
            title=f"{result['behavior']}: {metric} metric",
        )
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_tradeoff(result: dict, path: Path) -> None:
    plt = pyplot()
    base = baseline_point(result["points"])
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for method, points in _by_method(result["points"]).items():
        if method == "none" or points[0]["nll"] is None:
            continue
        color = None
        # each side of the sweep is its own curve from the unsteered point (dashed: alpha < 0)
        for side, style in ((1, "o-"), (-1, "o--")):
            branch = sorted((p for p in points if p["alpha"] * side > 0), key=lambda p: abs(p["alpha"]))
            if not branch:
                continue
            xs = [0.0] + [p["nll"] - base["nll"] for p in branch]
            ys = [base["answer"]] + [p["answer"] for p in branch]
            label = method if color is None else None
            if method in result.get("unjoined", ()):  # a prompt: on or off, nothing between
                xs, ys, style = xs[1:], ys[1:], "s" if side > 0 else "D"
            (line,) = ax.plot(xs, ys, style, color=color, label=label)
            color = line.get_color()
            for x, y, p in zip(xs[1:], ys[1:], branch):
                ax.annotate(f"{p['alpha']:g}", (x, y), fontsize=7, alpha=0.7)
    ax.axhline(base["answer"], color="gray", ls=":", label="unsteered")
    ax.set(
        xlabel="fluency cost: Δ NLL/token of steered replies (unsteered scorer)",
        ylabel="p_match (answer text)",
        title=f"{result['behavior']} (dashed, diamonds: away from it)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_training(history: dict, path: Path, title: str = "INNSteer training") -> None:
    plt = pyplot()
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    epochs = range(1, len(history.get("train_loss", [])) + 1)
    for key in ("train_loss", "val_loss"):
        if history.get(key):
            ax1.plot(epochs, history[key], label=key)
    ax1.set(xlabel="epoch", ylabel="loss", title=title)
    ax1.legend()
    if history.get("val_fisher_separation"):
        ax2.plot(epochs, history["val_fisher_separation"], color="C2")
    ax2.set(xlabel="epoch", ylabel="Fisher separation (validation)", title="class separation in latent space")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(result: dict, out_dir: str | os.PathLike, *, plots: bool = True) -> dict[str, Path]:
    """Write report.json, report.md and (with ``plots``) alpha.png, tradeoff.png, training.png."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "report.json", "markdown": out / "report.md"}
    save(Run.from_dict(result, "the report"), paths["json"])  # the run and, in its extra, the report's tables
    write_atomically(paths["markdown"], markdown(result))
    if plots:
        paths["alpha"] = out / "alpha.png"
        plot_alpha(result, paths["alpha"])
        paths["tradeoff"] = out / "tradeoff.png"
        plot_tradeoff(result, paths["tradeoff"])
        history = result.get("training", {}).get("innsteer")
        if history:
            paths["training"] = out / "training.png"
            plot_training(
                history, paths["training"], f"INNSteer training, {result['behavior']} layer {result['layer']}"
            )
    return paths


def summary_markdown(results: Sequence[dict], command: str = "") -> str:
    """Behaviors × methods: the behaviour shift each method reaches within each fluency budget, and
    whether INNSteer's trade-off beats CAA's (a strictly larger shift within the same budget)."""
    methods = [m for m in results[0]["tradeoff"]]
    budgets = sorted({float(b) for r in results for t in r["tradeoff"].values() for b in t})
    first = results[0]
    parts = [
        f"Model {first['model_id']}, layer {first['layer']}, '{first['mode']}' activations, "
        f"{first['n_test']} test items and {first['n_open']} open-ended prompts ({first['max_new_tokens']} "
        f"greedy tokens) per behavior." + (f" Command: `{command}`" if command else ""),
        sanity_line(first["sanity"]),
    ]
    head = "| behavior | unsteered p_match answer / letter | " + " | ".join(methods)
    for budget in budgets:
        lines = [
            f"### Shift of p_match (answer text) at fluency cost Δ NLL ≤ {budget:g} nats/token",
            head + (" | INNSteer > CAA |" if {"innsteer", "caa"} <= set(methods) else " |"),
            "|---|---|" + "---|" * len(methods) + ("---|" if {"innsteer", "caa"} <= set(methods) else ""),
        ]
        wins = 0
        for r in results:
            base = baseline_point(r["points"])
            shifts = {m: r["tradeoff"][m].get(budget, r["tradeoff"][m].get(str(budget))) for m in methods}
            row = f"| {r['behavior']} | {base['answer']:.3f} / {_fmt(base['letter'])} | " + " | ".join(
                f"{shifts[m]:+.3f}" for m in methods
            )
            if {"innsteer", "caa"} <= set(methods):
                win = shifts["innsteer"] > shifts["caa"]
                wins += win
                row += f" | {'yes' if win else 'no'}"
            lines.append(row + " |")
        if {"innsteer", "caa"} <= set(methods):
            lines.append(f"\nINNSteer beats CAA on {wins} of {len(results)} behaviors at this budget.")
        parts.append("\n".join(lines))
    return "\n\n".join(parts) + "\n"


def rejudge(path: str | Path, judge: Judge, *, answers: Optional[Path] = None, command: str = "") -> dict:
    """Judge a written judged report's stored replies again, generating nothing: by another judge, or
    after a shipped behavior's description was reworded. Its judge validation, judged scores and
    comparisons are replaced and its report.json and report.md rewritten; returns the report. Only a
    report on a shipped behavior (the judge is validated on its test items and asked about its
    description); ``answers`` keeps the judge's answers as ``innsteer eval --out`` does (a rerun asks
    only new ones); ``command`` is recorded as ``judge.command``."""
    from ..datasets.behaviors import BEHAVIOR_TEXT
    from ..datasets.source import shipped
    from .judge import KeptAnswers, judge_result
    from .results import load

    path = Path(path)
    run = load(path)
    report = json.loads(path.read_text())
    if "judged" not in report:
        raise ConfigError(f"{path}: not a judged report (innsteer eval --judge writes one)")
    if run.behavior not in BEHAVIOR_TEXT:
        raise ConfigError(f"{path}: '{run.behavior}' is not a shipped behavior; judge it with innsteer eval --judge")
    source = shipped(run.behavior)  # what innsteer eval --behavior judged with
    prompts = source.prompts[: report["n_open"]]
    for name, curves in run.curves.items():
        if curves[0].replies is None or any(len(replies) != len(prompts) for replies in curves[0].replies):
            raise ConfigError(
                f"{path}: {name}'s stored replies do not answer {run.behavior}'s first {len(prompts)} prompts"
            )
    if answers is not None:
        judge = KeptAnswers(judge, answers)
    every_alpha = any(len(row.get("by_alpha", {})) > 1 for row in report["judged"].values())
    report.update(
        judge_result(
            run, report["chosen_alpha"], judge, prompts, source.test[: run.n_test],
            source.text.description, source.text.opposite, every_alpha=every_alpha,
        )
    )  # fmt: skip
    report["judge"].update(self_judged=judge.name == run.model_id, command=command)
    save(Run.from_dict(report, "the report"), path)
    write_atomically(path.with_suffix(".md"), markdown(report))
    return report


def reselect(path: str | Path, *, command: str = "") -> dict:
    """Compare a written judged report's methods at equal coherence again from the judged scores it
    holds, asking no judge and generating nothing: for a report written before the alpha of equal
    coherence was bounded by the fluency budget (``judge.choose_at_coherence``). Its ``at_coherence`` rows and
    judged comparisons are replaced and report.json and report.md rewritten; returns the report
    (``command`` recorded as ``judge.reselected``)."""
    import numpy as np

    from .judge import choose_at_coherence, judged_comparisons

    path = Path(path)
    report = json.loads(path.read_text())
    if "judged" not in report:
        raise ConfigError(f"{path}: not a judged report (innsteer eval --judge writes one)")
    choose_at_coherence(report["judged"], report["chosen_alpha"])
    report["judged_comparisons"] = judged_comparisons(report["judged"], 1000, np.random.default_rng(0))
    report["judge"]["reselected"] = command
    save(Run.from_dict(report, "the report"), path)
    write_atomically(path.with_suffix(".md"), markdown(report))
    return report
