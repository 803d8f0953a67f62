"""MiMiC, ODESteer, HPR and the TruthFlow-style flow correction, against independent computations
of what each must do; their files, their call semantics, and their refusal as control vectors."""

import json
import math
import re

import numpy as np
import pytest
import torch
from test_train import one_thread, synthetic_pairs  # noqa: F401  (autouse fixture applies here too)

from innsteer import ConfigError, SteerFileError, load_steerer
from innsteer.core.methods import METHOD_STEERERS, METHODS, fit_linear_act
from innsteer.core.methods_nonadditive import fit_hpr, fit_mimic, fit_odesteer, fit_truthflow
from innsteer.core.steerers import (
    HouseholderSteerer,
    ODESteerer,
)
from innsteer.llama.export import export, export_control_vector

D = 12
NEW_METHODS = ("mimic", "odesteer", "hpr", "truthflow")
# small settings so every fit takes well under a second
FAST = {
    "odesteer": dict(sketch_dim=64),
    "hpr": dict(mlp_hidden=16, epochs=100),
    "truthflow": dict(mlp_hidden=32, train_steps=300, rank=3),
}


@pytest.fixture(scope="module")
def data():
    return synthetic_pairs(n=160, d=D, huge_rows=0)


@pytest.fixture(scope="module")
def fitted(data):
    pos, neg = data
    return {
        name: METHODS[name](pos, neg, layer=4, model_id="toy-model", behavior="sycophancy", **FAST.get(name, {}))
        for name in NEW_METHODS
    }


def gaussian_classes(n, d, seed):
    """Two Gaussian classes with different means and full covariances (float64 holding float32
    values: the fits work on float32 copies, as check_contrastive makes them)."""
    g = torch.Generator().manual_seed(seed)
    mix_neg, mix_pos = torch.randn(d, d, generator=g), torch.randn(d, d, generator=g)
    neg = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix_neg.double() + 1.0
    pos = torch.randn(n, d, generator=g, dtype=torch.float64) @ mix_pos.double() - 2.0
    return pos.float().double(), neg.float().double()


def sqrtm_psd(matrix):
    values, vectors = np.linalg.eigh(matrix)
    return (vectors * np.sqrt(np.clip(values, 0, None))) @ vectors.T


# ---- MiMiC ----


def test_mimic_maps_the_negative_mean_and_covariance_onto_the_positive():
    pos, neg = gaussian_classes(4000, 6, seed=1)
    steerer = fit_mimic(pos, neg, layer=1, shrinkage=0.0, eps=0.0)
    moved = steerer(neg, 1.0)  # float64 rows stay float64
    assert moved.dtype == torch.float64
    np.testing.assert_allclose(moved.mean(0).numpy(), pos.mean(0).numpy(), atol=1e-4)
    np.testing.assert_allclose(np.cov(moved.numpy().T), np.cov(pos.numpy().T), rtol=1e-4, atol=1e-4)
    # the optimal map's linear part is the symmetric positive definite A with A S- A = S+, which
    # the other closed form T^1/2 (T^1/2 S T^1/2)^-1/2 T^1/2 also gives
    s, t = np.cov(neg.numpy().T), np.cov(pos.numpy().T)
    root_t = sqrtm_psd(t)
    reference = root_t @ np.linalg.inv(sqrtm_psd(root_t @ s @ root_t)) @ root_t
    np.testing.assert_allclose(steerer.matrix.double().numpy(), reference, rtol=1e-4, atol=1e-5)
    # alpha interpolates toward the map
    torch.testing.assert_close(steerer(neg, 0.25), neg + 0.25 * (moved - neg))


def schafer_strimmer_loops(x):
    """lambda* of Schafer & Strimmer (2005), target D, written out term by term."""
    n, d = x.shape
    z = (x - x.mean(0)) / x.std(0, ddof=1)
    numerator = denominator = 0.0
    for i in range(d):
        for j in range(d):
            if i == j:
                continue
            w = z[:, i] * z[:, j]
            r = n / (n - 1) * w.mean()
            numerator += n / (n - 1) ** 3 * ((w - w.mean()) ** 2).sum()
            denominator += r**2
    return min(1.0, max(0.0, numerator / denominator))


