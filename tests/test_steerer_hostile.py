"""Hostile steer files and settings for the INN steerer and its training: configs that claim more
than the file holds, malformed metadata, float64 and bfloat16-weight round trips, interrupted saves,
out-of-range clamps and training under no_grad."""

import json
import os
import stat
import subprocess
import sys
import textwrap

import pytest
import torch
from flows import random_inn
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import innsteer_ext
from innsteer import ConfigError, INNSteerer, SteerFileError
from innsteer.core.flow import INN, FlowConfig
from innsteer.core.train import TrainConfig, train_innsteer

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _steerer(**kwargs) -> INNSteerer:
    return INNSteerer(
        random_inn(16),
        torch.randn(16, generator=torch.Generator().manual_seed(1)),
        5,
        alpha=2.5,
        model_id="test/model",
        **kwargs,
    )


def _rewrite(path, tensors=None, **meta_changes) -> None:
    with safe_open(str(path), framework="pt") as handle:
        meta = dict(handle.metadata())
    meta.update(meta_changes)
    save_file(tensors if tensors is not None else load_file(str(path)), str(path), metadata=meta)


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "s.safetensors"
    _steerer().save(path)
    return path


class TestConfigAgainstTensors:
    @pytest.mark.parametrize("key,value", [("dim", 10**13), ("mlp_hidden", 10**12), ("num_couplings", 10**9)])
    def test_config_claiming_more_than_the_file_holds_is_refused_before_allocating(self, saved, key, value):
        config = {"dim": 16, "num_couplings": 4, "mlp_hidden": 32, "clamp": 2.0, "seed": 0, key: value}
        _rewrite(saved, inn_config=json.dumps(config))
        with pytest.raises(SteerFileError, match=str(value)):
            INNSteerer.load(saved)

    @pytest.mark.parametrize("dim,num_couplings", [(2, 1), (9, 3), (16, 4)])
    def test_state_shapes_are_those_of_the_inn(self, dim, num_couplings):
        inn = INN(dim, num_couplings=num_couplings, mlp_hidden=5)
        shapes = {name: tuple(t.shape) for name, t in inn.state_dict().items()}
        assert INN.state_shapes(dim, num_couplings, 5) == shapes

    @pytest.mark.parametrize("value", ["16", 16.0, True, None, [16]])
    def test_config_sizes_must_be_integers(self, saved, value):
        _rewrite(saved, inn_config=json.dumps({"dim": value, "num_couplings": 4, "mlp_hidden": 32}))
        with pytest.raises(SteerFileError, match="dim must be an integer"):
            INNSteerer.load(saved)

    def test_clamp_beyond_the_bound_in_a_file(self, saved):
        config = {"dim": 16, "num_couplings": 4, "mlp_hidden": 32, "clamp": 1e39, "seed": 0}
        _rewrite(saved, inn_config=json.dumps(config))
        with pytest.raises(SteerFileError, match="clamp must be in"):
            INNSteerer.load(saved)


class TestMetadata:
    @pytest.mark.parametrize(
        "extra", ["[1, 2]", '"text"', "3", "[" * 100_000 + "]" * 100_000], ids=["list", "string", "number", "nested"]
    )
    def test_extra_that_is_not_an_object(self, saved, extra):
        _rewrite(saved, extra=extra)
        with pytest.raises(SteerFileError, match="extra"):
            INNSteerer.load(saved)

    def test_deeply_nested_inn_config(self, saved):
        _rewrite(saved, inn_config='{"a": ' * 100_000 + "1" + "}" * 100_000)
        with pytest.raises(SteerFileError, match="INN config"):
            INNSteerer.load(saved)

    @pytest.mark.parametrize("alpha", ["nan", "inf", "-inf"])
    def test_non_finite_alpha(self, saved, alpha):
        _rewrite(saved, alpha=alpha)
        with pytest.raises(SteerFileError, match="alpha"):
            INNSteerer.load(saved)

    def test_unknown_weight_dtype(self, saved):
        _rewrite(saved, weight_dtype="float16")
        with pytest.raises(SteerFileError, match="weight_dtype"):
            INNSteerer.load(saved)


