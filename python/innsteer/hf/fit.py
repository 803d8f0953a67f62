"""``innsteer.fit``: a steerer from a user's own contrastive texts, in one call.

steerer = innsteer.fit(model, tokenizer, [("I love it.", "I hate it."), ...], layer=10)
with steerer.apply(model, alpha=2.0):
    model.generate(...)
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from ..core.errors import ConfigError
from ..core.hooks import check_layer
from ..core.methods import METHODS
from ..core.steerers import SteererBase
from ..datasets.ab import ABItem, DataError
from .collect import contrastive_activations
from .models import LoadedModel, prepare_tokenizer

Pair = Union[tuple[str, str], tuple[str, str, str], ABItem]


def pairs_to_items(pairs: Sequence[Pair]) -> list[ABItem]:
    """ABItems from ``(positive_text, negative_text)`` (bare texts, no chat template) or
    ``(prompt, positive_completion, negative_completion)`` (the prompt goes through the chat
    template; the completions are the reply) tuples; ABItems pass through."""
    items = []
    for number, pair in enumerate(pairs):
        if isinstance(pair, ABItem):
            items.append(pair)
            continue
        if not isinstance(pair, (tuple, list)) or len(pair) not in (2, 3) or not all(isinstance(t, str) for t in pair):
            raise ConfigError(
                f"pair {number} must be (positive_text, negative_text) or (prompt, positive, negative) strings, "
                f"got {pair!r:.120}"
            )
        prompt, positive, negative = ("", *pair) if len(pair) == 2 else pair
        if not positive or not negative:
            raise ConfigError(f"pair {number} has an empty positive or negative text")
        try:
            items.append(ABItem.plain(prompt, positive, negative))
        except DataError as error:
            raise ConfigError(f"pair {number}: {error}") from None
    if len(items) < 2:
        raise ConfigError(f"fit needs at least 2 contrastive pairs, got {len(items)}")
    return items


def _model_id(model) -> str:
    """The id steerers record: the one ``load_model`` gave the model, else its directory's name."""
    given = getattr(model, "innsteer_model_id", "")
    if given:
        return given
    name = getattr(getattr(model, "config", None), "_name_or_path", "") or ""
    return Path(name).name


def as_loaded_model(model, tokenizer, caller: str) -> LoadedModel:
    """``model`` as a LoadedModel: a Hugging Face causal LM with its tokenizer, or a LoadedModel."""
    if isinstance(model, LoadedModel):
        return model
    if tokenizer is None:
        raise ConfigError(f"{caller} needs the model's tokenizer (or an innsteer LoadedModel)")
    prepare_tokenizer(tokenizer)
    return LoadedModel(model, tokenizer, _model_id(model))


def fit(
    model,
    tokenizer=None,
    pairs: Sequence[Pair] = (),
    *,
    layer: int,
    method: str = "innsteer",
    tokens: str = "all",
    behavior: str = "",
    progress: bool = False,
    **options,
) -> SteererBase:
    """Fit a steerer of ``method`` (a key of ``innsteer.METHODS``) at decoder ``layer`` from ``pairs``.

    ``model``: a Hugging Face causal LM (with its ``tokenizer``) or an ``innsteer.hf.models.LoadedModel``.
    ``pairs``: see ``pairs_to_items``. ``tokens``: which completion tokens give the activation —
    'all' (the default: every token as its own row, the distribution the steerer acts on after the
    prompt; it steered best on validation data, docs/RESULTS.md), 'mean' (the mean over the
    completion) or 'last' (its last token). ``options`` go
    to the method (e.g. ``sep_weight=0.1`` for INNSteer). The steerer records the model's id;
    applying it to another model is refused.
    """
    lm = as_loaded_model(model, tokenizer, "fit")
    items = pairs_to_items(pairs)
    return fit_method(lm, method, items, layer, tokens=tokens, options=options, behavior=behavior, progress=progress)


def fit_method(
    lm: LoadedModel,
    method: str,
    items: Sequence[ABItem],
    layer: int,
    *,
    tokens: str = "all",
    mode: str = "answer",
    options: Optional[dict] = None,
    seed: int = 0,
    behavior: str = "",
    split: str = "",
    progress: bool = False,
) -> SteererBase:
    """The one way a steerer is fitted (``fit``, ``innsteer train``, the evaluation protocol, ``tune``):
    ``METHODS[method]`` with ``options`` on the contrastive activations of ``items`` at ``layer``.
    ``seed`` reseeds the activation rows' subsampling and, for a method that takes one, its
    training; ``split`` names the items in the activation cache."""
    if method not in METHODS:
        raise ConfigError(f"unknown method '{method}'; choose from: {', '.join(METHODS)}")
    layer = check_layer(lm.model, layer)
    pos, neg = contrastive_activations(
        lm, items, layer, mode=mode, tokens=tokens, behavior=behavior or "custom", split=split, seed=seed,
        progress=progress,
    )[layer]  # fmt: skip
    fitter = METHODS[method]
    accepted = inspect.signature(fitter).parameters
    extra = {name: value for name, value in (("seed", seed), ("progress", progress)) if name in accepted}
    steerer = fitter(pos, neg, layer=layer, model_id=lm.model_id, behavior=behavior, **{**extra, **(options or {})})
    steerer.extra.update(tokens=tokens, mode=mode)
    return steerer
