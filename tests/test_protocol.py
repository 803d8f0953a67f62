"""The comparison protocol end to end on the default model, at a tiny size."""

import copy

import numpy as np
import pytest
import torch

from innsteer.datasets.caa import load_ab, load_open_ended
from innsteer.eval.protocol import MethodSpec, comparison_table, fit_spec, run_protocol

pytestmark = pytest.mark.slow
BEHAVIOR = "corrigible-neutral-HHH"


def test_protocol_curves_and_a_paired_comparison(default_lm):
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
    assert result["metrics"] == ["answer", "letter"] and set(result["runs"]) == set(specs)
    for runs in result["runs"].values():
        assert [run["seed"] for run in runs] == [0, 1]
        for run in runs:
            assert np.shape(run["scores"]["answer"]) == (len(run["alphas"]), 6)
            assert np.shape(run["nll"]) == np.shape(run["tokens"]) == (len(run["alphas"]), 2)
            assert {a > 0 for a in run["alphas"]} == {True, False}  # both sides measured
            assert np.shape(run["repetition"]) == np.shape(run["replies"]) == np.shape(run["nll"])
            assert all(0 <= r < 1 for point in run["repetition"] for r in point)
            assert len(run["base_replies"]) == len(run["base_repetition"]) == 2
    # the same method fitted twice measures the same curve: seeds change the split, not the model
    assert result["runs"]["same"] == result["runs"]["caa"]
    # fitted on different splits, the seeds' CAA vectors differ, and so do their curves
    assert result["runs"]["caa"][0]["scores"] != result["runs"]["caa"][1]["scores"]
    for key, row in result["comparison"]["answer/toward"].items():
        assert row["low"] <= row["diff"] <= row["high"], key
    table = comparison_table([result])
    assert f"| {BEHAVIOR} | 10 | auc |" in table


def test_result_files_are_named_by_their_settings(tmp_path):
    from bench.quality import result_path

    result = {
        "model_id": "M",
        "behavior": "refusal",
        "layer": 14,
        "seeds": [0, 1, 2],
        "specs": {"caa": {"layer": None}, "innsteer": {"options": {}}},
    }
    assert result_path(tmp_path, result).name == "M-refusal-L14-s012.json"  # float32, the defaults
    result["specs"] = {"caa": {"layer": 22}, "innsteer": {"options": {"transport_weight": 1.0, "num_couplings": 8}}}
    result.update(dtype="bfloat16", seeds=[1])
    name = "M-refusal-L14-s1-transport_weight1-num_couplings8-caaL22-bfloat16.json"
    assert result_path(tmp_path, result) == tmp_path / name


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
    from bench.replies import Mismatch, backfill

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
    earlier = copy.deepcopy(result)  # as written before the protocol recorded replies
    for run in earlier["runs"]["caa"]:
        for key in ("repetition", "replies", "base_repetition", "base_replies"):
            del run[key]
    assert backfill(default_lm, earlier) == result
    earlier["runs"]["caa"][0]["nll"][0][1] += 1.0  # a curve these replies did not make
    with pytest.raises(Mismatch, match="alpha 4"):
        backfill(default_lm, earlier)
