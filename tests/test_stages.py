"""Kept stages: a long run resumes where it stopped, and only where its inputs are the same
(``innsteer.eval.stages``; ``run_protocol(stages=)`` and ``innsteer eval --out``)."""

from __future__ import annotations

import copy
import json
import os
import re

import pytest
import torch
from tiny_models import tiny_lm

from innsteer.datasets.caa import load_ab
from innsteer.eval import protocol
from innsteer.eval import stages as stages_module
from innsteer.eval.protocol import MethodSpec, Unsteered, run_protocol
from innsteer.eval.stages import Stages
from innsteer.hf.models import LoadedModel

SPECS = {
    "caa": MethodSpec("caa", "all"),
    "innsteer": MethodSpec("innsteer", "all", {"max_epochs": 2}),
}


def test_a_stage_is_read_back_only_with_the_same_fingerprint(tmp_path):
    measured = []

    def measure(value):
        return lambda: measured.append(value) or {"value": value}

    assert Stages(tmp_path, {"a": 1}).run("s", measure(1)) == {"value": 1}
    assert Stages(tmp_path, {"a": (1,)}).run("s", measure(2)) == {"value": 2}  # (1,) is not 1
    assert Stages(tmp_path, {"a": (1,)}).run("s", measure(3)) == {"value": 2}  # a tuple reads back as a list
    assert measured == [1, 2]

    def interrupted():
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        Stages(tmp_path, {}).run("t", interrupted)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["s.json"]  # nothing half-written
    assert Stages(None, {}).run("s", measure(4)) == {"value": 4}  # no directory: always measured
    for damaged in (b"{not json", b"\xff\xfe", b"[1, 2]", b'{"fingerprint": {}}'):
        (tmp_path / "s.json").write_bytes(damaged)  # edited or damaged by hand: measured again, replaced
        assert Stages(tmp_path, {}).run("s", measure(5)) == {"value": 5}
    assert Stages(tmp_path, {}).run("s", measure(6)) == {"value": 5}


def test_stages_of_other_code_are_reused_and_said_once_per_directory(tmp_path, capsys):
    """A stage records the code that measured it; reading one of other code (or of code that did not
    record itself) says so on stderr, once per directory, naming both and what to delete."""
    this = stages_module.code_version()
    Stages(tmp_path, {"a": 1}).run("mine", lambda: {"value": 0})
    assert json.loads((tmp_path / "mine.json").read_text())["code"] == this
    assert Stages(tmp_path, {"a": 1}).run("mine", lambda: {"value": 1}) == {"value": 0}
    assert capsys.readouterr().err == ""  # this code's own stage: nothing to say
    others = tmp_path / "others"
    others.mkdir()
    stage = {"fingerprint": {"a": 1}, "result": {"value": 2}}
    (others / "old.json").write_text(json.dumps(stage))  # written before stages recorded their code
    (others / "older.json").write_text(json.dumps({**stage, "code": "0123abc"}))
    kept = Stages(others, {"a": 1})
    assert kept.run("old", lambda: {"value": 3}) == {"value": 2}
    assert kept.run("older", lambda: {"value": 3}) == {"value": 2}
    lines = capsys.readouterr().err.splitlines()
    assert len(lines) == 1, lines
    assert "did not record itself" in lines[0] and this in lines[0] and f"delete {others}" in lines[0]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "older.json").write_text(json.dumps({**stage, "code": "0123abc"}))
    assert Stages(elsewhere, {"a": 1}).run("older", lambda: {"value": 3}) == {"value": 2}
    assert "code 0123abc" in capsys.readouterr().err


def test_kept_fits_record_their_code_without_changing_the_steerer(tmp_path, capsys):
    from innsteer.core.steerers import LinearSteerer, load_steerer

    fitted = LinearSteerer(torch.arange(4.0), 1, model_id="m", extra={"note": 1})
    steerer = Stages(tmp_path, {"a": 1}).steerer("fit", lambda: fitted)
    assert steerer is fitted and steerer.extra == {"note": 1}  # the code is the kept file's only
    (path,) = tmp_path.glob("fit-*.safetensors")
    assert load_steerer(path).extra == {"note": 1, "stage_code": stages_module.code_version()}
    again = Stages(tmp_path, {"a": 1}).steerer("fit", lambda: pytest.fail("fitted again"))
    assert again.extra == {"note": 1} and torch.equal(again.vector, fitted.vector)
    assert capsys.readouterr().err == ""
    other = tmp_path / "other"
    other.mkdir()
    kept = load_steerer(path)
    kept.extra["stage_code"] = "0123abc"
    kept.save(other / path.name)
    assert Stages(other, {"a": 1}).steerer("fit", lambda: pytest.fail("fitted again")).extra == {"note": 1}
    assert "code 0123abc" in capsys.readouterr().err