def test_mimic_default_shrinkage_transports_the_shrunk_gaussians():
    pos, neg = gaussian_classes(30, 5, seed=2)
    steerer = fit_mimic(pos, neg, layer=1)
    lam_neg, lam_pos = schafer_strimmer_loops(neg.numpy()), schafer_strimmer_loops(pos.numpy())
    assert steerer.extra["shrinkage_neg"] == pytest.approx(lam_neg, rel=1e-9)
    assert steerer.extra["shrinkage_pos"] == pytest.approx(lam_pos, rel=1e-9)

    def shrunk(x, lam):
        s = np.cov(x.T)
        return (1 - lam) * s + lam * np.diag(np.diag(s))

    s, t = shrunk(neg.numpy(), lam_neg), shrunk(pos.numpy(), lam_pos)
    ridge = 1e-3 * np.median(np.concatenate([np.diag(s), np.diag(t)]))
    assert steerer.extra["ridge"] == pytest.approx(ridge, rel=1e-9)
    s, t = s + ridge * np.eye(5), t + ridge * np.eye(5)
    a = steerer.matrix.double().numpy()
    np.testing.assert_allclose(a, a.T, atol=1e-6)
    assert np.linalg.eigvalsh(a).min() > 0
    np.testing.assert_allclose(a @ s @ a, t, rtol=1e-4, atol=1e-4 * np.abs(t).max())
    # the mean lands exactly
    np.testing.assert_allclose(steerer(neg, 1.0).mean(0).numpy(), pos.mean(0).numpy(), atol=1e-4)


def test_mimic_with_diagonal_covariances_is_linear_act():
    pos, neg = gaussian_classes(500, 4, seed=3)
    pos, neg = pos.float(), neg.float()
    mimic = fit_mimic(pos, neg, layer=0, shrinkage=1.0, eps=0.0)
    linear_act = fit_linear_act(pos, neg, layer=0)
    torch.testing.assert_close(mimic.matrix, torch.diag(linear_act.scale), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mimic.shift, linear_act.shift, atol=1e-4, rtol=1e-5)


def test_mimic_refuses_a_singular_covariance_without_regularization():
    pos, neg = gaussian_classes(5, 8, seed=4)
    with pytest.raises(ConfigError, match="covariance is singular"):
        fit_mimic(pos, neg, layer=0, shrinkage=0.0, eps=0.0)
    with pytest.raises(ConfigError, match="shrinkage must lie in"):
        fit_mimic(pos, neg, layer=0, shrinkage=1.5)
    # the default (shrinkage toward the diagonal) handles fewer rows than dimensions
    assert torch.isfinite(fit_mimic(pos, neg, layer=0).matrix).all()


# ---- ODESteer ----


def reference_logit(steerer, h):
    """The ODESteer classifier written out: dense count-sketch matrices, then an explicit circular
    convolution of the sketches (no FFT), then the logistic weight."""
    config = steerer.config
    dim = config["sketch_dim"]
    x = (h - steerer.center.double()) / config["input_scale"]
    x = torch.cat([x, torch.full((len(h), 1), math.sqrt(config["offset"]), dtype=h.dtype)], dim=-1)
    features = None
    for buckets, signs in zip(steerer.buckets, steerer.signs.double()):
        matrix = torch.zeros(x.shape[1], dim, dtype=h.dtype)
        matrix[torch.arange(x.shape[1]), buckets] = signs
        sketch = x @ matrix
        if features is None:
            features = sketch
        else:  # (f * s)[m] = sum_a f[a] s[(m - a) mod dim]
            shifts = (torch.arange(dim)[:, None] - torch.arange(dim)[None, :]) % dim  # [m, a]
            features = (features[:, None, :] * sketch[:, shifts]).sum(-1)
    return features @ steerer.weight.double() + config["bias"]


def reference_gradient(steerer, h):
    h = h.detach().clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(reference_logit(steerer, h).sum(), h)
    return grad


