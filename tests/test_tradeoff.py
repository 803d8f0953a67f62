"""Trade-off summaries against a brute-force walk of the curve, and the paired bootstrap's intervals."""

from dataclasses import replace

import numpy as np
import pytest

from innsteer.eval.metrics import repetition
from innsteer.eval.results import Curve
from innsteer.eval.tradeoff import (
    REPETITION_GATE,
    budget_shift,
    curve_summary,
    mirrored,
    paired_bootstrap,
    seed_mean_summary,
    summarize,
)


def dense_budget_shift(costs, shifts, budget, steps=20001):
    """Independent reference: sample every segment of (0, 0) -> points densely, keep what fits."""
    xs, ys = [0.0, *costs], [0.0, *shifts]
    best = 0.0
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        t = np.linspace(0, 1, steps)
        x, y = x0 + t * (x1 - x0), y0 + t * (y1 - y0)
        if (x <= budget).any():
            best = max(best, float(y[x <= budget].max()))
    return best


@pytest.mark.parametrize("seed", range(20))
def test_budget_shift_matches_a_dense_walk_of_the_curve(seed):
    rng = np.random.default_rng(seed)
    costs = np.cumsum(rng.uniform(-0.2, 0.8, 5))  # fluency costs may dip below the unsteered model's
    shifts = rng.uniform(-0.1, 0.4, 5)
    for budget in (0.1, 0.25, 0.5, 1.0, 2.0):
        assert budget_shift(costs, shifts, budget) == pytest.approx(dense_budget_shift(costs, shifts, budget), abs=1e-3)


def test_summary_of_a_straight_line():
    # shift = 0.2 * cost: the shift at budget b is 0.2 b; the area on [0, 1] is 0.1
    summary = summarize([0.5, 1.0, 2.0], [0.1, 0.2, 0.4])
    assert summary == pytest.approx({"at0.25": 0.05, "at0.5": 0.1, "at1": 0.2, "auc": 0.1}, abs=1e-9)
    assert summarize([3.0], [0.5])["at1"] == pytest.approx(1 / 6)  # on the first segment, interpolated


def _run(rng, offset=0.0, n_items=50, n_prompts=10, symmetric=False):
    """A synthetic run: p_match moves linearly with alpha (``symmetric``: with |alpha|, the same on
    both sides, as a steer that only disrupts the model)."""
    alphas = [-4.0, -2.0, -1.0, 1.0, 2.0, 4.0]
    base = rng.uniform(0.3, 0.6, n_items)
    slope = 0.03 * np.array(alphas)
    if symmetric:
        slope = np.abs(slope)
    scores = base + slope[:, None] * (1 + offset) + rng.normal(0, 0.02, (6, n_items))
    tokens = np.full((6, n_prompts), 32.0)
    nll = tokens * (0.8 + 0.2 * np.abs(np.array(alphas))[:, None]) + rng.normal(0, 0.5, (6, n_prompts))
    return Curve(
        seed=0,
        alphas=alphas,
        scores={"answer": scores.tolist()},
        nll=nll.tolist(),
        tokens=tokens.tolist(),
        base_scores={"answer": base.tolist()},
        base_nll=(tokens[0] * 0.8).tolist(),
        base_tokens=tokens[0].tolist(),
        repetition=np.zeros((6, n_prompts)).tolist(),
        base_repetition=[0.0] * n_prompts,
    )


def test_paired_bootstrap_of_a_method_against_itself_is_zero():
    runs = [_run(np.random.default_rng(s)) for s in range(3)]
    result = paired_bootstrap(runs, runs, n_resamples=200)
    for summary in result.values():
        assert summary.diff == 0 and summary.low == 0 and summary.high == 0


def test_paired_bootstrap_finds_a_steeper_method_and_its_interval_excludes_zero():
    runs_b = [_run(np.random.default_rng(s)) for s in range(3)]
    runs_a = [_run(np.random.default_rng(s), offset=0.5) for s in range(3)]  # 1.5x the shift at each alpha
    result = paired_bootstrap(runs_a, runs_b, n_resamples=300)
    assert result["at1"].diff > 0.02 and result["at1"].low > 0
    assert result["at1"].low <= result["at1"].diff <= result["at1"].high
    away = paired_bootstrap(runs_a, runs_b, sign=-1, n_resamples=300)  # moving away from the behavior
    assert away["auc"].diff > 0 and away["auc"].low > 0


