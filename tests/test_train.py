"""INNSteer training on synthetic contrastive activations whose classes differ nonlinearly."""

import math

import numpy as np
import pytest
import torch

from innsteer import INN, load_steerer
from innsteer.core.errors import ConfigError
from innsteer.core.flow import FlowConfig
from innsteer.core.train import (
    TrainConfig,
    _energy,
    _loss_terms,
    _transport_constants,
    energy_distance,
    fisher_separation,
    latent_direction,
    separation_loss,
    train_innsteer,
    transport_ratio,
    transport_references,
)

D = 24
# the loss-selected joint flow: these tests check the training mechanics (loss, separation, early stopping)
SMALL = dict(
    flow=FlowConfig(mlp_hidden=64),
    max_epochs=30,
    patience=30,
    batch_size=32,
    sep_weight=0.05,
    nll="joint",
    select="loss",
)


def synthetic_pairs(n=240, d=D, seed=0, huge_rows=2):
    """Paired activations: neg = shared content x, pos = x plus a shift that depends nonlinearly
    on x (so no single vector maps neg onto pos), and a few massive-activation rows in both."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=g) @ (torch.eye(d) + torch.randn(d, d, generator=g) / d**0.5)
    pos = x.clone()
    pos[:, 0] += 1.0 + torch.tanh(2 * x[:, 1])
    pos[:, 2] += 0.5 * x[:, 3] ** 2
    pos[:, 4:8] += 0.5 * torch.sin(2 * x[:, 8:12])
    neg = x.clone()
    pos[:huge_rows] *= 50
    neg[:huge_rows] *= 50
    return pos, neg


def fisher_reference(zp, zn):
    zp, zn = np.asarray(zp, np.float64), np.asarray(zn, np.float64)
    diff = zp.mean(0) - zn.mean(0)
    u = diff / np.linalg.norm(diff)
    return (diff @ u) ** 2 / ((zp @ u).var() + (zn @ u).var())


def latent(inn, x):
    with torch.no_grad():
        return inn(x)[0]


def untrained_inn(pos, neg):
    inn = INN(D, 4, 64)
    inn.fit_standardization(torch.cat([pos, neg]))
    return inn


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    # tiny matrices: threads only add fork/join cost (and thrash on a shared 2-core CI box)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def data():
    return synthetic_pairs()


@pytest.fixture(scope="module")
def trained(data):
    return train_innsteer(*data, layer=3, model_id="toy", behavior="b", config=TrainConfig(**SMALL), progress=False)


@pytest.fixture(scope="module")
def trained_nll_only(data):
    return train_innsteer(*data, layer=3, config=TrainConfig(**{**SMALL, "sep_weight": 0.0}), progress=False)


def test_fisher_separation_matches_formula():
    g = torch.Generator().manual_seed(1)
    zp, zn = torch.randn(50, 7, generator=g) + 0.7, torch.randn(60, 7, generator=g) * 2
    assert fisher_separation(zp, zn) == pytest.approx(fisher_reference(zp, zn), rel=1e-5)  # eps 1e-6 in the denominator


def test_separation_loss_descent_increases_separation():
    # the sign check at the level of the loss: a gradient-descent step on it must separate the classes
    g = torch.Generator().manual_seed(2)
    zp = (torch.randn(64, 10, generator=g) + 0.3).requires_grad_()
    zn = torch.randn(64, 10, generator=g).requires_grad_()
    before = fisher_reference(zp.detach(), zn.detach())
    for _ in range(20):
        zp.grad = zn.grad = None
        separation_loss(zp, zn).backward()
        with torch.no_grad():
            zp -= 5.0 * zp.grad
            zn -= 5.0 * zn.grad
    assert fisher_reference(zp.detach(), zn.detach()) > 2 * before


def test_training_reduces_the_loss(trained):
    h = trained.history
    assert len(h["train_loss"]) == len(h["val_loss"]) == len(h["val_fisher_separation"]) >= trained.best_epoch >= 1
    assert h["train_loss"][-1] < h["train_loss"][0] - 0.3
    assert min(h["val_loss"]) == h["val_loss"][trained.best_epoch - 1] < h["val_loss"][0]
    assert all(math.isfinite(v) for values in h.values() for v in values)


def test_training_increases_separation(data, trained, trained_nll_only):
    pos, neg = data
    inn = trained.steerer.inn
    trained_sep = fisher_reference(latent(inn, pos), latent(inn, neg))
    untrained = untrained_inn(pos, neg)
    untrained_sep = fisher_reference(latent(untrained, pos), latent(untrained, neg))
    nll_only = trained_nll_only.steerer.inn
    nll_only_sep = fisher_reference(latent(nll_only, pos), latent(nll_only, neg))
    # measured: untrained 0.06, NLL only 0.76, trained 1.28; with the separation term's sign flipped 0.11
    assert trained_sep > 2 * untrained_sep
    assert trained_sep > 1.25 * nll_only_sep
    # held-out pairs too (the validation split), not only the training pairs
    best = trained.history["val_fisher_separation"][trained.best_epoch - 1]
    assert best > 1.5 * trained.initial_val_fisher_separation


def test_direction_is_latent_mean_difference(data, trained):
    pos, neg = data
    inn = trained.steerer.inn
    expected = latent(inn, pos).double().mean(0) - latent(inn, neg).double().mean(0)
    torch.testing.assert_close(trained.steerer.direction.double(), expected, atol=1e-4, rtol=1e-4)


def mlp_classifier(pos, neg, steps=300):
    """An independent nonlinear classifier: p(pos | x), averaged over rows."""
    torch.manual_seed(0)
    x, y = torch.cat([pos, neg]), torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))])
    mean, std = x.mean(0), x.std(0)
    net = torch.nn.Sequential(torch.nn.Linear(x.shape[1], 64), torch.nn.SiLU(), torch.nn.Linear(64, 1))
    optimizer = torch.optim.Adam(net.parameters(), 1e-2, weight_decay=1e-3)
    for _ in range(steps):
        optimizer.zero_grad()
        torch.nn.functional.binary_cross_entropy_with_logits(net((x - mean) / std).squeeze(-1), y).backward()
        optimizer.step()
    return lambda rows: float(torch.sigmoid(net((rows - mean) / std).detach()).mean())


def test_alpha_one_moves_negatives_onto_positives(data, trained):
    pos, neg = data[0][2:], data[1][2:]  # typical rows, not the massive ones
    steerer = trained.steerer
    with torch.no_grad():
        steered = steerer(neg, 1.0)
    inn = steerer.inn
    # in latent space the steered negatives' mean lands on the positives' mean
    gap_before = (latent(inn, neg).mean(0) - latent(inn, pos).mean(0)).norm()
    gap_after = (latent(inn, steered).mean(0) - latent(inn, pos).mean(0)).norm()
    assert gap_after < 0.1 * gap_before
    # in activation space: most of the way to the positives' mean ...
    assert (steered.mean(0) - pos.mean(0)).norm() < 0.3 * (neg.mean(0) - pos.mean(0)).norm()
    # ... and to what a classifier trained on fresh pairs of the same distribution calls positive
    p_pos = mlp_classifier(*synthetic_pairs(n=2000, seed=1, huge_rows=0))
    assert p_pos(pos) > p_pos(neg) + 0.05  # the yardstick separates the classes (they overlap a lot)
    assert p_pos(steered) - p_pos(neg) > 0.6 * (p_pos(pos) - p_pos(neg))


def test_alpha_zero_is_identity_and_massive_rows_stay_finite(data, trained):
    pos, neg = data
    with torch.no_grad():
        assert torch.equal(trained.steerer(neg, 0.0), neg)
        assert torch.isfinite(trained.steerer(neg[:2], 1.0)).all()  # the 50x rows


def test_untrained_flow_steers_like_caa(data):
    # with phi = standardization only, phi^-1(phi(h) + v) = h + (mu+ - mu-): INNSteer starts at CAA
    pos, neg = data
    inn = untrained_inn(pos, neg)
    from innsteer import INNSteerer

    steerer = INNSteerer(inn, latent_direction(inn, pos, neg), layer=0)
    with torch.no_grad():
        steered = steerer(neg, 0.5)
    expected = neg.double() + 0.5 * (pos.double().mean(0) - neg.double().mean(0))
    torch.testing.assert_close(steered.double(), expected, atol=2e-3, rtol=1e-4)


def test_early_stopping_keeps_best_weights(data):
    pos, neg = data
    config = TrainConfig(
        flow=FlowConfig(mlp_hidden=32), max_epochs=50, patience=2, lr=3e-2, nll="joint", select="loss"
    )  # a too-large lr: overfits fast
    result = train_innsteer(pos, neg, layer=0, config=config, progress=False)
    h = result.history
    assert 1 <= result.best_epoch < len(h["val_loss"]) < 50
    assert len(h["val_loss"]) - result.best_epoch == config.patience
    assert h["val_loss"][result.best_epoch - 1] == min(h["val_loss"])
    # the kept weights are the best epoch's, not the last one's: recompute the validation loss
    n_val = round(len(pos) * config.val_fraction)
    val = torch.randperm(len(pos), generator=torch.Generator().manual_seed(config.seed))[:n_val]
    with torch.no_grad():
        loss = float(_loss_terms(result.steerer.inn, pos[val], neg[val], config)["loss"])
    assert loss == pytest.approx(h["val_loss"][result.best_epoch - 1], rel=1e-5, abs=1e-6)
    assert loss < h["val_loss"][-1]


def test_steerer_metadata_and_round_trip(tmp_path, data, trained):
    s = trained.steerer
    assert (s.layer, s.model_id, s.behavior, s.method) == (3, "toy", "b", "innsteer")
    assert s.extra["train"] == TrainConfig(**SMALL).to_dict()
    assert s.extra["best_epoch"] == trained.best_epoch
    assert s.extra["history"]["val_loss"] == trained.history["val_loss"]
    s.save(tmp_path / "s.safetensors")
    loaded = load_steerer(tmp_path / "s.safetensors", expect_hidden_size=D, expect_model_id="toy")
    assert loaded.extra == s.extra
    with torch.no_grad():
        assert torch.equal(loaded(data[1], 1.5), s(data[1], 1.5))


def test_seeded_training_is_deterministic(data):
    config = TrainConfig(flow=FlowConfig(mlp_hidden=16), max_epochs=2, patience=2, seed=5)
    a = train_innsteer(*data, layer=0, config=config, progress=False)
    b = train_innsteer(*data, layer=0, config=config, progress=False)
    assert torch.equal(a.steerer.direction, b.steerer.direction)
    assert a.history == b.history


def test_scaling_changes_the_steer_and_not_the_training(data):
    """Both scalings are the same map at alpha = +-1, where training measures it: one seed trains
    the same flow and direction either way; the steerer carries the scaling."""
    config = TrainConfig(flow=FlowConfig(mlp_hidden=16), max_epochs=2, patience=2, seed=5)
    latent = train_innsteer(*data, layer=0, config=config, progress=False).steerer
    config.scaling = "displacement"
    lengthened = train_innsteer(*data, layer=0, config=config, progress=False).steerer
    assert (latent.scaling, lengthened.scaling) == ("latent", "displacement")
    assert torch.equal(latent.direction, lengthened.direction)
    weights = zip(latent.inn.state_dict().values(), lengthened.inn.state_dict().values())
    assert all(torch.equal(a, b) for a, b in weights)
    h = data[1][:5]
    assert torch.allclose(lengthened(h, -1.0), latent(h, -1.0), atol=1e-5)
    assert not torch.allclose(lengthened(h, 4.0), latent(h, 4.0), atol=1e-3)


@pytest.mark.parametrize(
    "pos, neg, match",
    [
        (torch.randn(20, 8), torch.randn(20, 9), "one shape"),
        (torch.randn(20, 8), torch.randn(19, 8), "one shape"),
        (torch.randn(20), torch.randn(20), r"shape \[n, hidden_size\]"),
        (torch.randn(9, 8), torch.randn(9, 8), "at least 10 contrastive pairs"),
        (torch.ones(20, 8, dtype=torch.int64), torch.ones(20, 8, dtype=torch.int64), "floating point"),
    ],
)
def test_bad_inputs(pos, neg, match):
    with pytest.raises((ValueError, TypeError), match=match):
        train_innsteer(pos, neg, layer=0, progress=False)


@pytest.mark.parametrize(
    ("config", "match"),
    [
        (lambda: TrainConfig(max_epochs=2.0), "max_epochs must be an integer, got 2.0"),
        (lambda: TrainConfig(batch_size=True), "batch_size must be an integer, got True"),
        (lambda: TrainConfig(lr="1e-3"), "lr must be a number, got '1e-3'"),
        (lambda: TrainConfig(transport_weight=False), "transport_weight must be a number, got False"),
        (lambda: TrainConfig(nll=1), "nll must be a string, got 1"),
        (lambda: TrainConfig(num_threads=1.5), "num_threads must be an integer, got 1.5"),
        (lambda: TrainConfig(flow=FlowConfig(num_couplings=2.5)), "num_couplings must be an integer, got 2.5"),
        (lambda: TrainConfig(flow=FlowConfig(clamp="2")), "clamp must be a number, got '2'"),
        # a value no memory holds is named before anything is allocated
        (lambda: TrainConfig(flow=FlowConfig(num_couplings=10**6)), r"num_couplings in \[1, 64\].*got 1000000"),
        (lambda: TrainConfig(flow=FlowConfig(mlp_hidden=10**8)), r"mlp_hidden in \[1, 65536\].*100000000"),
    ],
)
def test_options_of_the_wrong_type_are_named_before_training(data, config, match):
    """Options arrive from JSON (tune --variants) and keywords: a wrong type is one ConfigError,
    not a failure deep inside training, and a bool never passes as a number."""
    with pytest.raises(ConfigError, match=match):
        train_innsteer(*data, layer=0, config=config(), progress=False)


def test_numpy_scalars_and_none_pass_the_type_check():
    TrainConfig(lr=np.float32(1e-3), max_epochs=np.int64(3), weight_decay=0, num_threads=None).check()


def test_nan_inputs_are_named():
    pos, neg = torch.randn(20, 8), torch.randn(20, 8)
    neg[7, 3] = float("nan")
    with pytest.raises(ValueError, match="neg has NaN or Inf activations in 1 rows .first: row 7"):
        train_innsteer(pos, neg, layer=0, progress=False)


def two_regions(n=400, seed=0):
    """2-D classes that no translation maps onto each other: pos around x = +2 with a narrow y,
    neg around x = -2 with a wide y. A coupling that scales y by a function of x can."""
    g = torch.Generator().manual_seed(seed)
    pos = torch.stack([2 + 0.3 * torch.randn(n, generator=g), 0.2 * torch.randn(n, generator=g)], 1)
    neg = torch.stack([-2 + 0.3 * torch.randn(n, generator=g), 2.0 * torch.randn(n, generator=g)], 1)
    return pos, neg


def test_energy_distance_matches_its_definition():
    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(7, 3, generator=g), torch.randn(5, 3, generator=g) + 1
    a, b = x.double().numpy(), y.double().numpy()

    def mean_dist(p, q):
        return np.mean([[np.linalg.norm(u - w) for w in q] for u in p])

    expected = mean_dist(a, b) - (mean_dist(a, a) + mean_dist(b, b)) / 2
    assert energy_distance(x, y) == pytest.approx(expected, rel=1e-12)
    assert energy_distance(x, x) == pytest.approx(0.0, abs=1e-12)


@pytest.mark.parametrize("sides", ["toward", "both", "away"])
def test_untrained_flow_transports_exactly_like_caa(sides):
    pos, neg = two_regions()
    inn = INN(2, 2, 8)
    inn.fit_standardization(torch.cat([pos, neg]))
    ratio = transport_ratio(inn, latent_direction(inn, pos, neg), pos, neg, pos.mean(0) - neg.mean(0), sides)
    assert ratio == pytest.approx(1.0, abs=1e-5)


def test_transport_ratio_of_both_sides_averages_the_steer_at_plus_and_minus_one():
    """Against an independent float64 computation on a flow whose couplings are not the identity."""
    pos, neg = two_regions(n=60)
    inn = INN(2, 2, 8, seed=3)
    inn.fit_standardization(torch.cat([pos, neg]))
    with torch.no_grad():
        for w in inn.w2:
            w.normal_(0, 0.3)
        v = latent_direction(inn, pos, neg)
        shift = pos.mean(0) - neg.mean(0)
        toward = energy_distance(inn.inverse(inn(neg)[0] + v), pos) / energy_distance(neg + shift, pos)
        away = energy_distance(inn.inverse(inn(pos)[0] - v), neg) / energy_distance(pos - shift, neg)
        assert transport_ratio(inn, v, pos, neg, shift) == pytest.approx(toward, rel=1e-6)
        assert transport_ratio(inn, v, pos, neg, shift, "both") == pytest.approx((toward + away) / 2, rel=1e-6)
        assert transport_ratio(inn, v, pos, neg, shift, "away") == pytest.approx(away, rel=1e-6)
    assert abs(toward - away) > 0.05  # the two sides differ here, so the mean is not one of them


def test_class_conditional_nll_is_gaussian_around_each_class_mean():
    pos, neg = two_regions(n=50)
    inn = INN(2, 2, 8)
    inn.fit_standardization(torch.cat([pos, neg]))
    means = torch.tensor([[1.0, -0.5], [-1.0, 0.25]])
    with torch.no_grad():
        nll = float(_loss_terms(inn, pos, neg, TrainConfig(nll="class"), means)["nll"])
    z = ((torch.cat([pos, neg]) - inn.mean) / inn.scale).double()  # the untrained flow: standardization
    labels = torch.cat([torch.zeros(50, dtype=torch.long), torch.ones(50, dtype=torch.long)])
    expected = (0.5 * (z - means.double()[labels]).pow(2).sum(-1)).mean() / 2  # couplings' log-det is 0
    assert nll == pytest.approx(float(expected), rel=1e-5)


def test_class_conditional_training_transports_what_a_translation_cannot():
    """With one N(m, I) per class, the latent translation carries the wide negatives onto the narrow
    positives; CAA only moves their centre (transport ratio 1)."""
    pos, neg = two_regions()
    config = TrainConfig(flow=FlowConfig(num_couplings=2, mlp_hidden=32), nll="class", max_epochs=60, patience=60)
    steerer = train_innsteer(pos, neg, layer=0, config=config, progress=False).steerer
    held_pos, held_neg = two_regions(seed=1)
    ratio = transport_ratio(steerer.inn, steerer.direction, held_pos, held_neg, pos.mean(0) - neg.mean(0))
    assert ratio < 0.5
    with torch.no_grad():
        steered = steerer(held_neg, 1.0)
    assert steered[:, 1].std() < 0.5 * held_neg[:, 1].std()  # the wide y was narrowed, as the positives'
    assert abs(float(steered[:, 0].mean()) - 2.0) < 0.3


@pytest.mark.parametrize("sides", ["toward", "both", "away"])
def test_transport_loss_is_the_energy_ratio_of_the_steered_batch(sides):
    """The training term against an independent float64 computation, on a flow whose couplings are not
    the identity; the untrained flow gives exactly CAA's translation (ratio 1)."""
    pos, neg = two_regions(n=40)
    inn = INN(2, 2, 8, seed=3)
    inn.fit_standardization(torch.cat([pos, neg]))
    config = TrainConfig(nll="joint", transport_weight=1.0, transport_sides=sides)
    with torch.no_grad():
        untrained = float(_loss_terms(inn, pos, neg, config)["transport_loss"])
        for w in inn.w2:
            w.normal_(0, 0.3)
        z, _ = inn(torch.cat([pos, neg]))
        term = float(_loss_terms(inn, pos, neg, config)["transport_loss"])
        v = z[:40].mean(0) - z[40:].mean(0)
        steered_neg, steered_pos = inn.inverse(z[40:] + v), inn.inverse(z[:40] - v)
    assert untrained == pytest.approx(1.0, abs=1e-4)

    def standardized(x):
        return (x - inn.mean) / inn.scale

    def ratio(steered, source, target):
        translated = source + target.mean(0) - source.mean(0)
        return energy_distance(standardized(steered), standardized(target)) / energy_distance(
            standardized(translated), standardized(target)
        )

    toward, away = ratio(steered_neg, neg, pos), ratio(steered_pos, pos, neg)
    expected = {"toward": toward, "both": (toward + away) / 2, "away": away}[sides]
    assert term == pytest.approx(expected, rel=1e-3) and abs(term - 1) > 0.05


