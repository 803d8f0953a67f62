"""Training INNSteer: fit the flow phi on contrastive activations, then v = mean phi(h+) - mean phi(h-).

The loss has up to four terms, each per batch of pairs (h+_i, h-_i):
  nll        Gaussian negative log-likelihood per dimension, (1/2 |z|^2 - log|det J|) / d, with the
             standardization's constant log-det left out (it has no parameters);
  separation -log(1 + F), F = ((mu+ - mu-) . u)^2 / (var+_u + var-_u), u the unit direction
             between the latent class means: minimizing the loss INCREASES the separation of the
             classes along u relative to their spread along it (the sign a public
             reimplementation got wrong, training a flow that steered nothing);
  logdet     mean (log|det J| / d)^2 over the couplings, keeping phi and its inverse well conditioned;
  transport  (``transport_weight``; 0 switches it off) the energy distance of the batch's steered
             negatives phi^-1(phi(h-) + v) to its positives over that of CAA's translation: the
             steer itself trained to carry one class's distribution onto the other's.
With ``nll="class"`` the NLL is class-conditional: z | pos ~ N(m+, I), z | neg ~ N(m-, I) with learned
latent means, so the flow makes the two classes translates of each other and the latent translation
v = m+ - m- carries the negatives' distribution onto the positives' (a nonlinear transport map).
AdamW on a pair-level train/validation split, early stopping on the validation loss (best weights
kept), or with ``select="transport"`` on how well the steer carries held-out negatives onto held-out
positives (``transport_ratio``).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .errors import ConfigError
from .fieldtypes import check_field_types
from .flow import INN, FlowConfig
from .steerers import INNSteerer
from .steerers.inn import SCALINGS

MIN_TRAIN_PAIRS = 8
NLL_CHOICES = ("joint", "class")
SELECT_CHOICES = ("loss", "transport")
TRANSPORT_SIDES = ("toward", "both", "away")


@dataclass
class TrainConfig:
    flow: FlowConfig = field(default_factory=lambda: FlowConfig(mlp_hidden=256))
    lr: float = 1e-3
    weight_decay: float = 1e-4
    max_epochs: int = 40
    batch_size: int = 64  # pairs per batch (2 * batch_size rows)
    val_fraction: float = 0.2
    patience: int = 8  # epochs without a better selection score (validation loss or transport) before stopping
    # The directional term. On per-token training rows (the distribution steering acts on) the
    # validation trade-off was best without it: area to 1 nat/token 0.26 / 0.22 with 0 vs 0.14 / 0.05
    # with 0.05 (coordinate-other-ais / corrigible-neutral-HHH, SmolLM2 layer 10, validation split
    # seed 0; docs/RESULTS.md); 1.0 tore the classes apart (validation Fisher ratio 3 -> 67).
    sep_weight: float = 0.0
    logdet_weight: float = 1.0
    nll_weight: float = 1.0
    # The transport term: energy distance of the batch's steered negatives phi^-1(phi(h-) + v) to its
    # positives, relative to CAA's translation h- + mu+ - mu- (what select="transport" measures on
    # held-out rows, as a training objective). 0 = off. On validation it steered better than the
    # flow without it on 4 of the 5 behaviors it was run on (SmolLM2: corrigible, myopic-reward,
    # refusal, survival-instinct; not coordinate-other-ais), and it is what puts INNSteer above CAA
    # on the test items of myopic-reward and refusal (docs/RESULTS.md, finding 7 and the verdict).
    transport_weight: float = 1.0
    # Which steers the transport term and select="transport" measure: "toward" alpha = +1 only (the
    # negatives carried onto the positives), "both" also alpha = -1 (the positives onto the
    # negatives), the two ratios averaged, "away" alpha = -1 only (a map for the away side of a
    # signed steerer). The steer is used at both signs, and a flow trained and kept for +1 alone
    # can extrapolate badly at -1 (docs/RESULTS.md: "away" on corrigible).
    transport_sides: str = "toward"
    # "joint": one N(0, I) for both classes (a density of all rows); "class": N(m+-, I) per class.
    # select: which epoch's weights are kept, the lowest validation loss ("loss") or the best
    # transport_ratio ("transport"; epoch 0, i.e. CAA, when no epoch carries the held-out negatives
    # closer onto the positives). Chosen on validation items (docs/RESULTS.md, SmolLM2 layer 10,
    # seeds 0-2): "class" + "transport" was the only variant above CAA on both behaviors studied
    # (area to 1 nat/token +0.067 [+0.049, +0.087] coordinate-other-ais, +0.013 [+0.004, +0.021]
    # corrigible-neutral-HHH); "joint" + "loss" +0.011 [-0.004, +0.034] / +0.033 [+0.017, +0.053].
    nll: str = "class"
    select: str = "transport"
    # How the trained steerer grows with alpha (innsteer.core.steerers.inn.SCALINGS). Training does
    # not depend on it: both scalings are the same map at alpha = +-1, where the transport term and
    # select="transport" measure it.
    scaling: str = "latent"
    grad_clip: float = 10.0
    seed: int = 0
    device: str = "cpu"
    # torch intra-op threads while training (restored after); None keeps torch's setting. The
    # matrices are small, and on a busy CPU every op's thread barrier waits for a descheduled
    # thread: 600 real pairs, d=576, 2 cores at load ~4 took 13 s with 1 thread, 80 s with 2
    num_threads: Optional[int] = 1

    def to_dict(self) -> dict:
        return asdict(self)

    def check(self) -> None:
        check_field_types(self)
        if not 0 < self.val_fraction < 1:
            raise ConfigError(f"val_fraction must be in (0, 1), got {self.val_fraction}")
        self.flow.check()
        for name in ("max_epochs", "batch_size", "patience"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_threads is not None and self.num_threads < 1:
            raise ConfigError(f"num_threads must be >= 1 or None, got {self.num_threads}")
        for name in ("lr", "grad_clip"):
            if not 0 < getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be positive and finite, got {getattr(self, name)}")
        weights = ("weight_decay", "sep_weight", "logdet_weight", "nll_weight", "transport_weight")
        for name in weights:
            if not 0 <= getattr(self, name) < math.inf:
                raise ConfigError(f"{name} must be >= 0 and finite, got {getattr(self, name)}")
        if not any(getattr(self, name) for name in weights[1:]):
            raise ConfigError("sep_weight, logdet_weight, nll_weight and transport_weight are all 0: nothing to train")
        choices_of = {
            "nll": NLL_CHOICES,
            "select": SELECT_CHOICES,
            "transport_sides": TRANSPORT_SIDES,
            "scaling": SCALINGS,
        }
        for name, choices in choices_of.items():
            if getattr(self, name) not in choices:
                raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {getattr(self, name)!r}")


@dataclass
class TrainResult:
    steerer: INNSteerer
    # per-epoch lists: train_loss, val_loss, nll, separation_loss, logdet_reg, transport_loss (training means),
    # val_nll, val_fisher_separation (validation split)
    history: dict[str, list[float]] = field(default_factory=dict)
    best_epoch: int = 0  # epoch whose weights were kept (1-based; 0 = the untrained flow)
    initial_val_fisher_separation: float = 0.0  # of the untrained flow (standardization only)
    seconds: float = 0.0


def check_contrastive(pos: Tensor, neg: Tensor, min_pairs: int = 2) -> tuple[Tensor, Tensor]:
    """Validate paired activations pos, neg [n, d]; returns float32 copies."""
    for name, t in (("pos", pos), ("neg", neg)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != 2:
            raise ConfigError(f"{name} must have shape [n, hidden_size], got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be floating point activations, got {t.dtype}")
    if pos.shape != neg.shape:
        raise ConfigError(
            f"pos and neg must be paired activations of one shape, got {tuple(pos.shape)} and {tuple(neg.shape)}"
        )
    if pos.shape[0] < min_pairs:
        raise ConfigError(f"need at least {min_pairs} contrastive pairs, got {pos.shape[0]}")
    for name, t in (("pos", pos), ("neg", neg)):
        bad = (~torch.isfinite(t)).any(-1).nonzero().flatten()
        if len(bad):
            raise ConfigError(f"{name} has NaN or Inf activations in {len(bad)} rows (first: row {int(bad[0])})")
    return pos.float(), neg.float()


def _fisher_ratio(z_pos: Tensor, z_neg: Tensor, eps: float = 1e-6) -> Tensor:
    diff = z_pos.mean(0) - z_neg.mean(0)
    u = diff / diff.norm().clamp_min(1e-12)
    p, q = z_pos @ u, z_neg @ u
    return (diff @ u) ** 2 / (p.var(0, unbiased=False) + q.var(0, unbiased=False) + eps)


def fisher_separation(z_pos: Tensor, z_neg: Tensor) -> float:
    """((mu+ - mu-) . u)^2 / (var+_u + var-_u) along the unit mean difference u: larger = better separated."""
    with torch.no_grad():
        return float(_fisher_ratio(z_pos.double(), z_neg.double()))


def separation_loss(z_pos: Tensor, z_neg: Tensor) -> Tensor:
    """-log(1 + Fisher ratio): decreasing it increases the separation of the class means."""
    return -torch.log1p(_fisher_ratio(z_pos, z_neg))


def _loss_terms(
    inn: INN,
    pos: Tensor,
    neg: Tensor,
    config: TrainConfig,
    class_means: Optional[Tensor] = None,
    fixed: Optional[dict[float, tuple[Tensor, Tensor]]] = None,
) -> dict[str, Tensor]:
    """The loss and its terms; ``class_means`` [2, d] (m+, m-) for the class-conditional NLL;
    ``fixed``: ``_transport_constants`` of these rows, when already computed."""
    z, logdet = inn(torch.cat([pos, neg]))
    # drop the standardization's constant -sum log(scale): the NLL then reads ~0.5 per dim at the start
    logdet_couplings = logdet + torch.log(inn.scale).sum()
    d = inn.dim
    centered = z
    if config.nll == "class":
        centered = z - torch.repeat_interleave(class_means, torch.tensor([len(pos), len(neg)], device=z.device), 0)
    terms = {
        "nll": (0.5 * centered.pow(2).sum(-1) - logdet_couplings).mean() / d,
        "separation_loss": separation_loss(z[: len(pos)], z[len(pos) :]),
        "logdet_reg": (logdet_couplings / d).pow(2).mean(),
    }
    terms["transport_loss"] = (
        _transport_loss(inn, z, pos, neg, config.transport_sides, fixed) if config.transport_weight else z.new_zeros(())
    )
    terms["loss"] = (
        config.nll_weight * terms["nll"]
        + config.sep_weight * terms["separation_loss"]
        + config.logdet_weight * terms["logdet_reg"]
        + config.transport_weight * terms["transport_loss"]
    )
    terms["z"] = z.detach()
    return terms


def _mean_distance(a: Tensor, b: Tensor) -> Tensor:
    # sqrt of clamped squared distances: cdist's gradient is undefined at the zero diagonal
    squared = (a.pow(2).sum(-1, keepdim=True) + b.pow(2).sum(-1) - 2 * a @ b.T).clamp_min(1e-12)
    return squared.sqrt().mean()


def _energy(x: Tensor, y: Tensor, y_spread: Optional[Tensor] = None) -> Tensor:
    """energy_distance as a differentiable float32 tensor (the V-statistic over the batch);
    ``y_spread``: y's own mean distance, when already computed."""
    if y_spread is None:
        y_spread = _mean_distance(y, y)
    return _mean_distance(x, y) - (_mean_distance(x, x) + y_spread) / 2


