"""``innsteer tune`` end to end on a tiny random model (shapes, choices, files, resuming), and its
pieces against independent references."""

from __future__ import annotations

import json
import shutil
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from tiny_models import tiny_lm

import innsteer
from innsteer.core.errors import ConfigError
from innsteer.core.steerers import SignedSteerer, load_steerer
from innsteer.datasets.caa import load_ab
from innsteer.datasets.files import NEUTRAL_PROMPTS
from innsteer.eval import protocol
from innsteer.eval import tune as tune_module
from innsteer.eval.protocol import MethodSpec, run_protocol
from innsteer.eval.results import Curve
from innsteer.eval.tune import (
    TUNE_BUDGETS,
    TuneBudget,
    candidate_layers,
    check_variants,
    choose_variants,
    signed_options,
    split_items,
    tune_table,
    validation_area,
)

TINY = TuneBudget(
    layer_fractions=(0.2, 0.8),
    variants={"defaults": {"max_epochs": 2}, "no-transport": {"max_epochs": 2, "transport_weight": 0.0}},
    validation_seeds=(0,),
    test_seeds=(0, 1),
    n_prompts=2,
    max_new_tokens=4,
    validation_ladder=(2.0, 8.0),
    ladder=(1.0, 8.0),
)


@pytest.fixture
def tiny_budget(monkeypatch):
    monkeypatch.setitem(tune_module.TUNE_BUDGETS, "tiny", TINY)
    return "tiny"


def test_candidate_layers_are_relative_to_depth():
    assert candidate_layers(30, (0.35, 0.55, 0.75)) == [10, 16, 22]
    assert candidate_layers(28, (0.35, 0.55, 0.75)) == [9, 15, 20]
    assert candidate_layers(4, (0.1, 0.5, 0.9, 1.0)) == [0, 2]  # the last layer is never a candidate
    with pytest.raises(ConfigError):
        candidate_layers(1, (0.5,))


def test_validation_area_against_a_hand_computed_trapezoid():
    # points (cost, shift): alpha 1 -> (0.5, 0.2), alpha 2 -> (1.5, 0.6); the budget function is the
    # polyline (0,0)->(0.5,0.2)->(1,0.4): area 0.5*0.2/2 + 0.5*(0.2+0.4)/2 = 0.2. By the fork metric
    # the shifts are 0.1 and 0.2: (0,0)->(0.5,0.1)->(1,0.15), area 0.025 + 0.0625
    run = Curve(
        seed=0,
        alphas=[1.0, 2.0],
        scores={"answer": [[0.6, 0.6], [1.0, 1.0]], "fork": [[0.5, 0.5], [0.6, 0.6]]},
        base_scores={"answer": [0.4, 0.4], "fork": [0.4, 0.4]},
        nll=[[3.0], [5.0]],  # per prompt: NLL sums over 2 tokens (base 1 nat/token)
        tokens=[[2], [2]],
        base_nll=[2.0],
        base_tokens=[2],
        repetition=[[0.0], [0.0]],
        base_repetition=[0.0],
    )
    assert validation_area(run, 1, "answer") == pytest.approx(0.2, abs=1e-3)
    assert validation_area(run, 1, "fork") == pytest.approx(0.0875, abs=1e-3)
    run.repetition = [[0.0], [0.9]]  # the second point loops: the curve ends at the first
    assert validation_area(run, 1, "answer") == pytest.approx(0.5 * 0.2 / 2 + 0.5 * 0.2, abs=1e-3)


def test_each_sign_gets_the_options_that_steer_it_most():
    # myopic-reward's validation areas (docs/RESULTS.md): the defaults steer toward most, the
    # transport term for both sides away
    myopic = {"defaults": {"toward": 0.284, "away": 0.011}, "both-sides": {"toward": 0.218, "away": 0.074},
              "no-transport": {"toward": 0.049, "away": 0.065}}  # fmt: skip
    assert choose_variants(myopic) == ("defaults", "both-sides")
    variants = {"defaults": {}, "both-sides": {"transport_sides": "both"}, "no-transport": {"transport_weight": 0.0}}
    assert signed_options(variants, "defaults", "both-sides") == {"away": {"transport_sides": "both"}}
    assert signed_options(variants, "no-transport", "both-sides") == {
        "transport_weight": 0.0,
        "away": {"transport_sides": "both"},
    }
    # one set best both ways: one map; a tie goes to the earlier set
    refusal = {"defaults": {"toward": 0.3, "away": 0.1}, "both-sides": {"toward": 0.3, "away": 0.05}}
    assert choose_variants(refusal) == ("defaults", "defaults")
    assert signed_options(variants, "both-sides", "both-sides") == {"transport_sides": "both"}