@pytest.mark.parametrize("sides", ["toward", "both", "away"])
def test_validation_constants_computed_once_give_the_same_measures(sides):
    """Training computes the parts of its validation measures that the couplings do not change once;
    measured on a flow away from the identity, both measures equal their recomputation bit for bit,
    and the constants do not depend on the couplings."""
    pos, neg = two_regions(n=50)
    inn = INN(2, 2, 8, seed=3)
    inn.fit_standardization(torch.cat([pos, neg]))
    shift = pos.mean(0) - neg.mean(0)
    config = TrainConfig(transport_sides=sides)
    constants = _transport_constants(inn, pos, neg, sides)
    references = transport_references(pos, neg, shift, sides)
    with torch.no_grad():
        for w in inn.w2:
            w.normal_(0, 0.3)
        assert _transport_constants(inn, pos, neg, sides) == constants
        v = latent_direction(inn, pos, neg)
        means = torch.tensor([[1.0, -0.5], [-1.0, 0.25]])
        once = _loss_terms(inn, pos, neg, config, means, constants)
        again = _loss_terms(inn, pos, neg, config, means)
    assert float(once["transport_loss"]) == float(again["transport_loss"]) != pytest.approx(1.0, abs=0.05)
    assert float(once["loss"]) == float(again["loss"])
    assert transport_references(pos, neg, shift, sides) == references
    ratio = transport_ratio(inn, v, pos, neg, shift, sides, references)
    assert ratio == transport_ratio(inn, v, pos, neg, shift, sides) != pytest.approx(1.0, abs=0.05)