def _transport_sides(pos: Tensor, neg: Tensor, sides: str) -> dict[float, tuple[Tensor, Tensor]]:
    """{sign: (source rows, target rows)} of the steers a transport measure takes: the negatives
    carried onto the positives at alpha = +1, the positives onto the negatives at alpha = -1."""
    signs = {"toward": (1.0,), "both": (1.0, -1.0), "away": (-1.0,)}[sides]
    return {sign: (neg, pos) if sign > 0 else (pos, neg) for sign in signs}


@torch.no_grad()
def _transport_constants(inn: INN, pos: Tensor, neg: Tensor, sides: str) -> dict[float, tuple[Tensor, Tensor]]:
    """{sign: (CAA's energy distance, the target's own mean distance)} in standardized units: the
    parts of ``_transport_loss`` that training does not change. Validation measures the same rows
    every epoch, and these are 4 of its 6 distance means, each quadratic in the rows."""
    constants = {}
    for sign, (source, target) in _transport_sides(pos, neg, sides).items():
        translated = (source + (target.mean(0) - source.mean(0)) - inn.mean) / inn.scale
        target = (target - inn.mean) / inn.scale
        spread = _mean_distance(target, target)
        constants[sign] = (_energy(translated, target, spread).clamp_min(1e-6), spread)
    return constants


