"""The comparison protocol of docs/RESULTS.md: methods' behaviour-vs-fluency curves on held-out
items, over several training seeds, with paired bootstrap intervals.

For each seed s: the training items are split by a seeded shuffle (``train_val_split(seed=s)``;
the validation part is what settings were chosen on, never the test items), each method is fitted
on the training part (INNSteer also with training seed s), and swept over an alpha ladder on both
sides until its fluency cost passes ``stop_cost``. Every point keeps the per-item p_match (answer
text and letter metrics) on the test items and the per-prompt reply NLL on the fluency prompts,
so ``innsteer.eval.tradeoff.paired_bootstrap`` can resample both.

Without test items (``test_items=None``) the same protocol is the validation study: each seed's
curves are measured on that seed's validation part, which is how settings are chosen
(``bench/validation.py``); test items decide nothing.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Optional

import numpy as np
from tqdm.auto import tqdm

from ..core.steerers import SignedSteerer
from ..datasets.ab import METRICS, ABItem, train_val_split
from ..hf.fit import fit_method
from ..hf.models import LoadedModel
from .batched import BatchedFluency, BatchedScorer
from .metrics import repetition
from .results import Comparison, Curve, Run
from .stages import Stages, digest
from .tradeoff import REPETITION_GATE, has_replies, paired_bootstrap, seed_mean_summary

ALPHA_LADDER = (0.5, 1.0, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0)
PROMPT = "prompt"  # the prompt baseline's method name; "prompt+caa" etc. combine it with steering


@dataclass(frozen=True)
class MethodSpec:
    """How one method is fitted: ``METHODS[method]`` on activations of ``tokens`` ('mean', 'last',
    'all'), with ``options`` (e.g. INNSteer's TrainConfig fields), at ``layer`` (None: the
    protocol's layer), on the first ``train_fraction`` of each seed's (shuffled) training part."""

    method: str
    tokens: str = "mean"
    options: dict = field(default_factory=dict)
    layer: Optional[int] = None
    train_fraction: float = 1.0
    mode: str = "answer"  # activations at the answer's text, or at its letter (CAA's 'letter' mode)
    instruct: bool = False  # the inputs carry the instruction for the side measured (a prompt baseline)

    def __post_init__(self):
        if not 0 < self.train_fraction <= 1:
            raise ValueError(f"train_fraction must be in (0, 1], got {self.train_fraction}")

    @classmethod
    def named(cls, name: str, tokens: str = "all", options: Optional[dict] = None, **fields) -> MethodSpec:
        """The spec a method name means: a steering method, ``prompt`` (the instruction alone, no
        steering) or ``prompt+<method>`` (the instruction and the method's steering at once)."""
        if name == PROMPT:
            return cls(PROMPT, tokens, instruct=True, **fields)
        method, instruct = (name[len(PROMPT) + 1 :], True) if name.startswith(PROMPT + "+") else (name, False)
        return cls(method, tokens, dict(options or {}), instruct=instruct, **fields)

    @property
    def steers(self) -> bool:
        return self.method != PROMPT

    def record(self) -> dict:
        """The spec as result files keep it: ``train_fraction``, ``mode`` and ``instruct`` only where
        they are not the defaults, so files written before they existed still compare equal to the
        same spec."""
        record = asdict(self)
        for key, default in (("train_fraction", 1), ("mode", "answer"), ("instruct", False)):
            if record[key] == default:
                del record[key]
        return record


def measure_curve(
    steerer,
    scorer: BatchedScorer | Mapping[int, BatchedScorer],
    fluency: BatchedFluency | Mapping[int, BatchedFluency],
    base_cost: float,
    *,
    ladder: Sequence[float] = ALPHA_LADDER,
    stop_cost: float = 1.0,
    signs: Sequence[int] = (1, -1),
    progress: bool = False,
) -> dict:
    """Points on both sides of the ladder (``signs``: +1 toward the behavior, -1 away), each side
    stopping one point after its fluency cost (mean NLL/token over the unsteered model's) passes
    ``stop_cost``: the budgets up to ``stop_cost`` are then determined. A ``Curve``'s per-alpha
    fields: {"alphas", "scores": {metric: [alpha][item]}, "nll", "tokens", "repetition", "replies"}
    (the last four per alpha and fluency prompt). ``scorer``, ``fluency``: one for both sides, or
    one per sign (a prompt baseline's inputs carry that side's instruction). ``steerer`` None: the
    unsteered model on those inputs, one point per side (alpha +-1: the instruction on)."""
    scorers = scorer if isinstance(scorer, Mapping) else dict.fromkeys(signs, scorer)
    fluencies = fluency if isinstance(fluency, Mapping) else dict.fromkeys(signs, fluency)
    run = {"alphas": [], "scores": {m: [] for m in next(iter(scorers.values())).metrics}}
    run.update({key: [] for key in ("nll", "tokens", "repetition", "replies")})
    for sign in signs:
        magnitudes = ladder if steerer is not None else (1.0,)
        for magnitude in tqdm(magnitudes, desc=f"alpha {'+' if sign > 0 else '-'}", disable=not progress, leave=False):
            alpha = sign * magnitude
            steering = (steerer, alpha) if steerer is not None else (None, None)
            scores = scorers[sign].scores(*steering)
            nll, tokens, replies = fluencies[sign](*steering)
            run["alphas"].append(alpha)
            for metric, values in scores.items():
                run["scores"][metric].append(values.tolist())
            run["nll"].append(nll.tolist())
            run["tokens"].append(tokens.tolist())
            repeats, texts = reply_record(fluencies[sign], replies)
            run["repetition"].append(repeats)
            run["replies"].append(texts)
            if float(nll.sum() / tokens.sum()) - base_cost > stop_cost:
                break
    return run


def reply_record(fluency: BatchedFluency, replies: Sequence) -> tuple[list[float], list[str]]:
    """Each greedy reply's repetition (seq-rep-4) and text, as the result files keep them."""
    ids = [reply.tolist() for reply in replies]
    return [repetition(r) for r in ids], [fluency.lm.tokenizer.decode(r, skip_special_tokens=True) for r in ids]


class Unsteered:
    """What the protocol measures of the unsteered model, kept for every ``run_protocol`` call given
    it: the scorers (the scored items' prefix KV caches) and fluency prompts' caches, and the
    unsteered scores and replies. None of it depends on the layer or the method, and ``tune``
    measures the same validation items at every layer and option set: its calls share one (building
    the scorers was ~7 % of a quick run on SmolLM2; bench/RESULTS.md)."""

    def __init__(self, lm: LoadedModel):
        self.lm = lm
        self._kept: dict[tuple, object] = {}

    def clear(self) -> None:
        """Let go of everything kept (the scorers hold KV caches of every scored item)."""
        self._kept.clear()

    def _once(self, key: tuple, make):
        if key not in self._kept:
            self._kept[key] = make()
        return self._kept[key]

    def scorer(self, items: Sequence[ABItem], metrics: Sequence[str], instruction: Optional[str] = None):
        key = ("scorer", digest(items), tuple(metrics), instruction)
        return self._once(key, lambda: BatchedScorer(self.lm, items, metrics, instruction=instruction))

    def scores(self, items: Sequence[ABItem], metrics: Sequence[str]) -> dict[str, list[float]]:
        """The unsteered p_match per item and metric."""
        key = ("scores", digest(items), tuple(metrics))
        return self._once(key, lambda: {m: v.tolist() for m, v in self.scorer(items, metrics).scores().items()})

    def fluency(self, prompts: Sequence[str], max_new_tokens: int, instruction: Optional[str] = None):
        key = ("fluency", digest(prompts), max_new_tokens, instruction)
        return self._once(key, lambda: BatchedFluency(self.lm, prompts, max_new_tokens, instruction))

    def replies(self, prompts: Sequence[str], max_new_tokens: int):
        """(NLL sums, token counts, reply ids) of the unsteered greedy replies."""
        key = ("replies", digest(prompts), max_new_tokens)
        return self._once(key, lambda: self.fluency(prompts, max_new_tokens)())


def fit_spec(
    lm: LoadedModel, spec: MethodSpec, train: Sequence[ABItem], *, layer: int, seed: int, behavior: str,
    progress: bool = False,
):  # fmt: skip
    """The steerer ``spec`` describes, fitted on ``train`` as seed ``seed`` of the protocol fits it
    (``layer``: the protocol's, unless the spec names its own); None for the prompt alone.
    ``progress``: bars for the activation collection and the training (on a large model the
    collection alone runs for many minutes)."""
    if not spec.steers:
        return None
    n_items = max(1, round(len(train) * spec.train_fraction))
    return fit_method(
        lm, spec.method, train[:n_items], layer if spec.layer is None else spec.layer, tokens=spec.tokens,
        mode=spec.mode, options=spec.options, seed=seed, behavior=behavior, split=f"train-s{seed}",
        progress=progress,
    )  # fmt: skip


def run_protocol(
    lm: LoadedModel,
    train_items: Sequence[ABItem],
    test_items: Optional[Sequence[ABItem]],
    prompts: Sequence[str],
    *,
    layer: int,
    specs: dict[str, MethodSpec],
    seeds: Sequence[int] = (0, 1, 2),
    behavior: str = "",
    max_new_tokens: int = 32,
    ladder: Sequence[float] = ALPHA_LADDER,
    compare: tuple[str, str] = ("innsteer", "caa"),
    n_resamples: int = 1000,
    signs: Sequence[int] = (1, -1),
    progress: bool = True,
    return_steerers: bool = False,
    instructions: Optional[Mapping[int, str]] = None,
    also_compare: Sequence[tuple[str, str]] = (),
    stages: Optional[str | os.PathLike] = None,
    unsteered: Optional[Unsteered] = None,
) -> Run:
    """Curves of every method and seed, and the paired bootstrap of ``compare[0] - compare[1]``
    for each metric and side (see the module docstring); ``test_items=None`` measures each seed on
    its validation part. ``instructions``: {sign: the instruction that asks for the behavior (+1)
    or against it (-1)}, for specs that ``instruct`` (measured on the sides with one);
    ``also_compare``: more pairs, bootstrapped alike into ``comparisons``; ``return_steerers``:
    the run's ``steerers`` are each method's first-seed steerer. ``stages``: a directory where each
    method's curve per seed is kept as it finishes, and read back by a rerun with the same model,
    items and settings (an interrupted run resumes), and each fitted steerer, read back by a rerun
    with the same model, training items, layer, spec and seed (whatever it measures).
    ``unsteered``: the unsteered measurements to share with other calls on ``lm`` (``Unsteered``)."""
    if unsteered is None:
        unsteered = Unsteered(lm)
    elif unsteered.lm is not lm:
        raise ValueError("unsteered was made for another model")
    instructions = dict(instructions or {})
    instructed = [name for name, spec in specs.items() if spec.instruct]
    if instructed and not set(instructions) & set(signs):
        raise ValueError(f"{', '.join(instructed)} need an instruction for a measured side (instructions)")
    validation = test_items is None
    splits = {seed: train_val_split(train_items, seed=seed) for seed in seeds}
    if validation and len({len(val) for _, val in splits.values()}) != 1:
        raise ValueError("the seeds' validation parts differ in size")  # train_val_split rounds one way
    scored_items = splits[seeds[0]][1] if validation else test_items
    metrics = METRICS if all(item.lettered for item in scored_items) else tuple(m for m in METRICS if m != "letter")
    fluency = unsteered.fluency(prompts, max_new_tokens)
    base_nll, base_tokens, base_replies = unsteered.replies(prompts, max_new_tokens)
    base_cost = float(base_nll.sum() / base_tokens.sum())
    base_repetition, base_texts = reply_record(fluency, base_replies)
    instructed_signs = [sign for sign in signs if sign in instructions]
    instructed_fluency = (
        {sign: unsteered.fluency(prompts, max_new_tokens, instructions[sign]) for sign in instructed_signs}
        if instructed
        else {}
    )

    def scorers(items: Sequence[ABItem]) -> tuple[BatchedScorer, dict[int, BatchedScorer]]:
        """The scorer of ``items`` and, for the instructed specs, one per instructed side."""
        instructed_scorers = {
            sign: unsteered.scorer(items, metrics, instructions[sign])
            for sign in (instructed_signs if instructed else ())
        }
        return unsteered.scorer(items, metrics), instructed_scorers

    scorer, instructed_scorer = (None, {}) if validation else scorers(test_items)
    kept = Stages(
        None if stages is None else Path(stages),
        {
            "model_id": lm.model_id, "dtype": lm.dtype, "behavior": behavior, "layer": layer,
            "train": digest(train_items), "scored": digest(scored_items),
            "evaluated_on": "validation" if validation else "test",
            "prompts": digest(prompts), "max_new_tokens": max_new_tokens, "ladder": sorted(ladder),
            "signs": sorted(signs), "instructions": sorted(instructions.items()), "metrics": list(metrics),
        },
    )  # fmt: skip
    runs: dict[str, list[Curve]] = {name: [] for name in specs}
    first_steerers = {}
    prompt_curve = None  # the prompt alone trains nothing: on fixed test items every seed measures the same
    # Each steerer is kept beside the curves (a rerun that measures a curve again, with other alphas
    # or prompts too, reads its fit back), and prompt+<method> steers with <method>'s steerer: one fit
    # per seed serves both (an INNSteer fit on per-token rows takes many minutes).
    fits = Stages(
        None if stages is None else Path(stages),
        {
            "model_id": lm.model_id,
            "dtype": lm.dtype,
            "behavior": behavior,
            "layer": layer,
            "train": digest(train_items),
        },
    )
    fitted = {}

    def fit(spec: MethodSpec, seed: int):
        if not spec.steers:
            return None
        key = (seed, digest([replace(spec, instruct=False).record()]))
        if key not in fitted:
            fitted[key] = fits.steerer(
                f"fit-{spec.method}-s{seed}-{key[1]}",
                lambda: fit_spec(
                    lm, spec, splits[seed][0], layer=layer, seed=seed, behavior=behavior, progress=progress
                ),
            )
        return fitted[key]

    for seed in seeds:
        if validation:
            scorer, instructed_scorer = scorers(splits[seed][1])
        base = {
            "base_scores": unsteered.scores(splits[seed][1] if validation else test_items, metrics),
            "base_nll": base_nll.tolist(),
            "base_tokens": base_tokens.tolist(),
            "base_repetition": base_repetition,
            "base_replies": base_texts,
        }
        for name, spec in specs.items():
            if spec.instruct:
                inputs = {"scorer": instructed_scorer, "fluency": instructed_fluency, "signs": instructed_signs}
            else:
                inputs = {"scorer": scorer, "fluency": fluency, "signs": signs}

            def measure(spec=spec, name=name, seed=seed, base=base, inputs=inputs) -> dict:
                nonlocal prompt_curve
                steerer = fit(spec, seed)
                if steerer is None and not validation and prompt_curve is not None:
                    curve = prompt_curve
                else:
                    curve = measure_curve(steerer, **inputs, base_cost=base_cost, ladder=ladder, progress=progress)
                if steerer is None:
                    prompt_curve = curve
                run = Curve(
                    **curve, **base, seed=seed,
                    points=spec.instruct,  # the instruction is on or off: nothing between the unsteered and it
                )  # fmt: skip
                if steerer is not None:
                    if seed == seeds[0]:
                        first_steerers[name] = steerer
                    run = replace(run, layer=steerer.layer, extra=_summary_extra(steerer))
                return run.to_dict()

            record = kept.run(f"curve-{name}-s{seed}-{digest([spec.record()])}", measure)
            run = Curve.from_dict(record, f"the stage of {name}, seed {seed}")
            runs[name].append(run)
            if progress:
                print(f"  {behavior} seed {seed} {name}: {len(run.alphas)} points", flush=True)
        fitted.clear()  # the next seed fits on another split

    if return_steerers:  # the first seed's steerers whose curves a rerun read back: read back too
        for name, spec in specs.items():
            if spec.steers and name not in first_steerers:
                first_steerers[name] = fit(spec, seeds[0])
    comparisons = [compare_methods(runs, a, b, metrics, n_resamples) for a, b in also_compare if {a, b} <= set(specs)]
    compared = compare and set(compare) <= set(specs)
    return Run(
        behavior=behavior,
        model_id=lm.model_id,
        layer=layer,
        evaluated_on="validation" if validation else "test",
        seeds=list(seeds),
        n_test=len(scored_items),
        n_prompts=len(prompts),
        max_new_tokens=max_new_tokens,
        metrics=list(metrics),
        specs={name: spec.record() for name, spec in specs.items()},
        curves=runs,
        comparison=compare_methods(runs, *compare, metrics, n_resamples) if compared else None,
        comparisons={c.label: c for c in comparisons},
        instructions={("toward" if sign > 0 else "away"): instructions[sign] for sign in instructed_signs}
        if instructed
        else {},
        steerers=first_steerers if return_steerers else {},
    )


def compare_methods(
    curves: Mapping[str, Sequence[Curve]], a: str, b: str, metrics: Sequence[str], n_resamples: int = 1000
) -> Comparison:
    """The paired bootstrap of method ``a`` minus method ``b`` (their curves, one per seed), per
    metric, on the sides both were measured."""
    measured = [{sign for curve in curves[name] for sign in np.sign(curve.alphas)} for name in (a, b)]
    sides = {
        f"{metric}/{side}": paired_bootstrap(curves[a], curves[b], sign=sign, metric=metric, n_resamples=n_resamples)
        for metric in metrics
        for side, sign in (("toward", 1), ("away", -1))
        if sign in measured[0] & measured[1]
    }
    return Comparison(a, b, sides)


def _summary_extra(steerer) -> dict:
    """What a run records of its steerer's training (INNSteer's kept epoch and validation scores;
    a signed steerer's for each of its maps)."""
    if isinstance(steerer, SignedSteerer):
        return {side: _summary_extra(getattr(steerer, side)) for side in ("toward", "away")}
    extra = getattr(steerer, "extra", None) or {}
    keys = ("best_epoch", "val_transport", "n_pairs", "seconds", "train")  # train: the full TrainConfig
    return {key: extra[key] for key in keys if key in extra}


def _point_means(curve: Curve, metrics: Sequence[str]) -> list[dict]:
    """A curve's points as means over items (p_match) and prompts (NLL/token), by alpha."""
    points = []
    for i, alpha in enumerate(curve.alphas):
        point = {m: sum(curve.scores[m][i]) / len(curve.scores[m][i]) for m in metrics}
        point.update(alpha=alpha, nll=sum(curve.nll[i]) / sum(curve.tokens[i]))
        points.append(point)
    return sorted(points, key=lambda p: p["alpha"])


def alpha_within_budget(curve: Curve, metrics: Sequence[str], budget: float = 1.0) -> float:
    """The largest positive alpha of a curve whose fluency cost is at most ``budget``, before its
    first degenerate point (the summaries' repetition gate, where the curve recorded its replies);
    else its smallest."""
    base_nll = sum(curve.base_nll) / sum(curve.base_tokens)
    positive = [p for p in _point_means(curve, metrics) if p["alpha"] > 0]
    if curve.has_replies:
        base_repeats = sum(curve.base_repetition) / len(curve.base_repetition)
        repeats = {a: sum(r) / len(r) for a, r in zip(curve.alphas, curve.repetition)}
        degenerate = [p["alpha"] for p in positive if repeats[p["alpha"]] - base_repeats > REPETITION_GATE]
        positive = [p for p in positive if not degenerate or p["alpha"] < min(degenerate)] or positive[:1]
    fits = [p["alpha"] for p in positive if p["nll"] - base_nll <= budget]
    return max(fits) if fits else min(p["alpha"] for p in positive)


def protocol_report(run: Run) -> dict:
    """The run with what ``innsteer.eval.report`` tables and plots: the first seed's curves as
    points, every method's seed-mean trade-off and the comparison tables of the whole protocol
    (``Run.to_dict()`` plus those keys: ``results.load`` reads the written report back as the run)."""
    metrics = run.metrics
    first = {name: curves[0] for name, curves in run.curves.items()}
    any_curve = next(iter(first.values()))
    base = {m: sum(v) / len(v) for m, v in any_curve.base_scores.items()}
    unscored = {m: None for m in METRICS}  # a metric the items do not have (letter: plain answers)
    base_point = {"method": "none", "alpha": 0.0, **unscored, "distinct2": None, "samples": [], **base}
    base_point["nll"] = sum(any_curve.base_nll) / sum(any_curve.base_tokens)
    points = [base_point]
    for name, curve in first.items():
        for p in _point_means(curve, metrics):
            points.append({"method": name, **unscored, "distinct2": None, "samples": [], **p})
    # every method's seed-mean shift at each fluency budget toward the behavior (interpolated on its
    # curves, gated as the comparison is)
    items, prompts = np.arange(len(any_curve.base_scores["answer"])), np.arange(len(any_curve.base_nll))
    tradeoff = {}
    for name, curves in run.curves.items():
        gate = REPETITION_GATE if has_replies(curves) else None
        summary = seed_mean_summary(curves, items, prompts, 1, "answer", gate)
        tradeoff[name] = {float(key[2:]): value for key, value in summary.items() if key.startswith("at")}
    return {
        **run.to_dict(),
        "mode": "answer",
        "n_open": run.n_prompts,
        "points": points,
        "tradeoff": tradeoff,
        "chosen_alpha": {name: alpha_within_budget(curve, metrics) for name, curve in first.items()},
        "unjoined": [name for name, curve in first.items() if curve.points],  # plotted as points
        "comparison_table": {m: comparison_table([run], m) for m in metrics} if run.comparison else {},
        "comparisons_table": {label: pair_table(c, metrics[0]) for label, c in run.comparisons.items()},
    }


def pair_table(comparison: Comparison, metric: str = "answer") -> str:
    """Markdown: one comparison on both sides."""
    lines = [f"| side | summary | {comparison.a} | {comparison.b} | difference [95 % CI] |", "|---|---|---|---|---|"]
    for side in ("toward", "away"):
        for key, row in comparison.get(metric, side).items():
            lines.append(f"| {side} | {key} | {row.a:+.3f} | {row.b:+.3f} | {row.cell()} |")
    return "\n".join(lines)


def layers_label(run: Run) -> str:
    """The compared methods' layers ("22/16" where they differ), else the protocol's layer."""
    layers = [run.method_layers[name] for name in run.compare if name in run.specs]
    return "/".join(map(str, layers)) if len(set(layers)) > 1 else str(layers[0] if layers else run.layer)


def comparison_table(runs: Sequence[Run], metric: str = "answer", side: str = "toward") -> str:
    """Markdown: per behavior, each method's seed-mean shift at the budgets and its AUC, and the
    difference with its 95 % paired bootstrap interval."""
    compared = next((run.compare for run in runs if run.comparison), ("a", "b"))
    lines = [
        "| behavior | layer | summary | " + " | ".join(compared) + " | difference [95 % CI] |",
        "|---|---|---|---|---|---|",
    ]
    for run in runs:
        rows = run.comparison.get(metric, side) if run.comparison else {}
        for key, row in rows.items():
            lines.append(
                f"| {run.behavior} | {layers_label(run)} | {key} | {row.a:+.3f} | {row.b:+.3f} | {row.cell()} |"
            )
    return "\n".join(lines)


def default_specs(innsteer_options: Optional[dict] = None, tokens: str = "all") -> dict[str, MethodSpec]:
    """CAA and INNSteer fitted on the same activation rows (every answer token by default: both
    steered at least as well from them as from pooled means on validation data, docs/RESULTS.md)."""
    return {
        "caa": MethodSpec("caa", tokens),
        "innsteer": MethodSpec("innsteer", tokens, dict(innsteer_options or {})),
    }