def test_transport_loss_has_finite_gradients_with_repeated_rows():
    x = torch.randn(6, 3).repeat(2, 1).requires_grad_()
    _energy(x, torch.randn(5, 3)).backward()
    assert torch.isfinite(x.grad).all()


def test_training_on_the_transport_term_alone_transports_what_a_translation_cannot():
    pos, neg = two_regions()
    config = TrainConfig(
        flow=FlowConfig(num_couplings=2, mlp_hidden=32), nll_weight=0.0, transport_weight=1.0, max_epochs=60
    )
    result = train_innsteer(pos, neg, layer=0, config=config, progress=False)
    assert result.history["transport_loss"][-1] < result.history["transport_loss"][0]
    held_pos, held_neg = two_regions(seed=1)
    steerer = result.steerer
    assert transport_ratio(steerer.inn, steerer.direction, held_pos, held_neg, pos.mean(0) - neg.mean(0)) < 0.5


def test_transport_of_both_sides_trains_the_steer_at_minus_one_too():
    """Trained on the two-sided transport term alone, the steer at alpha = -1 carries held-out
    positives onto the wide negatives, which CAA's translation cannot (its ratio is 1)."""
    pos, neg = two_regions()
    config = TrainConfig(
        flow=FlowConfig(num_couplings=2, mlp_hidden=32),
        nll_weight=0.0,
        transport_weight=1.0,
        transport_sides="both",
        max_epochs=60,
    )
    steerer = train_innsteer(pos, neg, layer=0, config=config, progress=False).steerer
    held_pos, held_neg = two_regions(seed=1)
    with torch.no_grad():
        steered = steerer(held_pos, -1.0)
    away = energy_distance(steered, held_neg) / energy_distance(held_pos - pos.mean(0) + neg.mean(0), held_neg)
    assert away < 0.5
    assert steered[:, 1].std() > 2 * held_pos[:, 1].std()  # the narrow y was widened, as the negatives'