def _transport_loss(
    inn: INN,
    z: Tensor,
    pos: Tensor,
    neg: Tensor,
    sides: str = "toward",
    fixed: Optional[dict[float, tuple[Tensor, Tensor]]] = None,
) -> Tensor:
    """The batch's steered negatives' energy distance to its positives over CAA's (a constant), in
    standardized units; v is the batch's latent mean difference, as the steer's is the data's.
    ``sides="both"`` averages it with the same ratio of the positives steered at alpha = -1;
    ``sides="away"`` is that ratio alone. ``fixed``: ``_transport_constants`` of these rows."""
    fixed = fixed if fixed is not None else _transport_constants(inn, pos, neg, sides)
    z_pos, z_neg = z[: len(pos)], z[len(pos) :]
    v = z_pos.mean(0) - z_neg.mean(0)
    parts = []
    for sign, (_, target) in _transport_sides(pos, neg, sides).items():
        reference, spread = fixed[sign]
        steered = inn.inverse((z_neg if sign > 0 else z_pos) + sign * v)
        target = (target - inn.mean) / inn.scale
        parts.append(_energy((steered - inn.mean) / inn.scale, target, spread) / reference)
    return sum(parts) / len(parts)


def energy_distance(x: Tensor, y: Tensor, y_spread: Optional[Tensor] = None) -> float:
    """The energy distance E|x - y| - (E|x - x'| + E|y - y'|) / 2 between two samples [n, d] (float64):
    zero only for equal distributions, and it needs no pairing of the rows. ``y_spread``: E|y - y'|
    (``spread(y)``), when already computed."""
    x, y = x.double(), y.double()
    y_spread = spread(y) if y_spread is None else y_spread
    return float(torch.cdist(x, y).mean() - (torch.cdist(x, x).mean() + y_spread) / 2)


