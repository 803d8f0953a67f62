"""The steering methods whose change depends on the activation, fitted on paired pos, neg [n, d]:

  mimic      MiMiC: the optimal affine transport between the classes' Gaussian fits (full covariance)
  odesteer   ODESteer: Euler steps along a polynomial-kernel classifier's normalized gradient
  hpr        HPR: norm-preserving rotation of probe-negative activations by a learned angle
  truthflow  TruthFlow-style: a flow-matching network's correction, projected on the differences' top
             singular directions

Same signature as ``methods.METHODS``; alpha = 1 moves the class means about as far as CAA's mean
difference for each of them (see each steerer's docstring for how alpha scales it). The networks
are trained with seeded initialization and batches, leaving the caller's RNG alone.
"""

from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor, nn

from .classifiers import fit_linear_probe, fit_logistic
from .errors import ConfigError
from .steerers import FlowCorrectionSteerer, HouseholderSteerer, ODESteerer, TransportSteerer
from .steerers.odesteer import MAX_DEGREE, sketch_features
from .train import check_contrastive


def _global_scale(x: Tensor, what: str) -> float:
    """The root-mean-square per-dimension standard deviation of rows x (float64): one scale for
    every dimension, so conditioning never reweights them."""
    scale = float(x.std(0).pow(2).mean().sqrt())
    if not scale > 0:
        raise ConfigError(f"the {what} do not vary: nothing to fit a steerer on")
    return scale


def _mean_shift_summary(moved: Tensor, start: Tensor, mean_diff: Tensor) -> dict[str, float]:
    """How the mean of rows moved from ``start`` to ``moved`` compares with the mean difference."""
    shift = (moved.double() - start.double()).mean(0)
    length = float(mean_diff.norm())
    return {
        "mean_shift_ratio_to_mean_difference": float(shift.norm()) / length if length > 0 else 0.0,
        "mean_shift_cosine_to_mean_difference": float(shift @ mean_diff / (shift.norm() * length).clamp_min(1e-30)),
    }


def _check_positive_ints(**settings: Any) -> None:
    for name, value in settings.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ConfigError(f"{name} must be a positive integer, got {value!r}")


# ---- MiMiC ----


def _correlation_shrinkage(x: Tensor) -> float:
    """Schafer & Strimmer's (2005) estimate of the shrinkage intensity of the sample correlations
    toward 0 (their target D: variances kept), from rows x [n, d] float64."""
    n = len(x)
    centered = x - x.mean(0)
    std = centered.std(0)
    z = centered / torch.where(std > 0, std, 1.0)
    mean_products = z.T @ z / n  # mean over rows of w_kij = z_ki z_kj
    correlation = mean_products * n / (n - 1)
    # var(r_ij) = n / (n - 1)^3 * sum_k (w_kij - mean w_ij)^2, with sum_k w_kij^2 = ((z*z).T @ (z*z))_ij
    variance = n / (n - 1) ** 3 * ((z * z).T @ (z * z) - n * mean_products**2)
    off_diagonal = ~torch.eye(x.shape[1], dtype=torch.bool)
    denominator = float(correlation[off_diagonal].pow(2).sum())
    if denominator == 0:
        return 1.0
    return min(1.0, max(0.0, float(variance[off_diagonal].sum()) / denominator))


def _shrunk_covariance(x: Tensor, shrinkage: Optional[float]) -> tuple[Tensor, float]:
    """((1 - lambda) S + lambda diag(S), lambda) for the sample covariance S of rows x (float64)."""
    covariance = torch.cov(x.T).reshape(x.shape[1], x.shape[1])
    intensity = _correlation_shrinkage(x) if shrinkage is None else float(shrinkage)
    shrunk = (1 - intensity) * covariance
    shrunk.diagonal().add_(intensity * covariance.diagonal())
    return shrunk, intensity


def gaussian_transport_matrix(source: Tensor, target: Tensor) -> Tensor:
    """The symmetric A with A source A = target: the linear part of the optimal (Wasserstein-2)
    transport map between Gaussians with these covariances,
    A = S^-1/2 (S^1/2 T S^1/2)^1/2 S^-1/2. Both float64, source positive definite."""
    values, vectors = torch.linalg.eigh(source)
    if float(values.min()) <= 1e-12 * float(values.max().clamp_min(1e-300)):
        raise ConfigError(
            "the negative class's covariance is singular (fewer varied rows than dimensions): "
            "use shrinkage > 0 or eps > 0"
        )
    root = (vectors * values.sqrt()) @ vectors.T
    inverse_root = (vectors * values.rsqrt()) @ vectors.T
    middle = root @ target @ root
    middle_values, middle_vectors = torch.linalg.eigh((middle + middle.T) / 2)
    middle_root = (middle_vectors * middle_values.clamp_min(0).sqrt()) @ middle_vectors.T
    matrix = inverse_root @ middle_root @ inverse_root
    return (matrix + matrix.T) / 2