@pytest.mark.parametrize("degree", [1, 2, 3])
def test_odesteer_step_follows_the_classifier_gradient(data, degree):
    pos, neg = data
    steerer = fit_odesteer(pos, neg, layer=2, degree=degree, sketch_dim=32, n_steps=1)
    h = neg[:20].double()
    torch.testing.assert_close(steerer.logit(h), reference_logit(steerer, h).detach(), rtol=1e-6, atol=1e-6)
    grad = reference_gradient(steerer, h)
    torch.testing.assert_close(steerer.gradient(h), grad, rtol=1e-6, atol=1e-9)
    length = steerer.config["step_length"]
    assert length == pytest.approx(float((pos.double().mean(0) - neg.double().mean(0)).norm()), rel=1e-6)
    for alpha in (1.0, -0.5):
        expected = h + alpha * length * grad / grad.norm(dim=-1, keepdim=True)
        torch.testing.assert_close(steerer(h, alpha), expected, rtol=1e-6, atol=1e-6)
    # float32 rows: the same step in float32 math
    torch.testing.assert_close(
        steerer(h.float(), 1.0), (h + length * grad / grad.norm(dim=-1, keepdim=True)).float(), rtol=1e-4, atol=1e-4
    )


def test_odesteer_integrates_by_euler_steps(data):
    pos, neg = data
    steerer = fit_odesteer(pos, neg, layer=2, sketch_dim=32, n_steps=4)
    h = expected = neg[:10].double()
    step = 1.5 * steerer.config["step_length"] / 4
    for _ in range(4):
        grad = reference_gradient(steerer, expected)
        expected = expected + step * grad / grad.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(steerer(h, 1.5), expected, rtol=1e-6, atol=1e-6)
    # every step climbs the logit
    assert (steerer.logit(steerer(h, 1.5)) > steerer.logit(h)).all()


def test_odesteer_kernel_separates_what_no_hyperplane_can():
    # the classes differ by the sign of x0 * x1 only: a linear probe is at chance, a degree-2 kernel is not
    g = torch.Generator().manual_seed(5)
    x = torch.randn(800, 6, generator=g)
    positive = x[:, 0] * x[:, 1] > 0
    pos, neg = x[positive][:300], x[~positive][:300]
    quadratic = fit_odesteer(pos, neg, layer=0, degree=2, sketch_dim=256)
    linear = fit_odesteer(pos, neg, layer=0, degree=1, sketch_dim=256)
    assert quadratic.extra["train_accuracy"] > 0.9 > 0.7 > linear.extra["train_accuracy"]
    # steering the negatives along a path of length 2 moves them across: most now have x0 * x1 > 0
    moved = quadratic(neg, 2.0 / quadratic.config["step_length"])
    assert float((moved[:, 0] * moved[:, 1] > 0).float().mean()) > 0.8


# ---- HPR ----


def reference_angle(steerer, h):
    config = steerer.config
    x = (h - steerer.center.double()) / config["input_scale"]
    hidden = torch.tanh(x @ steerer.w1.double().T + steerer.b1.double())
    return math.pi * torch.sigmoid(hidden @ steerer.w2.double() + config["out_bias"])


def test_hpr_preserves_norms_and_rotates_only_the_negatives_toward_the_probe(data, fitted):
    steerer = fitted["hpr"]
    pos, neg = data
    h = torch.cat([pos[:40], neg[:40]]).double()
    normal = steerer.probe_weight.double()
    marked_negative = h @ normal + steerer.config["probe_bias"] < 0
    assert 0 < int(marked_negative.sum()) < len(h)
    angle = reference_angle(steerer, h)
    for alpha in (0.5, 1.0, 2.0):
        out = steerer(h, alpha)
        torch.testing.assert_close(out.norm(dim=-1), h.norm(dim=-1), rtol=1e-12, atol=0)
        assert torch.equal(out[~marked_negative], h[~marked_negative])
        rotated, start = out[marked_negative], h[marked_negative]
        # the rotation stays in the plane of h and the probe's normal, by the predicted angle
        plane = torch.stack([start, normal.expand_as(start)], dim=1)  # [n, 2, d]
        coefficients = torch.linalg.lstsq(plane.transpose(1, 2), rotated.unsqueeze(-1)).solution
        in_plane = (plane.transpose(1, 2) @ coefficients).squeeze(-1)
        torch.testing.assert_close(in_plane, rotated, rtol=1e-9, atol=1e-9)
        cosine = (rotated * start).sum(-1) / (start.norm(dim=-1) * rotated.norm(dim=-1))
        expected = (alpha * angle[marked_negative]).clamp(max=math.pi)
        torch.testing.assert_close(torch.acos(cosine.clamp(-1, 1)), expected, rtol=1e-6, atol=1e-6)
        # toward the probe's positive side (while the angle stays below the angle to the normal)
        before = torch.acos((start @ normal) / (start.norm(dim=-1) * normal.norm()))
        small = expected < before
        assert ((rotated @ normal)[small] > (start @ normal)[small]).all()
    # a huge alpha clamps at a half turn: h -> -h
    torch.testing.assert_close(steerer(h, 1e3)[marked_negative], -h[marked_negative], rtol=1e-9, atol=1e-9)


