"""Alpha sweeps of a steerer (behaviour and fluency at each alpha) and their trade-off summaries."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Optional

from tqdm.auto import tqdm

from ..datasets.ab import ABItem
from ..hf.models import LoadedModel
from .metrics import ABScorer, fluency
from .tradeoff import REPETITION_GATE


@dataclass
class SweepPoint:
    method: str
    alpha: float
    answer: Optional[float]  # mean p_match, answer-text metric
    letter: Optional[float]  # mean p_match, letter metric
    nll: Optional[float]  # fluency: mean NLL/token of steered replies under the unsteered model
    distinct2: Optional[float]
    samples: list
    repetition: Optional[float] = None  # mean seq-rep-4 of the replies (innsteer.eval.metrics.repetition)

    def to_dict(self) -> dict:
        return asdict(self)


def sweep(
    lm: LoadedModel,
    steerer,
    method: str,
    alphas: Sequence[float],
    scorer: ABScorer,
    questions: Sequence[str] = (),
    *,
    max_new_tokens: int = 32,
    progress: bool = True,
) -> list[SweepPoint]:
    """Evaluate one steerer at each alpha (alpha 0 = the unsteered model) on the scorer's items and,
    for fluency, on open-ended ``questions``."""
    points = []
    for alpha in tqdm(alphas, desc=f"sweep {method}", disable=not progress, unit="alpha"):
        scores = {m: float(v.mean()) for m, v in scorer.scores(steerer, alpha).items()}
        flu = fluency(lm, questions, steerer=steerer, alpha=alpha, max_new_tokens=max_new_tokens) if questions else {}
        points.append(
            SweepPoint(
                method,
                float(alpha),
                scores.get("answer"),
                scores.get("letter"),
                flu.get("nll"),
                flu.get("distinct2"),
                flu.get("samples", []),
                flu.get("repetition"),
            )
        )
    return points


def tradeoff(
    points: Sequence[SweepPoint],
    baseline: SweepPoint,
    metric: str = "answer",
    budgets: Sequence[float] = (0.25, 0.5, 1.0),
    gate: Optional[float] = REPETITION_GATE,
) -> dict:
    """Largest behaviour shift (metric minus the unsteered value) reached at a fluency cost (NLL
    increase over the unsteered model, nats/token) within each budget; 0 when no setting fits. On
    each side of alpha 0, points from the first whose replies loop (repetition more than ``gate``
    above the unsteered replies', as innsteer.eval.tradeoff) on do not count."""
    base = getattr(baseline, metric)
    usable = []
    for sign in (1, -1):
        for p in sorted((p for p in points if sign * p.alpha > 0), key=lambda p: abs(p.alpha)):
            if gate is not None and None not in (p.repetition, baseline.repetition):
                if p.repetition - baseline.repetition > gate:
                    break
            usable.append(p)
    result = {}
    for budget in budgets:
        shifts = [
            getattr(p, metric) - base
            for p in usable
            if p.nll is not None and p.nll - baseline.nll <= budget and getattr(p, metric) is not None
        ]
        result[budget] = max([0.0] + shifts)
    return result


def layer_sweep(
    lm: LoadedModel,
    fit,
    train_items: Sequence[ABItem],
    val_items: Sequence[ABItem],
    layers: Sequence[int],
    *,
    alpha: float,
    mode: str = "answer",
    metric: str = "answer",
    behavior: str = "",
    progress: bool = True,
) -> dict[int, float]:
    """Behaviour shift on ``val_items`` of a steerer fitted by ``fit(pos, neg, layer=...)`` at each layer
    (one forward pass collects all layers)."""
    from ..hf.collect import contrastive_activations

    acts = contrastive_activations(
        lm, train_items, layers, mode=mode, behavior=behavior, split="generate", progress=progress
    )
    scorer = ABScorer(lm, val_items, (metric,))
    base = float(scorer.scores()[metric].mean())
    shifts = {}
    for layer, (pos, neg) in acts.items():
        steerer = fit(pos, neg, layer=layer, model_id=lm.model_id, behavior=behavior)
        shifts[layer] = float(scorer.scores(steerer, alpha)[metric].mean()) - base
    return shifts
