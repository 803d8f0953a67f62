"""The baseline steering methods, fitted on the same paired activations pos, neg [n, d] as INNSteer.

  caa         mean difference mu+ - mu- (Rimsky et al., CAA)
  pca         RepE: the first principal direction of the paired differences pos - neg
  probe       ITI-style: the normal of a logistic-regression probe separating pos from neg
  linear_act  Linear-AcT: per-dimension affine transport of the neg distribution onto pos
  mimic, odesteer, hpr, truthflow
              the input-dependent methods of core/methods_nonadditive.py (full-covariance transport,
              classifier-gradient ODE, Householder rotation, flow-matching correction)
  innsteer    the invertible-network steerer (core/train.py)

Every entry of METHODS has one signature, ``fit(pos, neg, *, layer, model_id="", behavior="", **kw)``,
and returns a steerer with ``INNSteerer``'s call signature. The direction methods (pca, probe) are
unit directions sign-aligned with the mean difference and scaled to its length |mu+ - mu-|, so
alpha = 1 moves every activation as far as CAA does and one alpha grid suits every method. The
transport methods (linear_act, mimic) map mu- exactly onto mu+ at alpha = 1, odesteer moves every
row along a path |mu+ - mu-| long, and hpr and truthflow move the negatives' mean about that far
(each records the ratio on its training negatives in ``extra``).
(Scaling to the mean difference's projection instead would shrink a probe direction nearly
orthogonal to it: on SmolLM2 layer-10 activations the probe then moved ~2 at alpha = 1 vs CAA's 39.)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from .classifiers import fit_linear_probe
from .flow import FlowConfig
from .methods_nonadditive import fit_hpr, fit_mimic, fit_odesteer, fit_truthflow
from .steerers import (
    AffineSteerer,
    FlowCorrectionSteerer,
    HouseholderSteerer,
    INNSteerer,
    LinearSteerer,
    ODESteerer,
    SignedSteerer,
    SteererBase,
    TransportSteerer,
)
from .train import TrainConfig, check_contrastive, train_innsteer


def _mean_difference(pos: Tensor, neg: Tensor) -> Tensor:
    return (pos.double().mean(0) - neg.double().mean(0)).float()


def _scaled_like_mean_difference(unit: Tensor, mean_diff: Tensor) -> Tensor:
    """unit, flipped to point along the mean difference, times the mean difference's length."""
    sign = 1.0 if float(unit @ mean_diff) >= 0 else -1.0
    return unit * (sign * float(mean_diff.norm()))


def fit_caa(pos: Tensor, neg: Tensor, *, layer: int, model_id: str = "", behavior: str = "") -> LinearSteerer:
    pos, neg = check_contrastive(pos, neg)
    return LinearSteerer(_mean_difference(pos, neg), layer, model_id=model_id, behavior=behavior, method="caa")


def fit_pca(
    pos: Tensor, neg: Tensor, *, layer: int, model_id: str = "", behavior: str = "", center: bool = False
) -> LinearSteerer:
    """RepE's reading vector: the top right-singular vector of the paired differences.

    RepE shuffles the order within each pair before taking differences, so their mean is ~0 and
    centering changes nothing; the deterministic equivalent is the uncentered SVD of pos - neg
    (the default). ``center=True`` centers the differences first (repeng's ``pca_diff``), which
    finds where the differences vary most, not where they point on average.
    """
    pos, neg = check_contrastive(pos, neg)
    diffs = (pos - neg).double()
    if center:
        diffs = diffs - diffs.mean(0)
    unit = torch.linalg.svd(diffs, full_matrices=False).Vh[0].float()
    mean_diff = _mean_difference(pos, neg)
    vector = _scaled_like_mean_difference(unit, mean_diff)
    return LinearSteerer(
        vector,
        layer,
        model_id=model_id,
        behavior=behavior,
        method="pca",
        extra={"center": center, "cosine_to_mean_difference": _cosine(vector, mean_diff)},
    )


def fit_probe(
    pos: Tensor,
    neg: Tensor,
    *,
    layer: int,
    model_id: str = "",
    behavior: str = "",
    l2: Optional[float] = None,
    max_iter: int = 200,
) -> LinearSteerer:
    """The normal of an L2-regularized logistic regression pos (1) vs neg (0), fitted with L-BFGS
    (``classifiers.fit_linear_probe``); ``l2`` defaults to 1 / (number of rows), like
    scikit-learn's C = 1 on the conditioned activations."""
    pos, neg = check_contrastive(pos, neg)
    l2 = 1.0 / (2 * len(pos)) if l2 is None else float(l2)
    normal, _, accuracy = fit_linear_probe(pos, neg, l2=l2, max_iter=max_iter)
    unit = (normal / normal.norm()).float()
    mean_diff = _mean_difference(pos, neg)
    vector = _scaled_like_mean_difference(unit, mean_diff)
    return LinearSteerer(
        vector,
        layer,
        model_id=model_id,
        behavior=behavior,
        method="probe",
        extra={"l2": l2, "train_accuracy": accuracy, "cosine_to_mean_difference": _cosine(vector, mean_diff)},
    )