def test_the_quick_budget_samples_large_data_down_in_order():
    from innsteer.eval.tune import _sample

    items = list(range(500))
    quick = TUNE_BUDGETS["quick"]
    kept = _sample(items, quick.max_pool, seed=3)
    assert len(kept) == quick.max_pool == len(set(kept)) and kept == sorted(kept)
    assert kept == _sample(items, quick.max_pool, seed=3) != _sample(items, quick.max_pool, seed=4)
    assert _sample(items[:20], quick.max_pool, seed=3) == items[:20] and _sample(items, None, 0) == items


def test_split_items_is_seeded_and_respects_given_test_items():
    items = load_ab("refusal", "generate", limit=40)
    pool, test = split_items(items, None, seed=3)
    assert len(test) == 8 and len(pool) == 32 and not set(map(id, pool)) & set(map(id, test))
    assert split_items(items, None, seed=3) == (pool, test)
    assert split_items(items, None, seed=4) != (pool, test)
    given = load_ab("refusal", "test_ab", limit=5)
    assert split_items(items, given, seed=3) == (list(items), list(given))
    with pytest.raises(ConfigError, match="at least 8 training items and 2 test items, got 5 and 1"):
        split_items(items[:6], None, seed=0)  # 6 items: 1 held out
    with pytest.raises(ConfigError, match="got 5 and 5"):
        split_items(items[:5], given, seed=0)  # given test items: the pool is still checked
    with pytest.raises(ConfigError, match="got 40 and 1"):
        split_items(items, given[:1], seed=0)
    # repeats are left out, with a warning: none is both trained and tested on
    with pytest.warns(UserWarning, match="6 repeated item"):
        pool, test = split_items([*items, *items[:5]], [*given, given[0]], seed=0)
    assert pool == list(items) and test == list(given)
    with pytest.warns(UserWarning, match="3 repeated item"):
        pool, test = split_items(items, items[:3], seed=0)
    assert pool == list(items[3:]) and test == list(items[:3])
    with pytest.warns(UserWarning, match="2 repeated item"):
        pool, test = split_items([*items, *items[:2]], None, seed=3)
    assert len(pool) + len(test) == 40 and not set(map(id, pool)) & set(map(id, test))


