"""The signed (two-map) INN steerer: each sign of alpha runs its own map, in PyTorch, in its steer
file, and in llama.cpp's hook (two entries, one per sign). The reference for every output is the
map of that sign run alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from flows import random_inn
from llama_helpers import random_inn_steerer
from safetensors.torch import load_file, save_file
from tiny_models import tiny_lm

from innsteer import INNSteerer
from innsteer.core.errors import SteerFileError
from innsteer.core.methods import fit_innsteer
from innsteer.core.steerers import SignedSteerer, load_steerer


def _signed(dim=16, layer=5) -> SignedSteerer:
    toward = INNSteerer(random_inn(dim, seed=1), torch.randn(dim), layer, alpha=3.0, model_id="m", behavior="b")
    away = INNSteerer(random_inn(dim, num_couplings=8, seed=2), torch.randn(dim), layer, alpha=3.0, model_id="m")
    toward.extra["history"], away.extra["history"] = [1.0], [2.0]
    return SignedSteerer(toward, away)


def test_each_sign_runs_its_own_map_bit_for_bit():
    signed = _signed()
    h = torch.randn(4, 16)
    for alpha in (0.5, 4.0):
        assert torch.equal(signed(h, alpha), signed.toward(h, alpha))
        assert torch.equal(signed(h, -alpha), signed.away(h, -alpha))
        assert not torch.allclose(signed(h, -alpha), signed.toward(h, -alpha))  # the maps differ
    assert torch.equal(signed(h, 0.0), h) and torch.equal(signed(h), signed.toward(h, 3.0))  # default alpha
    residual = torch.randn(4, 16)
    assert torch.equal(signed(h, -2.0, residual=residual), signed.away(h + residual, -2.0))
    in_place = h.clone()
    signed.steer_(in_place, -2.0)
    assert torch.equal(in_place, signed.away(h, -2.0))
    assert signed.layer == 5 and signed.hidden_size == 16 and signed.alpha == 3.0 and signed.method == "innsteer"


def test_a_signed_steer_file_round_trips(tmp_path):
    signed = _signed()
    signed.away.weight_dtype = torch.bfloat16  # each side keeps its own config, weight dtype and scaling
    signed.away.scaling = "displacement"
    signed.save(tmp_path / "s.safetensors")
    loaded = load_steerer(tmp_path / "s.safetensors", expect_hidden_size=16, expect_model_id="m")
    assert isinstance(loaded, SignedSteerer)
    assert loaded.away.inn.config.num_couplings == 8 and loaded.away.weight_dtype == torch.bfloat16
    assert loaded.toward.weight_dtype is None
    assert (loaded.toward.scaling, loaded.away.scaling) == ("latent", "displacement")
    assert loaded.toward.extra == {"history": [1.0]} and loaded.away.extra == {"history": [2.0]}
    h = torch.randn(3, 16)
    for alpha in (2.0, -2.0):
        assert torch.equal(loaded(h, alpha), signed(h, alpha))
    assert (loaded.layer, loaded.alpha, loaded.model_id, loaded.behavior) == (5, 3.0, "m", "b")


def test_a_damaged_signed_steer_file_gets_one_clear_error(tmp_path):
    path = tmp_path / "s.safetensors"
    _signed().save(path)
    tensors = load_file(path)
    from safetensors import safe_open

    with safe_open(path, framework="pt") as handle:
        meta = dict(handle.metadata())

    def damaged(name, tensors=tensors, meta=meta):
        out = tmp_path / f"{name}.safetensors"
        save_file(tensors, out, metadata=meta)
        return out

    stray = damaged("stray", {**tensors, "extra.w": torch.zeros(2)})
    without_away = damaged("no-away", {k: v for k, v in tensors.items() if not k.startswith("away.")})
    no_config = damaged("no-config", meta={k: v for k, v in meta.items() if k != "away.inn_config"})
    for bad, message in ((stray, "not \\['extra.w'\\]"), (without_away, "away map"), (no_config, "away.inn_config")):
        with pytest.raises(SteerFileError, match=message):
            load_steerer(bad)


def test_the_maps_must_share_layer_and_hidden_size():
    a = INNSteerer(random_inn(16), torch.randn(16), 5)
    with pytest.raises(ValueError, match="one layer and hidden size"):
        SignedSteerer(a, INNSteerer(random_inn(16), torch.randn(16), 6))
    with pytest.raises(ValueError, match="one layer and hidden size"):
        SignedSteerer(a, INNSteerer(random_inn(8), torch.randn(8), 5))


def test_fit_with_away_options_trains_each_side_as_its_options_alone():
    gen = torch.Generator().manual_seed(0)
    pos, neg = torch.randn(64, 8, generator=gen) + 1.0, torch.randn(64, 8, generator=gen)
    options = {"max_epochs": 2, "mlp_hidden": 16}
    signed = fit_innsteer(pos, neg, layer=3, seed=4, away={**options, "transport_sides": "both"}, **options)
    toward = fit_innsteer(pos, neg, layer=3, seed=4, **options)
    away = fit_innsteer(pos, neg, layer=3, seed=4, transport_sides="both", **options)
    h = torch.randn(5, 8, generator=gen)
    assert torch.equal(signed(h, 2.0), toward(h, 2.0)) and torch.equal(signed(h, -2.0), away(h, -2.0))
    assert not torch.equal(signed(h, -2.0), toward(h, -2.0))
    with pytest.raises(TypeError, match="not nested"):
        fit_innsteer(pos, neg, layer=3, away={"away": {}})


def test_hooks_steer_a_model_with_the_map_of_alphas_sign():
    lm = tiny_lm(layers=3)
    dim = lm.model.config.hidden_size
    signed = SignedSteerer(
        INNSteerer(random_inn(dim, seed=1), torch.randn(dim), 1),
        INNSteerer(random_inn(dim, seed=2), torch.randn(dim), 1),
    )
    ids = torch.tensor([[1, 2, 3, 4]])
    for alpha, side in ((2.0, signed.toward), (-2.0, signed.away)):
        with signed.apply(lm.model, alpha, positions="all"):
            got = lm.model(ids).logits
        with side.apply(lm.model, alpha, positions="all"):
            expected = lm.model(ids).logits
        assert torch.equal(got, expected)


# --- llama.cpp: two hook entries, one per sign ------------------------------------------------------


@pytest.fixture(scope="module")
def signed_file(tmp_path_factory):
    pytest.importorskip("llama_cpp")
    from innsteer.hf.models import default_gguf_path, model_id_for

    model_id = model_id_for(default_gguf_path())
    maps = [random_inn_steerer(layer=10, alpha=4.0, seed=s, weight_scale=0.1, model_id=model_id) for s in (0, 1)]
    path = tmp_path_factory.mktemp("signed") / "signed.safetensors"
    SignedSteerer(*maps).save(path)
    return path, model_id


@pytest.mark.llama
def test_llama_runs_the_map_of_alphas_sign(signed_file, tmp_path):
    from llama_helpers import last_logits

    from innsteer.hf.models import default_gguf_path
    from innsteer.llama.export import SIGNED_EXPORT, export_steer_gguf, for_llama
    from innsteer.llama.steering import SteeredLlama

    path, model_id = signed_file
    prepared = for_llama(str(path), model_id=model_id, workdir=str(tmp_path))
    assert prepared.kind == "innsteer" and prepared.away_path
    with pytest.raises(Exception, match="two maps"):
        export_steer_gguf(load_steerer(path), tmp_path / "one.gguf")
    assert "innsteer serve" in SIGNED_EXPORT

    tokens = [1, 504, 3458, 282, 4371, 314]
    signed = SteeredLlama(str(default_gguf_path()), n_ctx=64, n_threads=1, n_threads_batch=1)
    alone = SteeredLlama(str(default_gguf_path()), n_ctx=64, n_threads=1, n_threads_batch=1)
    try:
        entries = signed.steering.add_signed(prepared.path, prepared.away_path, expect_model_id=model_id)
        assert entries == (0, 1) and signed.steering.alphas == [4.0, 0.0]  # the file's alpha, toward
        toward, away = alone.steering.add(prepared.path), alone.steering.add(prepared.away_path)
        for alpha in (3.0, -3.0):
            signed.steering.set_alpha(alpha)
            alone.steering.set_alpha(0.0)
            alone.steering.set_alpha(alpha, toward if alpha > 0 else away)
            assert signed.steering.alphas == ([alpha, 0.0] if alpha > 0 else [0.0, alpha])
            np.testing.assert_array_equal(last_logits(signed, tokens), last_logits(alone, tokens))
        alone.steering.set_alpha(0.0)
        assert not np.array_equal(last_logits(signed, tokens), last_logits(alone, tokens))  # it does steer
    finally:
        signed.close()
        alone.close()


@pytest.mark.llama
def test_the_server_gives_a_signed_steer_one_entry_per_sign(signed_file, tmp_path):
    from innsteer.hf.models import default_gguf_path
    from innsteer.serve.slots import open_engine
    from innsteer.serve.steers import SteerCatalog, load_steer

    path, model_id = signed_file
    steer = load_steer("signed", str(path), model_id=model_id, workdir=str(tmp_path))
    assert steer.away_gguf is not None and steer.layers == (10,)
    engine, entries = open_engine(
        str(default_gguf_path()), SteerCatalog([steer]), model_id=model_id, n_seq=1, n_ctx=64, n_threads=1
    )
    try:
        assert entries == {"signed": [0, 1]} and engine.signs == [1, -1]
        steering = engine.sequence(0).steering
        for alpha, expected in ((2.5, {0: 2.5, 1: 0.0}), (-2.5, {0: 0.0, 1: -2.5})):
            steering.set(dict.fromkeys(entries["signed"], alpha))
            assert steering.alphas == expected
            np.testing.assert_array_equal(steering.row_alphas(2), list(expected.values()))
    finally:
        engine.close()
        engine.host.close()


@pytest.mark.llama
def test_generate_gguf_steers_with_the_map_of_alphas_sign_and_export_names_the_way(signed_file, tmp_path, capsys):
    from innsteer.cli.main import main

    path, _ = signed_file
    away = tmp_path / "away.safetensors"
    load_steerer(path).away.save(away)
    prompt = ["generate", "Name a fruit.", "--max-new-tokens", "6", "--gguf", "smollm2", "--alpha", "-3"]
    replies = []
    for steer in (path, away):
        assert main([*prompt, "--steer", str(steer)]) == 0
        replies.append([line for line in capsys.readouterr().out.splitlines() if line.startswith("[innsteer")])
    assert replies[0] == replies[1] and replies[0][0].startswith("[innsteer alpha=-3]")
    assert main(["export", str(path), "-o", str(tmp_path / "s.gguf")]) == 2
    err = capsys.readouterr().err.strip()
    assert "two maps" in err and "innsteer serve" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "s.gguf").exists()


@pytest.mark.llama
def test_the_readme_llama_commands_run_on_a_signed_steer_file(signed_file, tmp_path, monkeypatch, capsys):
    """The README's llama.cpp commands after `innsteer train`, as written, on a signed steer file
    (what `train` writes for refusal, whose shipped record gives each sign of alpha its own map)."""
    import shlex
    import shutil
    from pathlib import Path

    from innsteer.cli.main import main
    from innsteer.llama.steering import SteerGGUF

    path, _ = signed_file
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    starts = ("innsteer generate --gguf smollm2 --steer refusal", "innsteer export refusal")
    lines = [line for line in readme.splitlines() if line.startswith(starts)]
    assert len(lines) == 4, lines
    shutil.copy(path, tmp_path / "refusal.safetensors")
    monkeypatch.chdir(tmp_path)

    def run(argv: list[str]) -> list[str]:
        if argv[0] == "generate":
            argv = [*argv, "--max-new-tokens", "4"]
        assert main(argv) == 0, argv
        return [line for line in capsys.readouterr().out.splitlines() if line.startswith("[innsteer")]

    for line in lines:
        run(shlex.split(line, comments=True)[1:])
    assert SteerGGUF.load("refusal.gguf").alpha == 4.0 and SteerGGUF.load("refusal-away.gguf").alpha == -4.0
    question = ["generate", "--gguf", "smollm2", "--alpha", "-3", "Name a fruit."]
    assert run([*question, "--steer", "refusal-away.gguf"]) == run([*question, "--steer", "refusal.safetensors"])
