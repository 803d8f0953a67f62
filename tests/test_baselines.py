"""Baseline steering methods and the linear/affine steerers, against independent references."""

import json

import pytest
import torch
from safetensors.torch import load_file, save_file
from test_train import one_thread, synthetic_pairs  # noqa: F401  (autouse fixture applies here too)

from innsteer import AffineSteerer, INNSteerer, LinearSteerer, SteerFileError, load_steerer
from innsteer.core.methods import METHOD_STEERERS, METHODS, fit_caa, fit_linear_act, fit_pca, fit_probe

D = 24


@pytest.fixture(scope="module")
def data():
    return synthetic_pairs(n=200, d=D)


def top_eigenvector(matrix):
    """The leading eigenvector of a symmetric matrix (eigh: an algorithm independent of the SVD)."""
    return torch.linalg.eigh(matrix).eigenvectors[:, -1]


def test_caa_is_the_mean_difference(data):
    pos, neg = data
    steerer = fit_caa(pos, neg, layer=2)
    expected = pos.double().mean(0) - neg.double().mean(0)
    torch.testing.assert_close(steerer.vector.double(), expected, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(steerer(neg, 2.0), neg + 2 * steerer.vector)


@pytest.mark.parametrize("center", [False, True])
def test_pca_is_the_sign_aligned_principal_direction(data, center):
    pos, neg = data
    steerer = fit_pca(pos, neg, layer=2, center=center)
    diffs = (pos - neg).double()
    if center:
        diffs = diffs - diffs.mean(0)
    reference = top_eigenvector(diffs.T @ diffs)
    svd = torch.linalg.svd(diffs, full_matrices=False).Vh[0]
    assert abs(float(reference @ svd)) == pytest.approx(1, abs=1e-6)  # the two references agree
    vector = steerer.vector.double()
    unit = vector / vector.norm()
    assert abs(float(unit @ reference)) == pytest.approx(1, abs=1e-5)
    mean_diff = pos.double().mean(0) - neg.double().mean(0)
    assert float(vector @ mean_diff) > 0  # sign-aligned
    assert float(vector.norm()) == pytest.approx(float(mean_diff.norm()), rel=1e-4)  # CAA's step length
    assert steerer.extra["cosine_to_mean_difference"] == pytest.approx(float(unit @ mean_diff / mean_diff.norm()))


def test_pca_sign_alignment_flips_an_opposite_component():
    # differences concentrated along -e0 while the mean points along -e0 too: the vector must point along -e0
    g = torch.Generator().manual_seed(0)
    neg = torch.randn(100, 6, generator=g)
    pos = neg.clone()
    pos[:, 0] -= 3 + torch.rand(100, generator=g)
    vector = fit_pca(pos, neg, layer=0).vector
    assert vector[0] < -3 and vector[1:].abs().max() < 0.2


def test_uncentered_pca_equals_repe_with_shuffled_pairs(data):
    # RepE takes differences of randomly ordered pairs, then centers: same direction as the uncentered default
    pos, neg = data
    g = torch.Generator().manual_seed(3)
    flip = torch.randint(0, 2, (len(pos), 1), generator=g).bool()
    diffs = torch.where(flip, neg - pos, pos - neg).double()
    diffs = diffs - diffs.mean(0)
    repe = top_eigenvector(diffs.T @ diffs)
    unit = fit_pca(pos, neg, layer=0).vector.double()
    assert abs(float(unit / unit.norm() @ repe)) > 0.98


def test_probe_finds_the_discriminant_direction():
    # shared anisotropic noise: the mean difference is tilted by a noisy axis, the best separating
    # direction (LDA, Sigma^-1 delta_mu) is not; logistic regression recovers the latter
    g = torch.Generator().manual_seed(1)
    d, n = 10, 1500
    mix = torch.eye(d) + 0.3 * torch.randn(d, d, generator=g)
    noise = lambda: torch.randn(n, d, generator=g) @ mix  # noqa: E731
    delta = torch.zeros(d)
    delta[0], delta[1] = 1.0, 1.0
    neg, pos = noise(), noise() + delta
    sigma = mix.T @ mix
    lda = torch.linalg.solve(sigma, delta)
    steerer = fit_probe(pos, neg, layer=0, l2=1e-4)
    unit = steerer.vector / steerer.vector.norm()
    lda_unit, caa_unit = lda / lda.norm(), delta / delta.norm()
    assert float(unit @ lda_unit) > 0.97
    assert float(caa_unit @ lda_unit) < 0.9  # the test is meaningful: CAA's direction is off the discriminant
    assert steerer.extra["train_accuracy"] > 0.75
    projection = lambda x: x @ unit  # noqa: E731
    assert float((projection(pos) > projection(neg)).float().mean()) > 0.75  # pairwise ordering
    assert float(steerer.vector @ (pos.mean(0) - neg.mean(0))) > 0  # sign-aligned


def test_probe_ignores_near_constant_dimensions():
    # a dimension with almost no spread and no class information must not dominate the direction
    # (dividing a standardized probe's weights by the per-dimension std would blow it up)
    g = torch.Generator().manual_seed(4)
    neg = torch.randn(300, 6, generator=g)
    pos = torch.randn(300, 6, generator=g)
    pos[:, 0] += 1.5
    neg[:, 5] *= 1e-4
    pos[:, 5] = 1e-4 * torch.randn(300, generator=g)
    unit = fit_probe(pos, neg, layer=0).vector
    unit = unit / unit.norm()
    assert unit[0] > 0.95 and abs(float(unit[5])) < 0.05


def best_threshold_accuracy(pos, neg, direction):
    scores = torch.cat([pos, neg]).double() @ direction.double()
    labels = torch.cat([torch.ones(len(pos)), torch.zeros(len(neg))]).bool()
    return max(float(((scores > t) == labels).float().mean()) for t in scores)


def test_probe_separates_the_synthetic_classes(data):
    pos, neg = data
    steerer = fit_probe(pos, neg, layer=0)
    accuracy = best_threshold_accuracy(pos, neg, steerer.vector)
    # the classes differ nonlinearly and overlap; the probe still beats the mean-difference direction
    assert accuracy > 0.65
    assert accuracy > best_threshold_accuracy(pos, neg, pos.mean(0) - neg.mean(0)) + 0.02
    assert steerer.extra["train_accuracy"] > 0.6
    mean_diff = pos.mean(0) - neg.mean(0)
    assert float(steerer.vector.norm()) == pytest.approx(float(mean_diff.norm()), rel=1e-4)
    assert float(steerer.vector @ mean_diff) > 0


def test_linear_act_transports_moments(data):
    pos, neg = data
    steerer = fit_linear_act(pos, neg, layer=0)
    with torch.no_grad():
        moved = steerer(neg, 1.0).double()
        half = steerer(neg, 0.5).double()
    torch.testing.assert_close(moved.mean(0), pos.double().mean(0), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(moved.std(0), pos.double().std(0), atol=1e-3, rtol=1e-4)
    torch.testing.assert_close(half, (neg.double() + moved) / 2, atol=1e-4, rtol=1e-5)  # alpha interpolates


def test_linear_act_constant_dimension_stays_finite():
    g = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(20, 4, generator=g), torch.randn(20, 4, generator=g)
    neg[:, 2] = 1.0  # zero spread in the source class
    steerer = fit_linear_act(pos, neg, layer=0)
    assert torch.isfinite(steerer.scale).all() and torch.isfinite(steerer(neg, 1.0)).all()
    # that dimension is shifted, not scaled; the others are transported as usual
    assert float(steerer.scale[2]) == 1.0
    assert float(steerer.shift[2]) == pytest.approx(float(pos[:, 2].mean() - 1.0), abs=1e-5)
    assert float(steerer.scale[0]) == pytest.approx(float(pos[:, 0].std() / neg[:, 0].std()), rel=1e-5)


@pytest.fixture(scope="module")
def fitted(data):
    pos, neg = data
    options = {
        "innsteer": dict(mlp_hidden=32, max_epochs=3),
        "odesteer": dict(sketch_dim=64),
        "hpr": dict(mlp_hidden=16, epochs=50),
        "truthflow": dict(mlp_hidden=32, train_steps=200),
    }
    return {
        name: fit(pos, neg, layer=5, model_id="toy-model", behavior="sycophancy", **options.get(name, {}))
        for name, fit in METHODS.items()
    }


def test_methods_share_one_interface(data, fitted):
    pos, neg = data
    assert set(fitted) == {"caa", "pca", "probe", "linear_act", "mimic", "odesteer", "hpr", "truthflow", "innsteer"}
    assert set(METHOD_STEERERS) == set(METHODS)
    for name, steerer in fitted.items():
        assert type(steerer) is METHOD_STEERERS[name], name  # the table: method -> class (-> file kind)
        assert (steerer.layer, steerer.model_id, steerer.behavior, steerer.method, steerer.hidden_size) == (
            5,
            "toy-model",
            "sycophancy",
            name,
            D,
        )
        with torch.no_grad():
            assert torch.equal(steerer(neg, 0.0), neg), name
            out = steerer(neg, 1.0)
            assert out.shape == neg.shape and out.dtype == neg.dtype and not torch.equal(out, neg), name
            # default alpha, and the fused residual add
            torch.testing.assert_close(steerer(neg), out)
            torch.testing.assert_close(
                steerer(neg - 1.0, 1.0, residual=torch.ones_like(neg)), out, atol=1e-4, rtol=1e-4
            )


def test_methods_move_the_class_means_comparably(data, fitted):
    # alpha = 1: caa / linear_act / mimic move the negatives' mean onto the positives' mean; pca / probe
    # move every row by CAA's step length, towards the positives; the others move it towards them
    pos, neg = data
    mean_diff = (pos.mean(0) - neg.mean(0)).double()
    with torch.no_grad():
        shift = {name: (s(neg, 1.0).mean(0) - neg.mean(0)).double() for name, s in fitted.items()}
        for name in ("pca", "probe"):
            steps = (fitted[name](neg, 1.0) - neg).double().norm(dim=-1)
            torch.testing.assert_close(steps, torch.full_like(steps, float(mean_diff.norm())), atol=1e-3, rtol=1e-3)
    for name in ("caa", "linear_act", "mimic"):
        torch.testing.assert_close(shift[name], mean_diff, atol=1e-3, rtol=1e-3)
    for name in ("pca", "probe", "odesteer", "hpr", "truthflow", "innsteer"):
        assert float(shift[name] @ mean_diff) > 0, name


@pytest.mark.parametrize("name", ["caa", "pca", "probe", "linear_act", "innsteer"])
def test_save_load_round_trip(tmp_path, data, fitted, name):
    steerer = fitted[name]
    path = tmp_path / f"{name}.safetensors"
    steerer.save(path)
    loaded = load_steerer(path, expect_hidden_size=D, expect_model_id="toy-model")
    assert type(loaded) is type(steerer)
    assert (loaded.layer, loaded.alpha, loaded.model_id, loaded.behavior, loaded.method, loaded.extra) == (
        steerer.layer,
        steerer.alpha,
        steerer.model_id,
        steerer.behavior,
        steerer.method,
        steerer.extra,
    )
    with torch.no_grad():
        assert torch.equal(loaded(data[1], 1.3), steerer(data[1], 1.3))


def test_linear_steerers_in_low_precision_and_in_place():
    g = torch.Generator().manual_seed(0)
    vector, scale, shift = torch.randn(8, generator=g), torch.rand(8, generator=g) + 0.5, torch.randn(8, generator=g)
    h = torch.randn(3, 5, 8, generator=g)
    for steerer, reference in (
        (LinearSteerer(vector, 1), h + 0.7 * vector),
        (AffineSteerer(scale, shift, 1), h + 0.7 * (scale * h + shift - h)),
    ):
        out = steerer(h.bfloat16(), 0.7)
        assert out.dtype == torch.bfloat16
        torch.testing.assert_close(out.float(), reference, atol=0.05, rtol=0.02)
        target = h.clone()
        assert steerer.steer_(target, 0.7) is target
        torch.testing.assert_close(target, reference)


def test_linear_steerer_rejects_bad_inputs():
    steerer = LinearSteerer(torch.ones(8), 1, model_id="m")
    with pytest.raises(ValueError, match="hidden size 8"):
        steerer(torch.zeros(2, 9))
    with pytest.raises(ValueError, match="alpha must be finite"):
        steerer(torch.zeros(2, 8), float("inf"))
    with pytest.raises(ValueError, match="1-D tensors of one hidden size"):
        AffineSteerer(torch.ones(8), torch.ones(7), 1)
    with pytest.raises(ValueError, match="finite"):
        LinearSteerer(torch.tensor([1.0, float("nan")]), 1)


@pytest.mark.parametrize("fit", [fit_caa, fit_pca, fit_probe, fit_linear_act])
def test_baselines_reject_bad_inputs(fit):
    with pytest.raises(ValueError, match="one shape"):
        fit(torch.randn(5, 4), torch.randn(5, 3), layer=0)
    with pytest.raises(ValueError, match="at least 2 contrastive pairs"):
        fit(torch.randn(1, 4), torch.randn(1, 4), layer=0)
    bad = torch.randn(5, 4)
    bad[2, 1] = float("inf")
    with pytest.raises(ValueError, match="pos has NaN or Inf"):
        fit(bad, torch.randn(5, 4), layer=0)


def test_unknown_innsteer_option(data):
    with pytest.raises(TypeError, match="unknown innsteer training option.*'hiden'"):
        METHODS["innsteer"](*data, layer=0, hiden=3)


# ---- steer files that must be refused with a clear SteerFileError ----


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "caa.safetensors"
    LinearSteerer(torch.arange(8.0), 4, model_id="org/model-a", behavior="b", method="caa").save(path)
    return path


def rewrite(path, tensors=None, **meta_changes):
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
    meta.update(meta_changes)
    save_file(tensors if tensors is not None else load_file(str(path)), str(path), metadata=meta)


def test_truncated_file(saved):
    data = saved.read_bytes()
    saved.write_bytes(data[: len(data) // 2])
    with pytest.raises(SteerFileError, match="not a readable safetensors steer file"):
        load_steerer(saved)


def test_garbage_file(saved):
    saved.write_bytes(b"\x00" * 64)
    with pytest.raises(SteerFileError, match="not a readable safetensors steer file"):
        load_steerer(saved)


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="no steer file"):
        load_steerer(tmp_path / "nope.safetensors")


def test_wrong_version(saved):
    rewrite(saved, **{"innsteer.format_version": "99"})
    with pytest.raises(SteerFileError, match="format version '99'"):
        load_steerer(saved)


def test_wrong_hidden_size(saved):
    with pytest.raises(SteerFileError, match="trained for hidden size 8 .org/model-a., but this model has 576"):
        load_steerer(saved, expect_hidden_size=576)


def test_wrong_model(saved):
    with pytest.raises(SteerFileError, match="trained for model 'org/model-a', not 'org/model-b'"):
        load_steerer(saved, expect_model_id="org/model-b")


def test_unknown_kind(saved):
    rewrite(saved, **{"innsteer.kind": "quantum"})
    with pytest.raises(SteerFileError, match="unknown steerer kind 'quantum'"):
        load_steerer(saved)


def test_kind_mismatch_between_classes(tmp_path, saved):
    with pytest.raises(SteerFileError, match="holds a 'linear' steerer, not a 'affine' one"):
        AffineSteerer.load(saved)
    with pytest.raises(SteerFileError, match="holds a 'linear' steerer, not an INN steerer"):
        INNSteerer.load(saved)


def test_tensor_does_not_match_metadata(saved):
    rewrite(saved, hidden_size="9")
    with pytest.raises(SteerFileError, match=r"'vector' has shape \(8,\).*expected \(9,\)"):
        load_steerer(saved)


def test_wrong_tensor_names(saved):
    rewrite(saved, tensors={"direction": torch.zeros(8)})
    with pytest.raises(
        SteerFileError, match=r"holds tensors \['vector'\]; missing \['vector'\], unexpected \['direction'\]"
    ):
        load_steerer(saved)


def test_unreadable_metadata(saved):
    rewrite(saved, layer="four")
    with pytest.raises(SteerFileError, match="unreadable steerer metadata"):
        load_steerer(saved)
    rewrite(saved, layer="4", extra="{not json")
    with pytest.raises(SteerFileError, match="unreadable steerer metadata"):
        load_steerer(saved)


def test_nan_tensor(saved):
    rewrite(saved, tensors={"vector": torch.full((8,), float("nan"))})
    with pytest.raises(SteerFileError, match="'vector' contains NaN or Inf"):
        load_steerer(saved)


def test_metadata_keys_match_steerer(saved):
    from safetensors import safe_open

    with safe_open(str(saved), framework="pt") as handle:
        meta = handle.metadata()
    assert meta["innsteer.kind"] == "linear" and meta["innsteer.format_version"] == "1"
    assert {k: meta[k] for k in ("model_id", "layer", "behavior", "hidden_size", "method", "alpha")} == {
        "model_id": "org/model-a",
        "layer": "4",
        "behavior": "b",
        "hidden_size": "8",
        "method": "caa",
        "alpha": "1.0",
    }
    assert json.loads(meta["extra"]) == {}
