"""innsteer.INN and innsteer.INNSteerer: construction, dtypes, training through the ops, files."""

import json
import os

import pytest
import torch
from flows import as_float64, random_inn, rel_err
from safetensors.torch import load_file, save_file

import innsteer
from innsteer import INNSteerer, SteerFileError
from innsteer_ext import reference


@pytest.mark.parametrize("dim", [2, 9, 576])
def test_every_coordinate_is_transformed_and_partitions_are_seeded(dim):
    inn = innsteer.INN(dim, num_couplings=4, mlp_hidden=8, seed=3)
    cond, trans = inn.partitions()
    transformed = torch.cat(trans).unique()
    assert torch.equal(transformed, torch.arange(dim))
    for c, t in zip(cond, trans):
        assert torch.equal(torch.cat([c, t]).sort().values, torch.arange(dim))
    again = innsteer.INN(dim, num_couplings=4, mlp_hidden=8, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(cond, again.partitions()[0]))


def test_fresh_inn_is_the_standardization():
    inn = innsteer.INN(12, mlp_hidden=16)
    data = torch.randn(100, 12) * 3 + 1
    inn.fit_standardization(data)
    z, logdet = inn(data[:5])
    torch.testing.assert_close(z, (data[:5] - inn.mean) / inn.scale)
    torch.testing.assert_close(logdet, (-inn.scale.log().sum()).expand(5))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64])
def test_dtype_in_equals_dtype_out(dtype):
    inn = random_inn(10)
    x = torch.randn(4, 10).to(dtype)
    z, logdet = inn(x)
    assert z.dtype == dtype and inn.inverse(z).dtype == dtype
    assert logdet.dtype == torch.float32
    expected, _ = reference.coupling_forward(x.double(), *as_float64(inn.flow_args()))
    assert rel_err(z, expected) < (1e-5 if dtype in (torch.float32, torch.float64) else 1e-2)


def test_double_inn_computes_in_float64():
    inn = random_inn(6).double()
    z, logdet = inn(torch.randn(3, 6))
    assert z.dtype == torch.float32 and logdet.dtype == torch.float64


def test_training_through_the_ops_matches_reference_gradients():
    inn = random_inn(8, mlp_hidden=16)
    x = torch.randn(32, 8)
    z, logdet = inn(x)
    loss = 0.5 * z.pow(2).sum(-1).mean() - logdet.mean()
    loss.backward()
    grads = [p.grad.clone() for p in inn.parameters()]
    params = [p.detach().clone().requires_grad_(True) for p in inn.parameters()]
    w1, b1, w2, b2 = params[0:4], params[4:8], params[8:12], params[12:16]
    cond, trans = inn.partitions()
    z_ref, logdet_ref = reference.coupling_forward(
        x, inn.mean, inn.scale, cond, trans, w1, b1, w2, b2, inn.config.clamp
    )
    (0.5 * z_ref.pow(2).sum(-1).mean() - logdet_ref.mean()).backward()
    for got, ref in zip(grads, params):
        torch.testing.assert_close(got, ref.grad, rtol=1e-4, atol=1e-6)


def test_inn_rejects_bad_input():
    inn = innsteer.INN(8, mlp_hidden=4)
    with pytest.raises(ValueError, match="hidden size 8"):
        inn(torch.randn(2, 9))
    with pytest.raises(TypeError, match="floating-point"):
        inn(torch.ones(2, 8, dtype=torch.long))
    with pytest.raises(ValueError, match="NaN or Inf"):
        inn.fit_standardization(torch.full((4, 8), float("nan")))
    with pytest.raises(ValueError, match="dim >= 2"):
        innsteer.INN(1)


def _steerer(dim=16, **meta):
    meta = {"model_id": "test/model", "behavior": "sycophancy", **meta}
    return INNSteerer(random_inn(dim), torch.randn(dim), layer=5, alpha=2.5, **meta)