def test_repetition_counts_the_n_grams_that_repeat_earlier_ones():
    assert repetition([1, 2, 3, 4, 5, 6]) == 0.0
    assert repetition([7] * 7) == pytest.approx(1 - 1 / 4)  # four 4-grams, all the same
    assert repetition([1, 2, 1, 2, 1, 2], n=2) == pytest.approx(1 - 2 / 5)
    assert repetition([1, 2, 3]) == 0.0  # shorter than one 4-gram


def test_the_repetition_gate_ends_a_curve_before_its_first_degenerate_point():
    run = _run(np.random.default_rng(0), n_prompts=4)
    every_item, every_prompt = np.arange(50), np.arange(4)
    # alpha 2 loops on two of four prompts (mean repetition 0.5) and looks cheap; alpha 4 is clean again
    run.nll[4] = [0.8 * 32.0] * 4
    run.repetition[4] = [1.0, 1.0, 0.0, 0.0]
    ungated = curve_summary(run, every_item, every_prompt, 1, "answer", None)
    gated = curve_summary(run, every_item, every_prompt, 1, "answer", REPETITION_GATE)
    alone = {key: getattr(run, key)[3:4] for key in ("nll", "tokens", "repetition")}  # up to alpha 1 only
    up_to_1 = curve_summary(
        replace(run, **alone, alphas=[1.0], scores={"answer": run.scores["answer"][3:4]}),
        every_item,
        every_prompt,
        1,
        "answer",
        None,
    )
    assert gated == pytest.approx(up_to_1) and gated["auc"] < ungated["auc"]
    # the unsteered replies' own repetition is the reference: the same loops there pass the gate
    run.base_repetition = [1.0, 1.0, 0.0, 0.0]
    assert curve_summary(run, every_item, every_prompt, 1, "answer", REPETITION_GATE) == pytest.approx(ungated)
    run.repetition = None
    with pytest.raises(ValueError, match="repetition"):
        paired_bootstrap([run], [run], n_resamples=2)


def test_the_sample_alpha_stops_before_the_first_degenerate_point():
    from innsteer.eval.protocol import alpha_within_budget

    run = _run(np.random.default_rng(1), n_prompts=4)
    run.nll = (np.asarray(run.tokens) * 0.9).tolist()  # every point costs 0.1 nat/token
    assert alpha_within_budget(run, ["answer"]) == 4.0
    run.repetition[4] = [1.0] * 4  # alpha 2 loops
    assert alpha_within_budget(run, ["answer"]) == 1.0


def test_two_sided_check_tells_a_steer_from_a_disruption():
    steering = [_run(np.random.default_rng(s)) for s in range(3)]
    disrupting = [_run(np.random.default_rng(s), symmetric=True) for s in range(3)]
    steered = paired_bootstrap(steering, mirrored(steering), n_resamples=200)
    # the away side lowers p_match, so its rise is 0 and the check equals the toward area itself
    every_item, every_prompt = np.arange(50), np.arange(10)
    toward = seed_mean_summary(steering, every_item, every_prompt, 1, "answer", REPETITION_GATE)["auc"]
    assert steered["auc"].diff == pytest.approx(toward) and steered["auc"].low > 0
    disrupted = paired_bootstrap(disrupting, mirrored(disrupting), n_resamples=200)
    assert disrupted["auc"].a > 0.02  # it does raise p_match toward the behavior...
    assert abs(disrupted["auc"].diff) < 0.01 and disrupted["auc"].low < 0 < disrupted["auc"].high


def test_mirrored_flips_only_the_alphas():
    run = _run(np.random.default_rng(0))
    (flipped,) = mirrored([run])
    assert flipped.alphas == [-a for a in run.alphas] and flipped.scores is run.scores
    assert mirrored(mirrored([run]))[0].alphas == run.alphas
