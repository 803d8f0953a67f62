"""The comparison protocol end to end on the default model, at a tiny size."""

import numpy as np
import pytest

from innsteer.datasets.caa import load_ab, load_open_ended
from innsteer.eval.protocol import MethodSpec, comparison_table, run_protocol

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
    # the same method fitted twice measures the same curve: seeds change the split, not the model
    assert result["runs"]["same"] == result["runs"]["caa"]
    # fitted on different splits, the seeds' CAA vectors differ, and so do their curves
    assert result["runs"]["caa"][0]["scores"] != result["runs"]["caa"][1]["scores"]
    for key, row in result["comparison"]["answer/toward"].items():
        assert row["low"] <= row["diff"] <= row["high"], key
    table = comparison_table([result])
    assert f"| {BEHAVIOR} | 10 | auc |" in table
