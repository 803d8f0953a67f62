"""Typed protocol results: every committed result file and report loads and writes back unchanged,
and a file that is not one gets one clear error."""

import json
import os
from dataclasses import replace
from pathlib import Path

import pytest

from innsteer.core.errors import ConfigError
from innsteer.eval.results import SCHEMA, Comparison, Curve, Run, load, save
from innsteer.eval.tradeoff import paired_bootstrap

ROOT = Path(__file__).resolve().parents[1]
COMMITTED = [*sorted(ROOT.glob("results/*.json")), *sorted(ROOT.glob("results/validation/**/*.json"))]
COMMITTED += sorted(ROOT.glob("results/*/*/report.json"))


def _curve(seed=0, shift=0.0):
    return Curve(
        seed=seed, alphas=[1.0, -1.0], scores={"answer": [[0.6 + shift, 0.7], [0.4, 0.3]]}, nll=[[9.0], [9.5]],
        tokens=[[8.0], [8.0]], base_scores={"answer": [0.5, 0.5]}, base_nll=[8.0], base_tokens=[8.0],
        repetition=[[0.0], [0.0]], replies=[["a"], ["b"]], base_repetition=[0.0], base_replies=["c"],
    )  # fmt: skip


def _run():
    curves = {"innsteer": [_curve(0, 0.1), _curve(1, 0.1)], "caa": [_curve(0), _curve(1)]}
    run = Run("b", "m", 3, [0, 1], 2, 1, 8, ["answer"], {"innsteer": {}, "caa": {}}, curves)
    sides = {"answer/toward": paired_bootstrap(curves["innsteer"], curves["caa"], n_resamples=20)}
    return replace(run, comparison=Comparison("innsteer", "caa", sides))


@pytest.mark.parametrize("path", COMMITTED, ids=lambda p: str(p.relative_to(ROOT)))
def test_committed_results_load_and_write_back_unchanged(path):
    original = json.loads(path.read_text())
    run = load(path)
    assert run.curves and all(len(curves) == len(run.seeds) for curves in run.curves.values())
    written = json.loads(json.dumps(run.to_dict(), default=str))
    assert written.pop("schema") == SCHEMA and original.pop("schema", 0) in (0, SCHEMA)
    assert written == original


def test_a_run_saves_and_loads_as_it_was(tmp_path):
    run = _run()
    run.extra["command"] = "innsteer eval"
    loaded = load(save(run, tmp_path / "run.json"))
    assert loaded == run and loaded.comparison.get("answer", "toward")["auc"].diff > 0
    assert loaded.compare == ("innsteer", "caa") and loaded.extra == {"command": "innsteer eval"}


def test_a_failed_save_leaves_the_earlier_file(tmp_path):
    path = save(_run(), tmp_path / "run.json")
    before = path.read_text()
    clashing = replace(_run(), extra={"runs": "not mine"})
    with pytest.raises(ValueError, match="runs"):
        save(clashing, path)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["run.json"]


def test_a_full_disk_mid_save_leaves_the_earlier_file(tmp_path, monkeypatch):
    path = save(_run(), tmp_path / "run.json")
    before = path.read_text()

    def disk_full(fd):
        raise OSError("disk full")

    monkeypatch.setattr(os, "fsync", disk_full)  # after the bytes are written, before the rename
    with pytest.raises(OSError, match="disk full"):
        save(replace(_run(), extra={"new": 1}), path)
    assert path.read_text() == before and [p.name for p in tmp_path.iterdir()] == ["run.json"]


@pytest.mark.parametrize(
    "text, message",
    [
        ("{not json", "is not JSON"),
        ("[1, 2]", "a JSON object is expected"),
        ('{"schema": 99}', "schema 99"),
        ('{"behavior": "b"}', "no model_id"),
    ],
)
def test_a_file_that_is_not_a_run_is_named(tmp_path, text, message):
    path = tmp_path / "bad.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message):
        load(path)


def test_a_curve_with_unknown_or_missing_fields_is_named(tmp_path):
    data = _run().to_dict()
    data["runs"]["caa"][1]["alpha"] = [1.0]  # a typo of "alphas"
    (tmp_path / "typo.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match=r"runs\['caa'\]\[1\].*unknown alpha"):
        load(tmp_path / "typo.json")
    del data["runs"]["caa"][1]["alpha"], data["runs"]["caa"][1]["nll"]
    (tmp_path / "missing.json").write_text(json.dumps(data))
    with pytest.raises(ConfigError, match="no nll"):
        load(tmp_path / "missing.json")
    with pytest.raises(ConfigError, match="cannot read"):
        load(tmp_path / "absent.json")