def test_hpr_keeps_the_norm_of_activations_almost_along_the_normal():
    # float32 rows 1e-2 .. 1e-4 rad from -v; the zero network predicts pi * sigmoid(0) = pi / 2, alpha 0.5 halves it
    g = torch.Generator().manual_seed(10)
    d = 16
    v = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    zeros = {"center": torch.zeros(d), "w1": torch.zeros(4, d), "b1": torch.zeros(4), "w2": torch.zeros(4)}
    config = {"probe_bias": 0.0, "input_scale": 1.0, "out_bias": 0.0, "mlp_hidden": 4}
    steerer = HouseholderSteerer({"probe_weight": 3 * v, **zeros}, 0, config=config)
    other = torch.randn(100, d, generator=g)
    other = torch.nn.functional.normalize(other - (other @ v)[:, None] * v, dim=-1)
    for offset in (1e-2, 1e-3, 1e-4):
        h = 30 * (-math.cos(offset) * v + math.sin(offset) * other)
        out = steerer(h, 0.5)
        torch.testing.assert_close(out.norm(dim=-1), h.norm(dim=-1), rtol=1e-6, atol=0)
        cosine = torch.nn.functional.cosine_similarity(out, h, dim=-1)
        torch.testing.assert_close(cosine, torch.full_like(cosine, math.cos(math.pi / 4)), rtol=0, atol=1e-5)


def test_hpr_learns_the_pair_angle():
    # positives are their negatives rotated by 0.4 rad toward a fixed direction v
    g = torch.Generator().manual_seed(6)
    d, angle = 10, 0.4
    v = torch.nn.functional.normalize(torch.randn(d, generator=g), dim=0)
    neg = torch.randn(300, d, generator=g) - 3 * v
    unit = torch.nn.functional.normalize(neg, dim=-1)
    toward = torch.nn.functional.normalize(v - (unit @ v)[:, None] * unit, dim=-1)
    pos = neg.norm(dim=-1, keepdim=True) * (math.cos(angle) * unit + math.sin(angle) * toward)
    steerer = fit_hpr(pos, neg, layer=0, mlp_hidden=16, epochs=200)
    assert steerer.extra["mean_pair_angle"] == pytest.approx(angle, abs=1e-5)
    error = (steerer.angle(neg) - angle).abs()
    assert float(error.mean()) < 0.01 and float(error.max()) < 0.05
    marked = steerer.probe_logit(neg) < 0
    assert float(marked.float().mean()) > 0.5
    moved = steerer(neg, 1.0)[marked]
    cosine = torch.nn.functional.cosine_similarity(moved, pos[marked], dim=-1)
    assert float(cosine.min()) > 0.99


# ---- TruthFlow ----