def test_a_full_disk_while_a_stage_is_written_keeps_the_stage_before(tmp_path, monkeypatch):
    Stages(tmp_path, {"a": 1}).run("s", lambda: {"value": 1})

    def disk_full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", disk_full)  # after the bytes are written, before the rename
    with pytest.raises(OSError, match="disk full"):
        Stages(tmp_path, {"a": 2}).run("s", lambda: {"value": 2})
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir()] == ["s.json"]
    assert Stages(tmp_path, {"a": 1}).run("s", lambda: {"value": 3}) == {"value": 1}


def run(lm, stages, **settings):
    return run_protocol(
        lm, load_ab("refusal", "generate", limit=16), load_ab("refusal", "test_ab", limit=4),
        ["Hello there", "Tell me a story"], layer=1, specs=SPECS, seeds=(0, 1), max_new_tokens=4,
        ladder=(2.0, 8.0), n_resamples=50, progress=False, stages=stages, **settings,
    )  # fmt: skip


def measured(result) -> str:
    """The run as JSON, less the fits' wall times."""
    return re.sub(r'"seconds": [0-9.e-]+', "", json.dumps(result.to_dict(), default=str))


def test_a_run_with_progress_shows_the_collection_and_the_training(tmp_path, monkeypatch, capsys):
    # on a large model the fits' activation collection runs for many minutes: never silently
    lm = tiny_lm(layers=3)
    for progress in (False, True):
        monkeypatch.setenv("INNSTEER_CACHE", str(tmp_path / str(progress)))  # nothing collected before
        run_protocol(
            lm, load_ab("refusal", "generate", limit=8), load_ab("refusal", "test_ab", limit=2), ["Hello"],
            layer=1, specs=SPECS, seeds=(0,), max_new_tokens=2, ladder=(2.0,), n_resamples=10,
            progress=progress,
        )  # fmt: skip
        shown = capsys.readouterr().err
        assert ("train-s0-answer all L1" in shown and "innsteer layer 1" in shown) == progress, shown


def test_an_interrupted_protocol_run_resumes_with_the_same_result(tmp_path, monkeypatch):
    lm = tiny_lm(layers=3)
    whole = run(lm, None, return_steerers=True)
    fits = []
    real_fit = protocol.fit_spec

    def fit_then_stop(lm, spec, train, *, seed, **kw):
        if (spec.method, seed) == ("innsteer", 1):
            raise KeyboardInterrupt  # the last curve of the run
        fits.append((spec.method, seed))
        return real_fit(lm, spec, train, seed=seed, **kw)

    monkeypatch.setattr(protocol, "fit_spec", fit_then_stop)
    with pytest.raises(KeyboardInterrupt):
        run(lm, tmp_path)
    assert fits == [("caa", 0), ("innsteer", 0), ("caa", 1)] and len(list(tmp_path.glob("curve-*.json"))) == 3

    fits.clear()
    monkeypatch.setattr(
        protocol, "fit_spec", lambda *a, **kw: fits.append((a[1].method, kw["seed"])) or real_fit(*a, **kw)
    )
    resumed = run(lm, tmp_path, return_steerers=True)
    # only the missing curve is measured and its steerer fitted; the first seed's steerers, whose
    # curves were read back, are read back from their kept fits: the ones the whole run fitted
    assert fits == [("innsteer", 1)]
    assert measured(resumed) == measured(whole)

    def assert_whole_steerers(result):
        assert set(result.steerers) == set(whole.steerers) == {"caa", "innsteer"}
        for name, steerer in whole.steerers.items():
            tensors, again = steerer.tensors(), result.steerers[name].tensors()
            assert tensors.keys() == again.keys() and all(torch.equal(tensors[k], again[k]) for k in tensors)

    assert_whole_steerers(resumed)
    kept_fits = sorted(tmp_path.glob("fit-*.safetensors"))
    assert len(kept_fits) == 4  # two methods, two seeds
    kept_fits[0].write_bytes(b"damaged")  # caa, seed 0: fitted again, the same steerer
    fits.clear()
    assert_whole_steerers(run(lm, tmp_path, return_steerers=True))
    assert fits == [("caa", 0)]
    fits.clear()
    run(lm, tmp_path)  # no steerers asked for: nothing fitted
    assert fits == []
    curves = []
    real_curve = protocol.measure_curve
    monkeypatch.setattr(protocol, "measure_curve", lambda *a, **kw: curves.append(1) or real_curve(*a, **kw))
    other = run(lm, tmp_path, signs=(1,))  # other settings: every curve measured again, on the kept fits
    assert fits == [] and len(curves) == 4
    assert measured(other) == measured(run(lm, None, signs=(1,)))  # as a run with nothing kept
    fits.clear()
    half = LoadedModel(copy.deepcopy(lm.model).to(torch.bfloat16), lm.tokenizer, lm.model_id)
    run(half, tmp_path)  # the same model loaded in another dtype: measured again
    assert [method for method, _ in fits] == ["caa", "innsteer", "caa", "innsteer"]


