"""One behavior end to end: collect activations, fit every method at one layer, sweep alpha,
measure behaviour and fluency, summarize the trade-offs. Used by ``innsteer eval`` and ``demo``."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Optional

from ..core.errors import ConfigError
from ..core.hooks import check_layer
from ..core.methods import METHODS
from ..datasets.ab import METRICS, train_val_split
from ..datasets.source import DataSource
from ..hf.collect import contrastive_activations
from ..hf.models import LoadedModel
from .metrics import ABScorer, multiple_choice_sanity
from .sweeps import sweep, tradeoff

# alpha = 1 moves the class means as far as CAA's mean difference for every method (the direction
# baselines are scaled that way, Linear-AcT fully transports neg onto pos, INNSteer translates by v).
DEFAULT_ALPHAS = (0.5, 1.0, 2.0, 4.0, 8.0)
BUDGETS = (0.25, 0.5, 1.0)


def fit_methods(
    lm: LoadedModel,
    data: DataSource,
    layer: int,
    methods: Sequence[str],
    *,
    mode: str = "answer",
    tokens: str = "all",
    n_train: Optional[int] = None,
    options: Optional[dict[str, dict]] = None,
    progress: bool = True,
) -> tuple[dict, dict]:
    """Fit each method on the training part of ``data.train`` (a seeded split; the rest validates),
    with ``options[method]`` as its keyword arguments: ({method: steerer}, {method: seconds})."""
    unknown = [m for m in methods if m not in METHODS]
    if unknown:
        raise ConfigError(f"unknown method(s) {unknown}; choose from: {', '.join(METHODS)}")
    layer = check_layer(lm.model, layer)
    train_items, _ = train_val_split(data.train)
    train_items = train_items[:n_train] if n_train else train_items
    behavior = data.name
    pos, neg = contrastive_activations(
        lm,
        train_items,
        layer,
        mode=mode,
        tokens=tokens,
        behavior=behavior,
        split=f"train{len(train_items)}",
        progress=progress,
    )[layer]
    steerers, seconds = {}, {}
    for method in methods:
        start = time.perf_counter()
        kwargs = {**({"progress": progress} if method == "innsteer" else {}), **(options or {}).get(method, {})}
        steerers[method] = METHODS[method](pos, neg, layer=layer, model_id=lm.model_id, behavior=behavior, **kwargs)
        steerers[method].extra.update(mode=mode, tokens=tokens)
        seconds[method] = round(time.perf_counter() - start, 2)
    return steerers, seconds


def run_behavior(
    lm: LoadedModel,
    data: DataSource,
    layer: int,
    methods: Sequence[str],
    *,
    mode: str = "answer",
    tokens: str = "all",
    alphas: Sequence[float] = DEFAULT_ALPHAS,
    n_train: Optional[int] = None,
    n_test: Optional[int] = None,
    n_open: int = 5,
    max_new_tokens: int = 32,
    metrics: Sequence[str] = METRICS,
    steerers: Optional[dict] = None,
    options: Optional[dict[str, dict]] = None,
    progress: bool = True,
) -> tuple[dict, dict]:
    """(the report dict for one behavior (see ``report``), {method: steerer}); ``steerers`` skips
    fitting, ``options`` as ``fit_methods``'."""
    layer = check_layer(lm.model, layer)
    fit_seconds = {}
    if steerers is None:
        steerers, fit_seconds = fit_methods(
            lm, data, layer, methods, mode=mode, tokens=tokens, n_train=n_train, options=options, progress=progress
        )
    test = data.test[:n_test] if n_test else data.test
    questions = data.prompts[:n_open]
    metrics = metrics if data.lettered else ("answer",)
    scorer = ABScorer(lm, test, metrics)
    baseline = sweep(lm, None, "none", [0.0], scorer, questions, max_new_tokens=max_new_tokens, progress=False)[0]
    points = [baseline]
    summary = {}
    for method, steerer in steerers.items():
        curve = sweep(lm, steerer, method, alphas, scorer, questions, max_new_tokens=max_new_tokens, progress=progress)
        points += curve
        summary[method] = tradeoff(curve, baseline, "answer", BUDGETS)
    training = {m: s.extra["history"] for m, s in steerers.items() if "history" in getattr(s, "extra", {})}
    return {
        "model_id": lm.model_id,
        "behavior": data.name,
        "layer": layer,
        "mode": mode,
        "tokens": tokens,
        "n_test": len(test),
        "n_open": len(questions),
        "max_new_tokens": max_new_tokens,
        "sanity": multiple_choice_sanity(lm),
        "points": [p.to_dict() for p in points],
        "tradeoff": summary,
        "training": training,
        "fit_seconds": fit_seconds,
    }, steerers