def fit_mimic(
    pos: Tensor,
    neg: Tensor,
    *,
    layer: int,
    model_id: str = "",
    behavior: str = "",
    shrinkage: Optional[float] = None,
    eps: float = 1e-3,
) -> TransportSteerer:
    """MiMiC (Singh et al. 2024, "Representation Surgery: Theory and Practice of Affine Steering"):
    the affine map h -> A h + b that is the optimal transport from the negatives' Gaussian fit
    N(mu-, S-) onto the positives' N(mu+, S+): A = gaussian_transport_matrix(S-, S+),
    b = mu+ - A mu-. It maps the negatives' mean onto mu+ and their covariance onto S+
    (Linear-AcT is its diagonal special case).

    With fewer rows than dimensions the sample covariances are singular, so each is shrunk toward
    its diagonal, (1 - lambda) S + lambda diag(S), with Schafer & Strimmer's estimate of lambda
    (``shrinkage`` None) or the given lambda in [0, 1] (1 gives Linear-AcT's per-dimension map),
    and ``eps`` times the median variance is added to both (a floor for near-constant dimensions).
    """
    pos, neg = check_contrastive(pos, neg)
    if shrinkage is not None and not 0 <= shrinkage <= 1:
        raise ConfigError(f"shrinkage must lie in [0, 1] (or be None for the estimate), got {shrinkage}")
    if not (math.isfinite(eps) and eps >= 0):
        raise ConfigError(f"eps must be finite and >= 0, got {eps}")
    pos64, neg64 = pos.double(), neg.double()
    source, source_shrinkage = _shrunk_covariance(neg64, shrinkage)
    target, target_shrinkage = _shrunk_covariance(pos64, shrinkage)
    ridge = eps * float(torch.cat([source.diagonal(), target.diagonal()]).quantile(0.5))
    source.diagonal().add_(ridge)
    target.diagonal().add_(ridge)
    matrix = gaussian_transport_matrix(source, target)
    shift = pos64.mean(0) - matrix @ neg64.mean(0)
    extra = {"shrinkage_neg": source_shrinkage, "shrinkage_pos": target_shrinkage, "ridge": ridge}
    return TransportSteerer(
        {"matrix": matrix, "shift": shift}, layer, model_id=model_id, behavior=behavior, method="mimic", extra=extra
    )


# ---- ODESteer ----


def fit_odesteer(
    pos: Tensor,
    neg: Tensor,
    *,
    layer: int,
    model_id: str = "",
    behavior: str = "",
    degree: int = 2,
    sketch_dim: int = 1024,
    offset: float = 1.0,
    n_steps: int = 10,
    l2: Optional[float] = None,
    max_iter: int = 200,
    seed: int = 0,
) -> ODESteerer:
    """ODESteer (Zhao et al., ICLR 2026): logistic regression pos (1) vs neg (0) on TensorSketch
    features of the polynomial kernel (x.y + offset)^degree, x the activations centered and divided
    by one global scale (so |x| is about 1); the steer follows its logit's normalized gradient by
    ``n_steps`` Euler steps over a path of alpha * |mu+ - mu-| (see ``ODESteerer``).

    The sketch features are standardized for the fit (each feature's mean and spread folded back
    into the stored weight and bias); ``l2`` defaults to 1 / (number of rows)."""
    pos, neg = check_contrastive(pos, neg)
    _check_positive_ints(degree=degree, sketch_dim=sketch_dim, n_steps=n_steps, max_iter=max_iter)
    if degree > MAX_DEGREE:
        raise ConfigError(f"degree must be at most {MAX_DEGREE}, got {degree}")
    if not (math.isfinite(offset) and offset >= 0):
        raise ConfigError(f"offset must be finite and >= 0, got {offset}")
    x = torch.cat([pos, neg]).double()
    labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    hidden_size = x.shape[1]
    center = x.mean(0)
    input_scale = _global_scale(x, "activations") * math.sqrt(hidden_size)
    generator = torch.Generator().manual_seed(seed)
    buckets = torch.randint(0, sketch_dim, (degree, hidden_size + 1), generator=generator)
    signs = torch.randint(0, 2, (degree, hidden_size + 1), generator=generator).double() * 2 - 1
    inputs = torch.cat([(x - center) / input_scale, torch.full((len(x), 1), math.sqrt(offset))], dim=-1)
    features = sketch_features(inputs, buckets, signs, sketch_dim)
    feature_mean, feature_std = features.mean(0), features.std(0)
    feature_std = torch.where(feature_std > 1e-12 * feature_std.max().clamp_min(1e-300), feature_std, 1.0)
    weight, bias, accuracy = fit_logistic((features - feature_mean) / feature_std, labels, l2=l2, max_iter=max_iter)
    weight = weight / feature_std  # the classifier on the raw sketch features
    config = {
        "degree": degree,
        "sketch_dim": sketch_dim,
        "n_steps": n_steps,
        "step_length": float((pos.double().mean(0) - neg.double().mean(0)).norm()),
        "input_scale": input_scale,
        "offset": float(offset),
        "bias": float(bias - feature_mean @ weight),
    }
    tensors = {"center": center, "buckets": buckets, "signs": signs, "weight": weight}
    extra = {"train_accuracy": accuracy, "l2": 1.0 / len(x) if l2 is None else float(l2), "seed": seed}
    return ODESteerer(tensors, layer, config=config, model_id=model_id, behavior=behavior, extra=extra)