def spread(y: Tensor) -> Tensor:
    """E|y - y'| of a sample [n, d] in float64: energy_distance's term of its second sample."""
    y = y.double()
    return torch.cdist(y, y).mean()


@torch.no_grad()
def transport_references(
    pos: Tensor, neg: Tensor, mean_difference: Tensor, sides: str = "toward"
) -> dict[float, tuple[float, Tensor]]:
    """{sign: (CAA's energy distance, the target's spread)}: the parts of ``transport_ratio`` on these
    rows that the flow does not change (training measures the same validation rows every epoch)."""
    return {
        sign: (max(energy_distance(source + sign * mean_difference, target), 1e-12), spread(target))
        for sign, (source, target) in _transport_sides(pos, neg, sides).items()
    }


@torch.no_grad()
def transport_ratio(
    inn: INN,
    direction: Tensor,
    pos: Tensor,
    neg: Tensor,
    mean_difference: Tensor,
    sides: str = "toward",
    references: Optional[dict[float, tuple[float, Tensor]]] = None,
) -> float:
    """How far the steer at alpha = 1 leaves the negatives from the positives, as a fraction of how
    far CAA's shift leaves them: energy_distance(phi^-1(phi(neg) + v), pos) over
    energy_distance(neg + mu+ - mu-, pos). Below 1: the flow carries the negatives' distribution
    closer onto the positives' than a translation does (the untrained flow gives exactly 1).
    ``sides="both"``: the mean of that and the same ratio at alpha = -1 (positives onto negatives);
    ``sides="away"``: that ratio alone. ``references``: ``transport_references`` of these rows."""
    references = references or transport_references(pos, neg, mean_difference, sides)
    parts = []
    for sign, (source, target) in _transport_sides(pos, neg, sides).items():
        reference, target_spread = references[sign]
        steered = inn.inverse(inn(source)[0] + sign * direction)
        parts.append(energy_distance(steered, target, target_spread) / reference)
    return sum(parts) / len(parts)