def test_tune_chooses_per_method_writes_its_record_and_resumes(tmp_path, tiny_budget, monkeypatch):
    lm = tiny_lm(layers=5)
    items = load_ab("corrigible-neutral-HHH", "generate", limit=30)
    calls = []
    real_run_protocol = tune_module.run_protocol
    monkeypatch.setattr(tune_module, "run_protocol", lambda *a, **k: calls.append(k) or real_run_protocol(*a, **k))
    record = innsteer.tune(lm, None, items, budget=tiny_budget, out=tmp_path, progress=False)

    assert record["layers"] == candidate_layers(5, TINY.layer_fractions) == [1, 3]
    for name in ("caa", "innsteer"):
        choice = record["chosen"][name]
        by_layer = {int(k): v for k, v in choice["validation"]["by_layer"].items()}
        assert choice["layer"] == max(by_layer, key=by_layer.get)  # each method's own best layer
    options = record["chosen"]["innsteer"]["validation"]["by_options"]
    assert set(options) == set(TINY.variants)
    toward, away = choose_variants(options)
    assert record["chosen"]["innsteer"]["options"] == signed_options(TINY.variants, toward, away)
    assert (record["chosen"]["innsteer"]["variant"], record["chosen"]["innsteer"]["away_variant"]) == (toward, away)
    assert record["chosen"]["innsteer"]["validation"]["away_auc"] == options[away]["away"]
    assert (
        options["defaults"]["toward"]
        == record["chosen"]["innsteer"]["validation"]["by_layer"][str(record["chosen"]["innsteer"]["layer"])]
    )
    for row in [*(record["test"][k] for k in ("auc", "at0.5")), record["test"]["away"]["auc"]]:
        assert row["low"] <= row["diff"] <= row["high"] and row["diff"] == pytest.approx(row["a"] - row["b"])
    # ranked by the fork metric: the headline is its comparison, the others beside it
    assert record["metric"] == "fork" and {"answer", "letter"} <= set(record["test"]) and "fork" not in record["test"]
    for name in ("caa", "innsteer"):  # each layer's area is the ranking metric's, as its stage keeps it
        layer = record["chosen"][name]["layer"]
        stage = json.loads((tmp_path / "stages" / f"layer{layer}.json").read_text())["result"]
        assert record["chosen"][name]["validation"]["by_layer"][str(layer)] == stage[name]["fork"]["toward"]
        assert set(stage[name]) == {"answer", "letter", "fork"}
    assert record["n_items"] == {"pool": 24, "test": 6, "prompts": 2, "available": {"pool": 24, "test": 6}}
    # validation measured toward the behavior only; the test stage both ways, on the test seeds
    assert [call.get("signs", (1, -1)) for call in calls] == [(1,), (1,), (1, -1), (-1,), (1, -1)]
    assert calls[-1]["seeds"] == TINY.test_seeds and calls[-1]["compare"] == ("innsteer", "caa")
    assert calls[0]["ladder"] == TINY.validation_ladder and calls[-1]["ladder"] == TINY.ladder

    stored = json.loads((tmp_path / "tune.json").read_text())
    assert stored["chosen"] == json.loads(json.dumps(record["chosen"]))
    for name, path in record["steer_files"].items():
        steerer = load_steerer(tmp_path / path)
        assert steerer.layer == record["chosen"][name]["layer"] and steerer.method == name
    assert "## Test comparison" in (tmp_path / "tune.md").read_text()
    row = tune_table([record]).splitlines()[-1]
    auc = record["test"]["auc"]
    assert row.startswith(f"| custom | tiny | fork | {record['chosen']['caa']['layer']} |")
    answer = record["test"]["answer"]["away"]["auc"]
    for cell in (auc, answer):
        assert f"{cell['diff']:+.3f} [{cell['low']:+.3f}, {cell['high']:+.3f}]" in row
    assert (tmp_path / "tune.png").read_bytes()[:4] == b"\x89PNG"

    calls.clear()  # the same command again: every stage is read back, nothing measured
    again = innsteer.tune(lm, None, items, budget=tiny_budget, out=tmp_path, progress=False)
    assert calls == [] and again["chosen"] == record["chosen"] and again["test"] == record["test"]
    # ranked by another metric: every validation stage is read back (they keep each metric's areas),
    # at most the test of a different choice is measured; its layers are that metric's best
    by_answer = innsteer.tune(lm, None, items, budget=tiny_budget, metric="answer", out=tmp_path, progress=False)
    assert len(calls) <= 1 and by_answer["metric"] == "answer" and "fork" in by_answer["test"]
    for name in ("caa", "innsteer"):
        layer = by_answer["chosen"][name]["layer"]
        stage = json.loads((tmp_path / "stages" / f"layer{layer}.json").read_text())["result"]
        assert by_answer["chosen"][name]["validation"]["by_layer"][str(layer)] == stage[name]["answer"]["toward"]
        by_layer = by_answer["chosen"][name]["validation"]["by_layer"]
        assert layer == int(max(by_layer, key=by_layer.get))
    calls.clear()
    # another choice from the same validation stages (a new rule): only the test is measured again;
    # two option sets for the two signs: the steer file holds two maps
    pair = (
        ("no-transport", "defaults") if (toward, away) != ("no-transport", "defaults") else ("defaults", "no-transport")
    )
    monkeypatch.setattr(tune_module, "choose_variants", lambda *a: pair)
    rechosen = innsteer.tune(lm, None, items, budget=tiny_budget, out=tmp_path, progress=False)
    assert len(calls) == 1 and rechosen["chosen"]["innsteer"]["options"] == signed_options(TINY.variants, *pair)
    signed = load_steerer(tmp_path / "innsteer.safetensors")
    assert isinstance(signed, SignedSteerer) and signed.layer == rechosen["chosen"]["innsteer"]["layer"]
    assert f"{pair[0]} / {pair[1]} away" in tune_table([rechosen])
    assert "(chosen toward)" in (tmp_path / "tune.md").read_text()
    # one more option set on the finished run: measured alone (its own stage, the others read back),
    # then the test of the configuration it enters
    calls.clear()
    extra = {"both-sides": {"max_epochs": 2, "transport_sides": "both"}}
    monkeypatch.setattr(tune_module, "choose_variants", lambda *a: ("defaults", "both-sides"))
    widened = innsteer.tune(lm, None, items, budget=tiny_budget, variants=extra, out=tmp_path, progress=False)
    assert [set(call["specs"]) for call in calls] == [{"both-sides"}, {"innsteer", "caa"}]
    assert calls[0]["signs"] == (1, -1) and widened["variants"] == extra
    by_options = widened["chosen"]["innsteer"]["validation"]["by_options"]
    assert {k: v for k, v in by_options.items() if k != "both-sides"} == json.loads(json.dumps(options))
    assert widened["chosen"]["innsteer"]["options"] == {"max_epochs": 2, "away": extra["both-sides"]}
    # the budget gaining that option set keeps every stage: nothing is measured again
    calls.clear()
    monkeypatch.setitem(tune_module.TUNE_BUDGETS, tiny_budget, replace(TINY, variants={**TINY.variants, **extra}))
    gained = innsteer.tune(lm, None, items, budget=tiny_budget, out=tmp_path, progress=False)
    assert calls == [] and "variants" not in gained
    assert gained["chosen"] == widened["chosen"] and gained["test"] == widened["test"]
    monkeypatch.setitem(tune_module.TUNE_BUDGETS, tiny_budget, TINY)
    monkeypatch.setattr(tune_module, "choose_variants", choose_variants)
    # other settings do not reuse the stages
    calls.clear()
    innsteer.tune(lm, None, items, budget=tiny_budget, out=tmp_path, seed=1, progress=False)
    assert len(calls) == 5
    assert record["provenance"]["cpu"]["cpus"] and record["provenance"]["torch"] == torch.__version__