class TestRoundTrips:
    def test_float64_steerer(self, tmp_path):
        inn = random_inn(16).double()
        steerer = INNSteerer(inn, torch.randn(16, dtype=torch.float64), 3, alpha=0.7)
        steerer.save(tmp_path / "s.safetensors")
        loaded = INNSteerer.load(tmp_path / "s.safetensors")
        assert loaded.inn.dtype == torch.float64 and loaded.direction.dtype == torch.float64
        h = torch.randn(4, 16, dtype=torch.float64)
        assert torch.equal(loaded(h), steerer(h))

    def test_mixed_float_dtypes_are_refused(self, saved):
        tensors = load_file(str(saved))
        tensors["inn.w1.0"] = tensors["inn.w1.0"].double()
        _rewrite(saved, tensors)
        with pytest.raises(SteerFileError, match="'inn.w1.0'"):
            INNSteerer.load(saved)

    @pytest.mark.parametrize("weight_dtype", [None, torch.float32, torch.bfloat16])
    def test_weight_dtype(self, tmp_path, weight_dtype):
        steerer = _steerer(weight_dtype=weight_dtype)
        steerer.save(tmp_path / "s.safetensors")
        loaded = INNSteerer.load(tmp_path / "s.safetensors")
        assert loaded.weight_dtype == weight_dtype
        h = torch.randn(4, 16)
        assert torch.equal(loaded(h, 1.0), steerer(h, 1.0))


class TestSave:
    """A save writes a sibling `.<name>.partial` file, fsyncs it and renames it over the target; the
    tests break it at the fsync, after the bytes are written and before the rename."""

    def test_failed_write_keeps_the_old_file(self, saved, monkeypatch):
        before = saved.read_bytes()

        def disk_full(fd):
            raise OSError("disk full")

        monkeypatch.setattr(os, "fsync", disk_full)
        with pytest.raises(OSError, match="disk full"):
            _steerer(extra={"new": 1}).save(saved)
        assert saved.read_bytes() == before
        assert os.listdir(saved.parent) == [saved.name]  # no partial file left behind

    def test_kill_mid_write_keeps_the_old_file_and_the_next_save_cleans_up(self, saved):
        before = saved.read_bytes()
        script = textwrap.dedent(f"""
            import os, signal, sys
            sys.path[:0] = [{os.path.join(ROOT, "python")!r}, {ROOT!r}, {os.path.join(ROOT, "tests")!r}]
            from test_steerer_hostile import _steerer

            os.fsync = lambda fd: os.kill(os.getpid(), signal.SIGKILL)
            _steerer().save({str(saved)!r})
        """)
        result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
        assert result.returncode == -9, result.stderr
        assert saved.read_bytes() == before
        assert len(os.listdir(saved.parent)) == 2  # the file and one orphan
        _steerer(extra={"new": 1}).save(saved)
        assert os.listdir(saved.parent) == [saved.name]
        assert INNSteerer.load(saved).extra == {"new": 1}

    @pytest.mark.parametrize("umask", [0o022, 0o077])
    def test_saved_file_gets_the_usual_permissions(self, tmp_path, umask):
        previous = os.umask(umask)
        try:
            _steerer().save(tmp_path / "s.safetensors")
        finally:
            os.umask(previous)
        assert stat.S_IMODE(os.stat(tmp_path / "s.safetensors").st_mode) == 0o666 & ~umask


class TestClampBound:
    @pytest.mark.parametrize("clamp", [1e39, 3e38, innsteer_ext.MAX_CLAMP * 2, 1e-9])
    def test_inn_refuses_a_clamp_outside_the_bounds(self, clamp):
        with pytest.raises(ConfigError, match="clamp must be in"):
            INN(8, clamp=clamp)

    def test_training_with_a_huge_clamp_fails_in_config_validation(self):
        pos, neg = torch.randn(40, 8), torch.randn(40, 8)
        with pytest.raises(ConfigError, match="clamp must be in"):
            train_innsteer(pos, neg, layer=0, config=TrainConfig(flow=FlowConfig(clamp=1e39)), progress=False)

    def test_the_bound_is_the_kernels(self):
        INN(8, clamp=innsteer_ext.MAX_CLAMP)
        INN(8, clamp=innsteer_ext.MIN_CLAMP)


def _train_small(pos, neg):
    config = TrainConfig(flow=FlowConfig(mlp_hidden=16), max_epochs=3, batch_size=16, num_threads=1)
    return train_innsteer(pos, neg, layer=0, config=config, progress=False)


@pytest.mark.parametrize("context", ["no_grad", "set_grad_enabled", "inference_mode"])
def test_training_under_a_disabled_grad_mode_still_trains(context):
    generator = torch.Generator().manual_seed(0)
    neg = torch.randn(64, 8, generator=generator)
    pos = neg + torch.tanh(neg[:, :1]) + 1.0
    expected = _train_small(pos, neg)
    managers = {
        "no_grad": torch.no_grad,
        "set_grad_enabled": lambda: torch.set_grad_enabled(False),
        "inference_mode": torch.inference_mode,
    }
    with managers[context]():
        if context == "inference_mode":
            pos, neg = pos.clone(), neg.clone()  # inference tensors
        result = _train_small(pos, neg)
    assert result.history["train_loss"] == expected.history["train_loss"]
    assert torch.equal(result.steerer.direction, expected.steerer.direction)