def test_truthflow_output_lies_in_the_top_singular_span_of_the_differences(data, fitted):
    steerer = fitted["truthflow"]
    pos, neg = data
    diffs = (pos - neg).double()
    top = torch.linalg.eigh(diffs.T @ diffs).eigenvectors[:, -3:]  # eigh, not the fit's SVD
    g = torch.Generator().manual_seed(7)
    h = torch.cat([neg[:20], pos[:20], 5 * torch.randn(20, D, generator=g)]).double()
    change = steerer(h, 1.0) - h
    outside = change - change @ top @ top.T
    assert float(outside.norm(dim=-1).max()) < 1e-6 * float(change.norm(dim=-1).max())
    assert float(change.norm(dim=-1).min()) > 0
    torch.testing.assert_close(steerer(h, -2.0) - h, -2 * change, rtol=1e-9, atol=1e-9)


def test_truthflow_learns_input_dependent_corrections():
    # each pair's difference is u times a scale set by the activation's first coordinate
    g = torch.Generator().manual_seed(8)
    d = 8
    neg = torch.randn(400, d, generator=g)
    u = torch.zeros(d)
    u[3] = 2.0
    scale = 1 + torch.tanh(2 * neg[:, 0])
    pos = neg + scale[:, None] * u
    steerer = fit_truthflow(pos, neg, layer=0, rank=2, mlp_hidden=32, train_steps=800)
    test = torch.randn(200, d, generator=g)
    predicted = (steerer(test, 1.0) - test) @ u / (u @ u)
    expected = 1 + torch.tanh(2 * test[:, 0])
    constant_error = float((expected - expected.mean()).pow(2).mean())
    assert float((predicted - expected).pow(2).mean()) < 0.2 * constant_error


# ---- shared semantics, files, export ----


def test_methods_table_and_interface(data, fitted):
    pos, neg = data
    assert set(NEW_METHODS) <= set(METHODS)
    for name, steerer in fitted.items():
        assert type(steerer) is METHOD_STEERERS[name]
        assert (steerer.layer, steerer.model_id, steerer.behavior, steerer.method, steerer.hidden_size) == (
            4,
            "toy-model",
            "sycophancy",
            name,
            D,
        )
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            h = neg.to(dtype).reshape(8, 20, D)
            assert torch.equal(steerer(h, 0.0), h), name  # bit for bit
            out = steerer(h, 1.0)
            assert out.shape == h.shape and out.dtype == dtype and not torch.equal(out, h), name
        # float64 rows are steered in float64: close to the float32 result, not rounded to it
        h64 = neg.double()
        assert not torch.equal(steerer(h64, 1.0), steerer(h64.float(), 1.0).double()), name
        torch.testing.assert_close(steerer(h64, 1.0), steerer(h64.float(), 1.0).double(), rtol=1e-4, atol=1e-4)
        # the default alpha, the fused residual, in place, and no rows at all
        torch.testing.assert_close(steerer(neg), steerer(neg, 1.0))
        torch.testing.assert_close(
            steerer(neg - 1.0, 1.0, residual=torch.ones_like(neg)), steerer(neg, 1.0), rtol=1e-5, atol=1e-4
        )
        target = neg.clone()
        assert steerer.steer_(target, 0.7) is target
        torch.testing.assert_close(target, steerer(neg, 0.7))
        assert steerer(neg[:0], 1.0).shape == (0, D)
        with pytest.raises(ConfigError, match="hidden size 12"):
            steerer(torch.zeros(2, D + 1))
        with pytest.raises(ConfigError, match="alpha must be finite"):
            steerer(neg, float("nan"))


@pytest.mark.parametrize("name", NEW_METHODS)
def test_fits_reject_bad_inputs(name):
    with pytest.raises(ValueError, match="one shape"):
        METHODS[name](torch.randn(5, 4), torch.randn(5, 3), layer=0)
    bad = torch.randn(6, 4)
    bad[2, 1] = float("nan")
    with pytest.raises(ValueError, match="neg has NaN or Inf"):
        METHODS[name](torch.randn(6, 4), bad, layer=0)
    same = torch.ones(6, 4)
    with pytest.raises(ConfigError, match="do not vary|covariance is singular"):
        METHODS[name](same, same, layer=0)


@pytest.mark.parametrize("name", NEW_METHODS)
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
    assert loaded.config == steerer.config
    h = data[1]
    assert torch.equal(loaded(h, 1.3), steerer(h, 1.3))
    assert type(steerer).load(path).method == name
    other = HouseholderSteerer if name != "hpr" else ODESteerer
    with pytest.raises(SteerFileError, match=re.escape(f"holds a '{steerer.KIND}' steerer, not {other.DESCRIPTION}")):
        other.load(path)