def test_an_interrupted_test_stage_resumes_from_its_finished_curves(tmp_path, tiny_budget, monkeypatch):
    """On a large model the test stage runs for most of an hour: a rerun measures only the curves
    it lacks, and writes the same record and steer files as a run that was never stopped."""
    lm = tiny_lm(layers=5)
    items = load_ab("corrigible-neutral-HHH", "generate", limit=30)
    whole = innsteer.tune(lm, None, items, budget=tiny_budget, out=tmp_path / "whole", progress=False)
    cut = tmp_path / "cut"
    shutil.copytree(tmp_path / "whole" / "stages", cut / "stages")
    for stage in (cut / "stages").glob("test-*.json"):
        stage.unlink()  # the test stage as a whole never finished ...
    (last,) = (cut / "stages" / "test").glob("curve-innsteer-s1-*.json")
    last.unlink()  # ... and its last curve was being measured when it stopped ...
    (fit,) = (cut / "stages" / "test").glob("fit-innsteer-s1-*.safetensors")
    fit.unlink()  # ... its steerer still being trained
    fits = []
    real_fit = protocol.fit_spec
    monkeypatch.setattr(
        protocol, "fit_spec", lambda *a, **kw: fits.append((a[1].method, kw["seed"])) or real_fit(*a, **kw)
    )
    resumed = innsteer.tune(lm, None, items, budget=tiny_budget, out=cut, progress=False)
    # the missing curve's steerer; the first seed's steerers (their curves read back) read back too
    assert fits == [("innsteer", 1)]
    assert resumed["chosen"] == whole["chosen"] and resumed["test"] == whole["test"]
    for path in whole["steer_files"].values():
        kept, again = load_file(tmp_path / "whole" / path), load_file(cut / path)
        assert kept.keys() == again.keys() and all(torch.equal(kept[k], again[k]) for k in kept)


def test_an_option_set_measures_the_same_alone_as_beside_others():
    """What lets each option set have a stage of its own: run_protocol fits and scores every spec
    from the seed alone, so the other specs of a call do not change its curves."""
    lm = tiny_lm(layers=3)
    items = load_ab("corrigible-neutral-HHH", "generate", limit=20)
    specs = {name: MethodSpec("innsteer", "all", options, layer=1) for name, options in TINY.variants.items()}
    common = dict(layer=1, seeds=(0,), compare=(), signs=(1, -1), ladder=(2.0, 8.0), max_new_tokens=4, progress=False)
    together = run_protocol(lm, items, None, NEUTRAL_PROMPTS[:2], specs=specs, **common)
    alone = run_protocol(lm, items, None, NEUTRAL_PROMPTS[:2], specs={"no-transport": specs["no-transport"]}, **common)

    def measured(curve):  # all but the fit's wall time
        record = curve.to_dict()
        return record | {"extra": {k: v for k, v in record["extra"].items() if k != "seconds"}}

    assert measured(together.curves["no-transport"][0]) == measured(alone.curves["no-transport"][0])
    assert measured(together.curves["defaults"][0]) != measured(alone.curves["no-transport"][0])