# ---- HPR ----


def _pair_angles(neg: Tensor, pos: Tensor) -> Tensor:
    """The angle between each negative activation and its positive pair, in [0, pi] (atan2 of the
    sine and cosine: accurate for small angles too)."""
    a = neg / neg.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    b = pos / pos.norm(dim=-1, keepdim=True).clamp_min(1e-30)
    cosine = (a * b).sum(-1)
    sine = (b - cosine.unsqueeze(-1) * a).norm(dim=-1)
    return torch.atan2(sine, cosine)


def _training_batches(n: int, batch_size: int, epochs: int, generator: torch.Generator):
    for _ in range(epochs):
        yield from torch.randperm(n, generator=generator).split(batch_size)


def fit_hpr(
    pos: Tensor,
    neg: Tensor,
    *,
    layer: int,
    model_id: str = "",
    behavior: str = "",
    mlp_hidden: int = 64,
    epochs: int = 300,
    batch_size: int = 256,
    lr: float = 1e-3,
    l2: Optional[float] = None,
    seed: int = 0,
) -> HouseholderSteerer:
    """HPR (Pham & Nguyen, EMNLP 2024, "Householder Pseudo-Rotation"): a logistic probe pos vs
    neg (``classifiers.fit_linear_probe``) whose normal defines the Householder reflection, and a
    one-hidden-layer tanh network predicting, from a negative activation, the angle between it and
    its positive pair (mean squared error in radians, Adam); see ``HouseholderSteerer``."""
    pos, neg = check_contrastive(pos, neg)
    _check_positive_ints(mlp_hidden=mlp_hidden, epochs=epochs, batch_size=batch_size)
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be finite and > 0, got {lr}")
    both = torch.cat([pos, neg]).double()
    center, input_scale = both.mean(0), _global_scale(both, "activations")
    probe_weight, probe_bias, accuracy = fit_linear_probe(pos, neg, l2=l2)
    targets = _pair_angles(neg.double(), pos.double()).float()
    inputs = ((neg.double() - center) / input_scale).float()
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(seed)
        inputs, targets = inputs.clone(), targets.clone()
        hidden, out = nn.Linear(neg.shape[1], mlp_hidden), nn.Linear(mlp_hidden, 1)
        with torch.no_grad():  # start at the mean angle
            mean_fraction = float((targets.mean() / math.pi).clamp(1e-3, 1 - 1e-3))
            out.bias.fill_(math.log(mean_fraction / (1 - mean_fraction)))
        optimizer = torch.optim.Adam([*hidden.parameters(), *out.parameters()], lr=lr)

        def predict(x: Tensor) -> Tensor:
            return math.pi * torch.sigmoid(out(torch.tanh(hidden(x))).squeeze(-1))

        for batch in _training_batches(len(inputs), batch_size, epochs, generator):
            optimizer.zero_grad()
            loss = (predict(inputs[batch]) - targets[batch]).pow(2).mean()
            loss.backward()
            optimizer.step()
        with torch.no_grad():
            rmse = float((predict(inputs) - targets).pow(2).mean().sqrt())
    tensors = {
        "probe_weight": probe_weight,
        "center": center,
        "w1": hidden.weight.detach(),
        "b1": hidden.bias.detach(),
        "w2": out.weight.detach()[0],
    }
    config = {
        "probe_bias": probe_bias,
        "input_scale": input_scale,
        "out_bias": float(out.bias.detach()),
        "mlp_hidden": mlp_hidden,
    }
    extra = {
        "probe_train_accuracy": accuracy,
        "mean_pair_angle": float(targets.mean()),
        "angle_train_rmse": rmse,
        "seed": seed,
    }
    steerer = HouseholderSteerer(tensors, layer, config=config, model_id=model_id, behavior=behavior, extra=extra)
    with torch.no_grad():
        steerer.extra.update(_mean_shift_summary(steerer(neg, 1.0), neg, (pos.double() - neg.double()).mean(0)))
    return steerer