def test_eval_from_the_command_line_resumes_from_its_out_directory(tmp_path, monkeypatch, capsys):
    from innsteer.cli.main import main

    lm = tiny_lm(layers=3)
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    rows = [{"prompt": f"Question {i}?", "positive": f"Yes {i}.", "negative": f"No {i}."} for i in range(20)]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "out"
    command = ["eval", "--data", str(data), "--model", str(tmp_path / "model"), "--seeds", "0,1", "--alphas", "2,8"]
    command += ["--n-open", "2", "--max-new-tokens", "4", "--no-plots", "--out", str(out)]
    command += ["--judge", str(tmp_path / "model")]  # the model judging its own replies: shapes only
    assert main(command) == 0
    first = json.loads((out / "report.json").read_text())
    assert len(list((out / "stages").glob("curve-*.json"))) == 4  # caa and innsteer, two seeds
    answers = (out / "stages" / "judge.jsonl").read_text()
    fits = []
    monkeypatch.setattr(protocol, "fit_spec", lambda *a, **kw: fits.append(a[1].method))
    capsys.readouterr()
    assert main(command) == 0  # every curve and every judge's answer read back: nothing fitted or asked
    again = json.loads((out / "report.json").read_text())
    assert fits == [] and (out / "stages" / "judge.jsonl").read_text() == answers
    assert again["comparison"] == first["comparison"] and again["judged"] == first["judged"]


def test_calls_sharing_the_unsteered_measurements_measure_what_each_call_alone_does(monkeypatch):
    """``tune``'s validation calls share one ``Unsteered``: the scorer of the validation items and
    the prompts' unsteered replies are built once, and each call's run equals the call alone."""
    lm = tiny_lm(layers=3)

    def validate(layer, **settings):
        return run_protocol(
            lm, load_ab("refusal", "generate", limit=16), None, ["Hello there", "Tell me a story"], layer=layer,
            specs=SPECS, seeds=(0, 1), max_new_tokens=4, ladder=(2.0,), n_resamples=10, compare=(),
            progress=False, **settings,
        )  # fmt: skip

    alone = [measured(validate(layer)) for layer in (1, 2)]
    built = []
    for name in ("BatchedScorer", "BatchedFluency"):
        real = getattr(protocol, name)
        monkeypatch.setattr(protocol, name, lambda *a, real=real, name=name, **kw: built.append(name) or real(*a, **kw))
    unsteered = Unsteered(lm)
    shared = [measured(validate(layer, unsteered=unsteered)) for layer in (1, 2)]
    assert shared == alone
    assert sorted(built) == ["BatchedFluency", "BatchedScorer", "BatchedScorer"]  # one per seed's validation items
    with pytest.raises(ValueError, match="another model"):
        validate(1, unsteered=Unsteered(tiny_lm(layers=3)))