def test_tune_from_the_command_line_on_a_model_directory(tmp_path, monkeypatch, capsys):
    from innsteer.cli.main import main

    monkeypatch.setitem(tune_module.TUNE_BUDGETS, "quick", TINY)  # the command's default budget, made tiny
    lm = tiny_lm(layers=4)
    lm.model.save_pretrained(tmp_path / "model")
    lm.tokenizer.save_pretrained(tmp_path / "model")
    rows = [
        {"prompt": f"Question {i}?", "positive": f"Yes, gladly {i}.", "negative": f"No, never {i}."} for i in range(20)
    ]
    data = tmp_path / "pairs.jsonl"
    data.write_text("\n".join(json.dumps(row) for row in rows))
    out = tmp_path / "out"
    assert main(["tune", "--data", str(data), "--model", str(tmp_path / "model"), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    record = json.loads((out / "tune.json").read_text())
    assert record["behavior"] == "pairs" and record["n_items"]["test"] == 4  # --data's 20 % held out
    assert "letter" not in record["test"] and "answer" in record["test"]  # plain answers: no letter metric
    assert "## Test comparison" in printed and str(out / "innsteer.safetensors") in printed
    for bad in ("[1]", "{not json"):
        with pytest.raises(SystemExit) as exit_info:  # argparse's usage error: one line, exit 2
            main(["tune", "--data", str(data), "--variants", bad, "--out", str(out)])
        assert exit_info.value.code == 2 and "--variants: expected a JSON object" in capsys.readouterr().err
    # a variant tune refuses is named before any model loads (this model does not exist)
    bad = ["--variants", '{"defaults": {"num_couplings": 8}}', "--model", str(tmp_path / "no-model")]
    assert main(["tune", "--data", str(data), *bad, "--out", str(out)]) == 2
    assert "variant 'defaults' is already among the budget's" in capsys.readouterr().err
    # so is a metric the items cannot be scored by
    assert main(["tune", "--data", str(data), "--metric", "letter", "--model", "nope", "--out", str(out)]) == 2
    assert "the letter metric needs A/B items with lettered options" in capsys.readouterr().err
    # so is data too small to tune on (5 pairs: 4 to train, 1 held out)
    data.write_text("\n".join(json.dumps(row) for row in rows[:5]))
    assert main(["tune", "--data", str(data), "--model", str(tmp_path / "no-model"), "--out", str(out)]) == 2
    assert "at least 8 training items and 2 test items, got 4 and 1" in capsys.readouterr().err
    (tmp_path / "file").write_text("")
    assert main(["tune", "--data", str(data), "--out", str(tmp_path / "file")]) == 2
    assert "is not a directory" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("variants", "match"),
    [
        ([{"transport_sides": "away"}], "must map names to option dicts"),
        ({"defaults": {"num_couplings": 8}}, "'defaults' is already among the budget's, as {}"),
        ({"mine": "transport_sides=away"}, "'mine' must be a dict"),
        ({"mine": {"away": {}}}, "'mine': 'away' is not an option here"),
        ({"mine": {"seed": 3}}, "'mine': 'seed' is not an option here"),
        ({"mine": {"num_couplings": 2.5}}, "'mine': num_couplings must be an integer, got 2.5"),
        ({"mine": {"num_couplings": True}}, "'mine': num_couplings must be an integer, got True"),
        ({"mine": {"mlp_hidden": "64"}}, "'mine': mlp_hidden must be an integer"),
        ({"mine": {"max_epochs": 1e9}}, "'mine': max_epochs must be an integer"),
        ({"mine": {"hiden": 64}}, r"'mine': unknown innsteer training option.*'hiden'"),
        ({"mine": {"transport_sides": "sideways"}}, "'mine': transport_sides must be one of"),
        ({"mine": {"lr": "fast"}}, "'mine': lr must be a number, got 'fast'"),
    ],
)
def test_tune_checks_extra_variants_before_any_work(variants, match):
    lm = tiny_lm()
    with pytest.raises(ConfigError, match=match):
        innsteer.tune(lm, None, load_ab("refusal", "generate", limit=20), variants=variants, progress=False)


def test_a_variant_the_budget_already_has_is_measured_as_the_budgets():
    """A command from before the budget gained an option set still runs, and measures it once."""
    quick = TUNE_BUDGETS["quick"]
    assert check_variants({"away-only": dict(quick.variants["away-only"])}, quick) == {}
    mine = {"away-only": dict(quick.variants["away-only"]), "mine": {"num_couplings": 8}}
    assert check_variants(mine, quick) == {"mine": {"num_couplings": 8}}


def test_tune_refuses_an_unknown_budget_and_too_few_items():
    lm = tiny_lm()
    with pytest.raises(ConfigError, match="unknown budget 'huge'"):
        innsteer.tune(lm, None, load_ab("refusal", "generate", limit=20), budget="huge")
    with pytest.raises(ConfigError, match="at least 8 training items"):
        innsteer.tune(lm, None, load_ab("refusal", "generate", limit=5), progress=False)