def test_selection_by_transport_keeps_the_epoch_that_transports_best():
    pos, neg = two_regions()
    config = TrainConfig(flow=FlowConfig(num_couplings=2, mlp_hidden=32), select="transport", max_epochs=20)
    result = train_innsteer(pos, neg, layer=0, config=config, progress=False)
    history = result.history["val_transport"]
    assert result.best_epoch >= 1 and history[result.best_epoch - 1] == min(history) < 1.0
    assert result.steerer.extra["val_transport"] == min(history)
    # recomputed on the kept weights and the training function's own validation rows
    n_val = round(len(pos) * config.val_fraction)
    order = torch.randperm(len(pos), generator=torch.Generator().manual_seed(config.seed))
    val, train = order[:n_val], order[n_val:]
    inn = result.steerer.inn
    ratio = transport_ratio(
        inn, latent_direction(inn, pos[train], neg[train]), pos[val], neg[val], pos[train].mean(0) - neg[train].mean(0)
    )
    assert ratio == pytest.approx(min(history), rel=1e-4)


@pytest.mark.parametrize(
    "field, value",
    [
        ("val_fraction", 1.0),
        ("lr", 0.0),
        ("lr", float("inf")),  # passed as positive and overflowed in the op
        ("grad_clip", float("nan")),
        ("logdet_weight", float("inf")),
        ("max_epochs", 0),
        ("sep_weight", -1.0),
        ("nll_weight", -1.0),
        ("num_threads", 0),
        ("nll", "mixture"),
        ("select", "val"),
        ("transport_sides", "sideways"),
        ("scaling", "linear"),
    ],
)
def test_bad_config(field, value):
    with pytest.raises(ValueError, match=field):
        train_innsteer(
            torch.randn(20, 8), torch.randn(20, 8), layer=0, config=TrainConfig(**{field: value}), progress=False
        )