# ---- TruthFlow ----


def fit_truthflow(
    pos: Tensor,
    neg: Tensor,
    *,
    layer: int,
    model_id: str = "",
    behavior: str = "",
    rank: int = 16,
    mlp_hidden: int = 256,
    n_steps: int = 10,
    train_steps: int = 1500,
    batch_size: int = 128,
    lr: float = 1e-3,
    seed: int = 0,
) -> FlowCorrectionSteerer:
    """TruthFlow (Wang et al., ICML 2025): conditional flow matching from each training activation
    (either class) to its pair's difference pos - neg, both standardized by their mean and one
    global scale: x_t = (1 - t) x_0 + t x_1 with t uniform, a two-hidden-layer SiLU network v(x_t, t)
    regressed on x_1 - x_0 (Adam, ``train_steps`` batches). The correction it integrates is
    projected on the top ``rank`` right singular vectors of the differences (at most min(n, d));
    see ``FlowCorrectionSteerer``."""
    pos, neg = check_contrastive(pos, neg)
    _check_positive_ints(rank=rank, mlp_hidden=mlp_hidden, n_steps=n_steps, train_steps=train_steps)
    _check_positive_ints(batch_size=batch_size)
    if not (math.isfinite(lr) and lr > 0):
        raise ConfigError(f"lr must be finite and > 0, got {lr}")
    pos64, neg64 = pos.double(), neg.double()
    diffs = pos64 - neg64
    sources, targets = torch.cat([pos64, neg64]), torch.cat([diffs, diffs])
    source_center, source_scale = sources.mean(0), _global_scale(sources, "activations")
    target_center = diffs.mean(0)
    target_scale = float(diffs.std(0).pow(2).mean().sqrt()) or 1.0  # identical differences: any scale works
    rank = min(rank, *diffs.shape)
    basis = torch.linalg.svd(diffs, full_matrices=False).Vh[:rank]
    start = ((sources - source_center) / source_scale).float()
    end = ((targets - target_center) / target_scale).float()
    hidden_size = pos.shape[1]
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]), torch.inference_mode(False), torch.enable_grad():
        torch.manual_seed(seed)
        start, end = start.clone(), end.clone()
        network = nn.Sequential(
            nn.Linear(hidden_size + 1, mlp_hidden),
            nn.SiLU(),
            nn.Linear(mlp_hidden, mlp_hidden),
            nn.SiLU(),
            nn.Linear(mlp_hidden, hidden_size),
        )
        optimizer = torch.optim.Adam(network.parameters(), lr=lr)
        losses = []
        for _ in range(train_steps):
            batch = torch.randint(0, len(start), (batch_size,), generator=generator)
            t = torch.rand(batch_size, 1, generator=generator)
            x_t = (1 - t) * start[batch] + t * end[batch]
            optimizer.zero_grad()
            loss = (network(torch.cat([x_t, t], dim=-1)) - (end[batch] - start[batch])).pow(2).mean()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    first, _, second, _, third = network
    tensors = {
        "source_center": source_center,
        "target_center": target_center,
        "w1": first.weight.detach(),
        "b1": first.bias.detach(),
        "w2": second.weight.detach(),
        "b2": second.bias.detach(),
        "w3": third.weight.detach(),
        "b3": third.bias.detach(),
        "basis": basis,
    }
    config = {
        "mlp_hidden": mlp_hidden,
        "rank": rank,
        "n_steps": n_steps,
        "source_scale": source_scale,
        "target_scale": target_scale,
    }
    tail = losses[-max(1, train_steps // 10) :]
    extra = {"final_flow_loss": sum(tail) / len(tail), "seed": seed}
    steerer = FlowCorrectionSteerer(tensors, layer, config=config, model_id=model_id, behavior=behavior, extra=extra)
    with torch.no_grad():
        steerer.extra.update(_mean_shift_summary(steerer(neg, 1.0), neg, diffs.mean(0)))
    return steerer


NONADDITIVE_METHODS = {"mimic": fit_mimic, "odesteer": fit_odesteer, "hpr": fit_hpr, "truthflow": fit_truthflow}