@torch.no_grad()
def latent_direction(inn: INN, pos: Tensor, neg: Tensor, chunk: int = 1024) -> Tensor:
    """v = mean phi(pos) - mean phi(neg), in chunks of rows."""

    def latent_mean(x: Tensor) -> Tensor:
        return torch.cat([inn(part)[0] for part in x.split(chunk)]).double().mean(0)

    return (latent_mean(pos) - latent_mean(neg)).to(inn.dtype)


def train_innsteer(
    pos: Tensor,
    neg: Tensor,
    *,
    layer: int,
    model_id: str = "",
    behavior: str = "",
    config: Optional[TrainConfig] = None,
    progress: bool = True,
) -> TrainResult:
    """Train an INNSteer steerer on paired activations pos, neg [n, d] of one layer.

    The returned steerer (frozen, on ``config.device``) maps a typical negative activation onto
    the positive class in latent space at alpha = 1.
    """
    config = config or TrainConfig()
    config.check()
    threads = torch.get_num_threads()
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    try:
        # training needs autograd even when the caller runs under no_grad / inference_mode
        with torch.inference_mode(False), torch.enable_grad():
            return _train(pos, neg, layer, model_id, behavior, config, progress)
    finally:
        torch.set_num_threads(threads)


def _train(
    pos: Tensor, neg: Tensor, layer: int, model_id: str, behavior: str, config: TrainConfig, progress: bool
) -> TrainResult:
    start = time.perf_counter()
    pos, neg = check_contrastive(pos, neg)
    n, d = pos.shape
    n_val = max(2, round(n * config.val_fraction))
    if n - n_val < MIN_TRAIN_PAIRS:
        raise ConfigError(
            f"need at least {MIN_TRAIN_PAIRS + n_val} contrastive pairs to train "
            f"({MIN_TRAIN_PAIRS} for training, {n_val} for validation), got {n}"
        )
    device = torch.device(config.device)
    pos, neg = pos.to(device), neg.to(device)
    generator = torch.Generator().manual_seed(config.seed)
    order = torch.randperm(n, generator=generator).to(device)
    val_idx, train_idx = order[:n_val], order[n_val:]

    with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the caller's RNG alone
        torch.manual_seed(config.seed)
        inn = INN.from_config(d, config.flow, seed=config.seed)
    inn.to(device)
    inn.fit_standardization(torch.cat([pos[train_idx], neg[train_idx]]))
    params = list(inn.parameters())
    class_means = None
    if config.nll == "class":  # initialized at the standardized class means (the untrained flow's)
        with torch.no_grad():
            init = torch.stack([pos[train_idx].mean(0), neg[train_idx].mean(0)])
            class_means = torch.nn.Parameter((init - inn.mean) / inn.scale)
        params.append(class_means)
    optimizer = torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    mean_difference = pos[train_idx].mean(0) - neg[train_idx].mean(0)
    # what the validation measures spend most of their time on and training does not change
    val_constants, references = None, None
    if config.transport_weight:
        val_constants = _transport_constants(inn, pos[val_idx], neg[val_idx], config.transport_sides)
    if config.select == "transport":
        references = transport_references(pos[val_idx], neg[val_idx], mean_difference, config.transport_sides)

    def validate() -> dict[str, float]:
        with torch.no_grad():
            terms = _loss_terms(inn, pos[val_idx], neg[val_idx], config, class_means, val_constants)
            z = terms["z"]
            out = {
                "loss": float(terms["loss"]),
                "nll": float(terms["nll"]),
                "fisher": fisher_separation(z[:n_val], z[n_val:]),
            }
            if config.select == "transport":
                direction = latent_direction(inn, pos[train_idx], neg[train_idx])
                out["transport"] = transport_ratio(
                    inn, direction, pos[val_idx], neg[val_idx], mean_difference, config.transport_sides, references
                )
        return out

    criterion = "transport" if config.select == "transport" else "loss"
    initial = validate()
    keys = ("train_loss", "val_loss", "nll", "separation_loss", "logdet_reg", "transport_loss")
    keys += ("val_nll", "val_fisher_separation")
    keys += ("val_transport",) if criterion == "transport" else ()
    history: dict[str, list[float]] = {key: [] for key in keys}
    # the untrained flow (standardization only, i.e. CAA) is a candidate too: best_epoch 0 keeps it
    best_score, best_epoch, best_state = initial[criterion], 0, copy.deepcopy(inn.state_dict())
    n_batches = max(1, len(train_idx) // config.batch_size)  # tensor_split keeps every batch >= batch_size
    bar = tqdm(range(1, config.max_epochs + 1), desc=f"innsteer layer {layer}", disable=not progress, leave=False)
    for epoch in bar:
        sums = {"loss": 0.0, "nll": 0.0, "separation_loss": 0.0, "logdet_reg": 0.0, "transport_loss": 0.0}
        shuffled = train_idx[torch.randperm(len(train_idx), generator=generator).to(device)]
        for batch in torch.tensor_split(shuffled, n_batches):
            terms = _loss_terms(inn, pos[batch], neg[batch], config, class_means)
            if not torch.isfinite(terms["loss"]):
                raise FloatingPointError(
                    f"innsteer training diverged at epoch {epoch} (loss {terms['loss'].item()}); "
                    "try a smaller lr or larger logdet_weight"
                )
            optimizer.zero_grad(set_to_none=True)
            terms["loss"].backward()
            torch.nn.utils.clip_grad_norm_(params, config.grad_clip)
            optimizer.step()
            for key in sums:
                sums[key] += float(terms[key].detach()) / n_batches
        val = validate()
        for key, value in (
            ("train_loss", sums["loss"]),
            ("val_loss", val["loss"]),
            ("nll", sums["nll"]),
            ("separation_loss", sums["separation_loss"]),
            ("logdet_reg", sums["logdet_reg"]),
            ("transport_loss", sums["transport_loss"]),
            ("val_nll", val["nll"]),
            ("val_fisher_separation", val["fisher"]),
        ):
            history[key].append(value)
        if criterion == "transport":
            history["val_transport"].append(val["transport"])
        bar.set_postfix(train=f"{sums['loss']:.3f}", val=f"{val['loss']:.3f}", fisher=f"{val['fisher']:.2f}")
        if val[criterion] < best_score:
            best_score, best_epoch, best_state = val[criterion], epoch, copy.deepcopy(inn.state_dict())
        elif epoch - best_epoch >= config.patience:
            break
    bar.close()

    inn.load_state_dict(best_state)
    inn.eval().requires_grad_(False)
    direction = latent_direction(inn, pos, neg)
    seconds = time.perf_counter() - start
    extra = {
        "train": config.to_dict(),
        "best_epoch": best_epoch,
        "n_pairs": n,
        "seconds": round(seconds, 2),
        "initial_val_fisher_separation": initial["fisher"],
        "history": history,
        **({"val_transport": best_score} if criterion == "transport" else {}),
    }
    steerer = INNSteerer(
        inn, direction, layer, model_id=model_id, behavior=behavior, method="innsteer", extra=extra,
        scaling=config.scaling,
    )  # fmt: skip
    return TrainResult(steerer, history, best_epoch, initial["fisher"], seconds)