def rewrite(path, out, tensors=None, **meta_changes):
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
    meta.update(meta_changes)
    save_file(load_file(path) if tensors is None else tensors, out, metadata=meta)
    return out


def test_corrupted_files_are_refused(tmp_path, fitted):
    from safetensors.torch import load_file

    path = tmp_path / "ode.safetensors"
    fitted["odesteer"].save(path)
    tensors = load_file(path)
    bad_buckets = dict(tensors, buckets=tensors["buckets"].clone().fill_(64))  # sketch_dim is 64
    with pytest.raises(SteerFileError, match=r"buckets must lie in \[0, sketch_dim"):
        load_steerer(rewrite(path, tmp_path / "a.safetensors", bad_buckets))
    with pytest.raises(SteerFileError, match="signs must be"):
        load_steerer(rewrite(path, tmp_path / "b.safetensors", dict(tensors, signs=tensors["signs"] * 2)))
    config = fitted["odesteer"].config
    with pytest.raises(SteerFileError, match="tensor 'weight' has shape"):
        load_steerer(rewrite(path, tmp_path / "c.safetensors", odesteer_config=json.dumps(config | {"sketch_dim": 65})))
    with pytest.raises(SteerFileError, match="needs the settings"):
        load_steerer(rewrite(path, tmp_path / "d.safetensors", odesteer_config='{"degree": 2}'))
    with pytest.raises(SteerFileError, match="unreadable 'odesteer' steerer metadata"):
        load_steerer(rewrite(path, tmp_path / "e.safetensors", odesteer_config="{"))
    with pytest.raises(SteerFileError, match="holds tensors"):
        load_steerer(rewrite(path, tmp_path / "f.safetensors", {k: v for k, v in tensors.items() if k != "signs"}))
    path = tmp_path / "flow.safetensors"
    fitted["truthflow"].save(path)
    tensors = load_file(path)
    with pytest.raises(SteerFileError, match="basis rows must be orthonormal"):
        load_steerer(rewrite(path, tmp_path / "g.safetensors", dict(tensors, basis=tensors["basis"] * 2)))
    with pytest.raises(SteerFileError, match="dtype|float32"):
        load_steerer(rewrite(path, tmp_path / "h.safetensors", dict(tensors, b1=tensors["b1"].double())))


@pytest.mark.parametrize("name", NEW_METHODS)
def test_control_vector_export_refuses_non_additive_kinds(tmp_path, fitted, name):
    steerer = fitted[name]
    out = tmp_path / "cv.gguf"
    with pytest.raises(ConfigError, match=f"a {name} steerer is not additive"):
        export_control_vector(steerer, out)
    saved = tmp_path / f"{name}.safetensors"
    steerer.save(saved)
    with pytest.raises(ConfigError, match=f"a {name} steerer is not additive"):
        export(saved, out, format="controlvector")
    with pytest.raises(ConfigError, match="is not an INN steerer"):
        export(saved, out, format="innsteer")
    assert not out.exists()


def test_hooks_steer_the_real_model(default_lm):
    from test_hooks import LAYER, _layer_outputs

    from innsteer.core.hooks import steering

    g = torch.Generator().manual_seed(9)
    hidden = default_lm.model.config.hidden_size
    neg = torch.randn(64, hidden, generator=g)
    pos = neg + torch.randn(hidden, generator=g) + 0.3 * torch.randn(64, hidden, generator=g)
    ids = default_lm.tokenizer(["Steering hooks take any steerer."], return_tensors="pt").input_ids
    before, _ = _layer_outputs(default_lm.model, ids)
    for name in NEW_METHODS:
        steerer = METHODS[name](pos, neg, layer=LAYER, **FAST.get(name, {}))
        with steering(default_lm.model, steerer, alpha=1.5):
            steered, _ = _layer_outputs(default_lm.model, ids)
        with torch.no_grad():
            torch.testing.assert_close(steered, steerer(before, 1.5), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(steered, before)