def test_a_config_with_no_loss_term_is_refused():
    config = TrainConfig(sep_weight=0, logdet_weight=0, nll_weight=0, transport_weight=0)
    with pytest.raises(ValueError, match="nothing to train"):
        train_innsteer(torch.randn(20, 8), torch.randn(20, 8), layer=0, config=config, progress=False)


def test_num_threads_is_restored(data):
    torch.set_num_threads(2)
    try:
        train_innsteer(
            *data,
            layer=0,
            config=TrainConfig(flow=FlowConfig(mlp_hidden=8), max_epochs=1, num_threads=1),
            progress=False,
        )
        assert torch.get_num_threads() == 2
        with pytest.raises(ValueError, match="NaN"):
            train_innsteer(
                torch.full((20, 8), float("nan")),
                torch.zeros(20, 8),
                layer=0,
                config=TrainConfig(num_threads=1),
                progress=False,
            )
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(1)


@pytest.mark.skipif(
    not (torch.cuda.is_available() and __import__("innsteer_ext").HAS_CUDA_KERNELS),
    reason="needs a CUDA GPU and the CUDA kernels",
)
def test_training_on_cuda_separates_the_classes(data):
    pos, neg = data
    result = train_innsteer(pos, neg, layer=3, config=TrainConfig(**SMALL, device="cuda"), progress=False)
    steerer = result.steerer
    assert steerer.direction.is_cuda
    inn = steerer.inn
    cuda_sep = fisher_reference(latent(inn, pos.cuda()).cpu(), latent(inn, neg.cuda()).cpu())
    untrained = untrained_inn(pos, neg)
    assert cuda_sep > 2 * fisher_reference(latent(untrained, pos), latent(untrained, neg))
    with torch.no_grad():
        assert torch.equal(steerer(neg.cuda(), 0.0).cpu(), neg)