def test_steerer_uses_the_op_and_alpha_zero_is_identity():
    steerer = _steerer()
    h = torch.randn(3, 16)
    assert torch.equal(steerer(h, 0.0), h)
    expected = reference.steer(h.double(), None, steerer.direction.double(), 2.5, *as_float64(steerer.inn.flow_args()))
    assert rel_err(steerer(h), expected) < 1e-5  # default alpha from the steerer
    in_place = h.clone()
    steerer.steer_(in_place, 1.0)
    assert torch.equal(in_place, steerer(h, 1.0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_displacement_scaling_lengthens_the_maps_step_at_unit_alpha(dtype):
    """scaling="displacement": h + |alpha| (phi^-1(phi(h) + sign(alpha) v) - h), against the float64
    reference op; the same map as "latent" at alpha = +-1 and 0; the fused residual and the in-place
    call agree with it."""
    steerer = _steerer()
    steerer.scaling = "displacement"
    latent = INNSteerer(steerer.inn, steerer.direction, layer=5)
    flow = as_float64(steerer.inn.flow_args())
    h = torch.randn(3, 16).to(dtype)
    hd, v = h.double(), steerer.direction.double()
    for alpha in (2.5, -4.0, 0.5):
        step = reference.steer(hd, None, v, 1.0 if alpha > 0 else -1.0, *flow) - hd
        expected = hd + abs(alpha) * step
        assert rel_err(steerer(h, alpha), expected) < (1e-5 if dtype == torch.float32 else 1e-2), alpha
        assert not torch.allclose(steerer(h, alpha).double(), reference.steer(hd, None, v, alpha, *flow), atol=1e-3)
        residual = torch.randn(3, 16).to(dtype)
        assert torch.equal(steerer(h, alpha, residual=residual), steerer(h + residual, alpha))
        in_place = h.clone()
        steerer.steer_(in_place, alpha, residual=residual)
        assert torch.equal(in_place, steerer(h + residual, alpha))
    assert torch.equal(steerer(h, 0.0), h)
    for alpha in (1.0, -1.0):  # up to h + (y - h)'s rounding
        assert rel_err(steerer(h, alpha), latent(h, alpha)) < (1e-6 if dtype == torch.float32 else 1e-2)
    with pytest.raises(ValueError, match="scaling must be one of latent, displacement"):
        INNSteerer(random_inn(16), torch.randn(16), layer=5, scaling="linear")


def test_steerer_float64_activations_with_float32_flow():
    steerer = _steerer()
    h = torch.randn(2, 16, dtype=torch.float64)
    out = steerer(h, 1.0)
    assert out.dtype == torch.float64
    assert rel_err(out, steerer(h.float(), 1.0)) < 1e-6


def test_save_load_round_trip(tmp_path):
    steerer = _steerer(extra={"note": "x"})
    path = tmp_path / "s.safetensors"
    steerer.save(path)
    loaded = INNSteerer.load(path)
    h = torch.randn(4, 16)
    assert torch.equal(loaded(h, 1.3), steerer(h, 1.3))
    assert (loaded.layer, loaded.alpha, loaded.model_id, loaded.behavior, loaded.hidden_size, loaded.extra) == (
        5,
        2.5,
        "test/model",
        "sycophancy",
        16,
        {"note": "x"},
    )
    assert loaded.inn.config == steerer.inn.config
    assert loaded.scaling == "latent" and "scaling" not in steerer.metadata()  # as files written before it
    steerer.scaling = "displacement"
    steerer.save(path)
    loaded = INNSteerer.load(path)
    assert loaded.scaling == "displacement" and torch.equal(loaded(h, -3.0), steerer(h, -3.0))


def test_steerer_rejects_wrong_hidden_size():
    with pytest.raises(ValueError, match="trained for hidden size 16"):
        _steerer()(torch.randn(2, 17))


class TestBadFiles:
    @pytest.fixture
    def saved(self, tmp_path):
        path = tmp_path / "s.safetensors"
        _steerer().save(path)
        return path

    def _rewrite(self, path, tensors=None, **meta_changes):
        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as handle:
            meta = dict(handle.metadata())
        tensors = tensors if tensors is not None else load_file(str(path))
        meta.update(meta_changes)
        save_file(tensors, str(path), metadata={k: v for k, v in meta.items() if v is not None})

    def test_truncated(self, saved):
        data = saved.read_bytes()
        saved.write_bytes(data[: len(data) // 2])
        with pytest.raises(SteerFileError, match="not a readable safetensors steer file"):
            INNSteerer.load(saved)

    def test_garbage(self, saved):
        saved.write_bytes(os.urandom(300))
        with pytest.raises(SteerFileError):
            INNSteerer.load(saved)

    def test_missing_file(self, tmp_path):
        with pytest.raises(FileNotFoundError, match="no steer file"):
            INNSteerer.load(tmp_path / "nope.safetensors")

    def test_wrong_version(self, saved):
        self._rewrite(saved, **{"innsteer.format_version": "99"})
        with pytest.raises(SteerFileError, match="format version '99'"):
            INNSteerer.load(saved)

    def test_missing_tensor(self, saved):
        tensors = load_file(str(saved))
        del tensors["inn.w1.2"]
        self._rewrite(saved, tensors)
        with pytest.raises(SteerFileError, match=r"missing \['inn.w1.2'\]"):
            INNSteerer.load(saved)

    def test_unknown_scaling(self, saved):
        self._rewrite(saved, scaling="sideways")
        with pytest.raises(SteerFileError, match="scaling must be one of latent, displacement, got 'sideways'"):
            INNSteerer.load(saved)

    def test_wrong_shape(self, saved):
        tensors = load_file(str(saved))
        tensors["direction"] = torch.zeros(17)
        self._rewrite(saved, tensors)
        with pytest.raises(SteerFileError, match="'direction' has shape"):
            INNSteerer.load(saved)

    def test_config_disagrees_with_tensors(self, saved):
        self._rewrite(saved, inn_config=json.dumps({"dim": 16, "num_couplings": 4, "hidden": 7}))
        with pytest.raises(SteerFileError, match="has shape"):
            INNSteerer.load(saved)

    def test_non_finite_weights(self, saved):
        tensors = load_file(str(saved))
        tensors["inn.w2.0"][0, 0] = float("nan")
        self._rewrite(saved, tensors)
        with pytest.raises(SteerFileError, match="NaN or Inf"):
            INNSteerer.load(saved)

    def test_broken_partition(self, saved):
        tensors = load_file(str(saved))
        tensors["inn.cond_idx_1"][0] = tensors["inn.cond_idx_1"][1]
        self._rewrite(saved, tensors)
        with pytest.raises(SteerFileError, match="do not partition"):
            INNSteerer.load(saved)

    def test_other_model_or_hidden_size(self, saved):
        with pytest.raises(SteerFileError, match="hidden size 16"):
            INNSteerer.load(saved, expect_hidden_size=576)
        with pytest.raises(SteerFileError, match="trained for model 'test/model'"):
            INNSteerer.load(saved, expect_model_id="other/model")
        assert INNSteerer.load(saved, expect_hidden_size=16, expect_model_id="test/model").layer == 5


def test_the_old_name_of_the_inn_steerer_still_works_with_a_deprecation_warning():
    from innsteer.core import steerers

    with pytest.warns(DeprecationWarning, match="Steerer is now INNSteerer"):
        assert steerers.Steerer is INNSteerer
    with pytest.warns(DeprecationWarning, match="Steerer is now INNSteerer"):
        old = innsteer.__getattr__("Steerer")  # as `innsteer.Steerer` on first use
    assert old is innsteer.INNSteerer is INNSteerer
