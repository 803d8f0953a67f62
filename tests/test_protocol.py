"""The comparison protocol end to end on the default model, at a tiny size."""

import copy
from dataclasses import replace

import numpy as np
import pytest
import torch

from innsteer.datasets.caa import load_ab, load_open_ended
from innsteer.eval.backfill import Mismatch, backfill
from innsteer.eval.protocol import MethodSpec, comparison_table, fit_spec, run_protocol
from innsteer.eval.results import Run, load, result_path, save

pytestmark = pytest.mark.slow
BEHAVIOR = "corrigible-neutral-HHH"


def test_protocol_curves_and_a_paired_comparison(default_lm, tmp_path):
    specs = {"innsteer": MethodSpec("caa", "all"), "caa": MethodSpec("caa", "mean"), "same": MethodSpec("caa", "mean")}
    result = run_protocol(
        default_lm,
        load_ab(BEHAVIOR, "generate", limit=40),
        load_ab(BEHAVIOR, "test_ab", limit=6),
        load_open_ended(BEHAVIOR, limit=2),
        layer=10,
        specs=specs,
        seeds=(0, 1),
        behavior=BEHAVIOR,
        max_new_tokens=8,
        ladder=(2.0, 8.0),
        n_resamples=50,
        progress=False,
    )
    assert result.metrics == ["answer", "letter", "fork"] and set(result.curves) == set(specs)
    for curves in result.curves.values():
        assert [curve.seed for curve in curves] == [0, 1]
        for curve in curves:
            assert np.shape(curve.scores["answer"]) == (len(curve.alphas), 6)
            assert np.shape(curve.nll) == np.shape(curve.tokens) == (len(curve.alphas), 2)
            assert {a > 0 for a in curve.alphas} == {True, False}  # both sides measured
            assert np.shape(curve.repetition) == np.shape(curve.replies) == np.shape(curve.nll)
            assert all(0 <= r < 1 for point in curve.repetition for r in point)
            assert len(curve.base_replies) == len(curve.base_repetition) == 2
    # the same method fitted twice measures the same curve: seeds change the split, not the model
    assert result.curves["same"] == result.curves["caa"]
    # fitted on different splits, the seeds' CAA vectors differ, and so do their curves
    assert result.curves["caa"][0].scores != result.curves["caa"][1].scores
    for key, row in result.comparison.get("answer", "toward").items():
        assert row.low <= row.diff <= row.high, key
    table = comparison_table([result])
    assert f"| {BEHAVIOR} | 10 | auc |" in table
    # saved and loaded, the run is the same, and so is its comparison table
    loaded = load(save(result, tmp_path / "run.json"))
    assert loaded == result and comparison_table([loaded]) == table


def test_result_files_are_named_by_their_settings(tmp_path):
    specs = {"caa": {"layer": None}, "innsteer": {"options": {}}}
    result = Run("refusal", "M", 14, [0, 1, 2], 1, 1, 8, ["answer"], specs, {})
    assert result_path(tmp_path, result).name == "M-refusal-L14-s012.json"  # float32, the defaults
    result.specs = {"caa": {"layer": 22}, "innsteer": {"options": {"transport_weight": 1.0, "num_couplings": 8}}}
    result.extra["dtype"], result.seeds = "bfloat16", [1]
    name = "M-refusal-L14-s1-transport_weight1-num_couplings8-caaL22-bfloat16.json"
    assert result_path(tmp_path, result) == tmp_path / name
    result.specs["innsteer"]["options"] = {"away": {"transport_sides": "both"}}  # a signed steerer's
    assert result_path(tmp_path, result).name == "M-refusal-L14-s1-away.transport_sidesboth-caaL22-bfloat16.json"


def test_train_fraction_fits_on_the_first_part_of_the_shuffled_training_items(default_lm):
    items = load_ab(BEHAVIOR, "generate", limit=20)

    def caa(spec, train):
        return fit_spec(default_lm, spec, train, layer=10, seed=0, behavior=BEHAVIOR).vector

    half = caa(MethodSpec("caa", "mean", train_fraction=0.5), items)
    assert torch.equal(half, caa(MethodSpec("caa", "mean"), items[:10]))
    assert not torch.allclose(half, caa(MethodSpec("caa", "mean"), items))
    # result files written before the field existed still match the same spec
    assert "train_fraction" not in MethodSpec("caa").record()
    assert MethodSpec("caa", train_fraction=0.5).record()["train_fraction"] == 0.5
    for bad in (0.0, 1.5):
        with pytest.raises(ValueError, match="train_fraction"):
            MethodSpec("caa", train_fraction=bad)


def test_replies_added_to_an_earlier_file_are_the_ones_the_protocol_records(default_lm):
    result = run_protocol(
        default_lm,
        load_ab(BEHAVIOR, "generate"),  # bench/replies.py refits on the behavior's whole generate set
        load_ab(BEHAVIOR, "test_ab", limit=4),
        load_open_ended(BEHAVIOR, limit=2),
        layer=10,
        specs={"caa": MethodSpec("caa", "all")},
        seeds=(1,),
        behavior=BEHAVIOR,
        max_new_tokens=8,
        ladder=(4.0,),
        compare=(),
        progress=False,
    )
    gone = dict.fromkeys(("repetition", "replies", "base_repetition", "base_replies"))
    earlier = replace(result, curves={"caa": [replace(c, **gone) for c in result.curves["caa"]]})  # as written before
    assert backfill(default_lm, earlier, progress=False) == result
    earlier.curves["caa"][0].nll = copy.deepcopy(earlier.curves["caa"][0].nll)
    earlier.curves["caa"][0].nll[0][1] += 1.0  # a curve these replies did not make
    with pytest.raises(Mismatch, match="alpha 4"):
        backfill(default_lm, earlier, progress=False)