def fit_linear_act(
    pos: Tensor, neg: Tensor, *, layer: int, model_id: str = "", behavior: str = "", eps: float = 1e-3
) -> AffineSteerer:
    """Per-dimension Gaussian transport neg -> pos: scale = sigma+ / sigma-, shift = mu+ - scale * mu-.

    Dimensions where the source class barely varies (sigma- below eps times the median sigma-) get
    scale 1, a plain shift: their ratio would multiply any other activation by a huge factor."""
    pos, neg = check_contrastive(pos, neg)
    pos64, neg64 = pos.double(), neg.double()
    std_neg = neg64.std(0)
    degenerate = std_neg < eps * float(std_neg.median())
    scale = torch.where(degenerate, torch.ones_like(std_neg), pos64.std(0) / std_neg.clamp_min(1e-30))
    shift = pos64.mean(0) - scale * neg64.mean(0)
    return AffineSteerer(scale.float(), shift.float(), layer, model_id=model_id, behavior=behavior, method="linear_act")


def fit_innsteer(
    pos: Tensor,
    neg: Tensor,
    *,
    layer: int,
    model_id: str = "",
    behavior: str = "",
    seed: int = 0,
    progress: bool = False,
    away: Optional[dict] = None,
    **config,
) -> INNSteerer | SignedSteerer:
    """train_innsteer with TrainConfig and FlowConfig fields as keywords (e.g. ``mlp_hidden=64,
    sep_weight=0.1``); the history is in ``steerer.extra``. ``away``: the options of a second map
    for negative alphas (e.g. ``{"transport_sides": "both"}``): a ``SignedSteerer`` of the two,
    each trained on the same rows with the same seed, so each side is the map its options alone
    would train."""
    if away is not None:
        if not isinstance(away, dict) or "away" in away:
            raise TypeError(f"innsteer option 'away' must be a dict of training options (not nested), got {away!r}")
        sides = {
            side: fit_innsteer(
                pos, neg, layer=layer, model_id=model_id, behavior=behavior, seed=seed, progress=progress, **options
            )
            for side, options in (("toward", config), ("away", away))
        }
        return SignedSteerer(sides["toward"], sides["away"])
    return train_innsteer(
        pos, neg, layer=layer, model_id=model_id, behavior=behavior, config=innsteer_config(seed, **config),
        progress=progress,
    ).steerer  # fmt: skip


def innsteer_config(seed: int = 0, **options) -> TrainConfig:
    """The TrainConfig of ``fit_innsteer``'s keyword options (TrainConfig and FlowConfig fields);
    TypeError for a name that is neither."""
    flow_keys, train_keys = set(FlowConfig.__dataclass_fields__), set(TrainConfig.__dataclass_fields__) - {"flow"}
    unknown = sorted(set(options) - flow_keys - train_keys)
    if unknown:
        raise TypeError(f"unknown innsteer training option(s) {unknown}; known: {sorted(flow_keys | train_keys)}")
    flow = replace(TrainConfig().flow, **{k: v for k, v in options.items() if k in flow_keys})
    return TrainConfig(flow=flow, seed=seed, **{k: v for k, v in options.items() if k in train_keys})


def _cosine(a: Tensor, b: Tensor) -> float:
    return float(a.double() @ b.double() / (a.double().norm() * b.double().norm()).clamp_min(1e-30))


METHODS: dict[str, Callable[..., torch.nn.Module]] = {
    "caa": fit_caa,
    "pca": fit_pca,
    "probe": fit_probe,
    "linear_act": fit_linear_act,
    "mimic": fit_mimic,
    "odesteer": fit_odesteer,
    "hpr": fit_hpr,
    "truthflow": fit_truthflow,
    "innsteer": fit_innsteer,
}

# The one table of method name -> the steerer class its fit returns; the class's KIND names its
# steer files (several methods share the linear kind; the file keeps the method's name too).
METHOD_STEERERS: dict[str, type[SteererBase]] = {
    "caa": LinearSteerer,
    "pca": LinearSteerer,
    "probe": LinearSteerer,
    "linear_act": AffineSteerer,
    "mimic": TransportSteerer,
    "odesteer": ODESteerer,
    "hpr": HouseholderSteerer,
    "truthflow": FlowCorrectionSteerer,
    "innsteer": INNSteerer,  # a SignedSteerer with the option 'away' (a second map for alpha < 0)
}
