"""The batched scorer and fluency paths compute what ABScorer and generate + reply_nll compute."""

import pytest
import torch

from innsteer.core.methods import fit_caa
from innsteer.datasets.ab import METRICS
from innsteer.datasets.caa import load_ab
from innsteer.datasets.files import NEUTRAL_PROMPTS
from innsteer.eval.batched import BatchedFluency, BatchedScorer
from innsteer.eval.metrics import ABScorer, generate, reply_nll
from innsteer.hf.collect import contrastive_activations

pytestmark = pytest.mark.slow
BEHAVIOR = "corrigible-neutral-HHH"


@pytest.fixture(scope="module")
def caa(default_lm):
    pos, neg = contrastive_activations(default_lm, load_ab(BEHAVIOR, "generate", limit=24), 10, progress=False)[10]
    return fit_caa(pos, neg, layer=10)


@pytest.mark.parametrize("alpha", [0.0, 3.0, -3.0])
def test_batched_scores_equal_abscorer(default_lm, caa, alpha):
    items = load_ab(BEHAVIOR, "test_ab", limit=7)  # 28 continuations in groups of 5: a partial last group
    reference = ABScorer(default_lm, items).scores(caa, alpha)
    batched = BatchedScorer(default_lm, items, group=5).scores(caa, alpha)
    for metric in METRICS:
        torch.testing.assert_close(batched[metric], reference[metric], atol=2e-4, rtol=0)


def test_layers_below_the_steer_are_replayed_and_rerecorded_for_another_layer(default_lm, caa):
    items = load_ab(BEHAVIOR, "test_ab", limit=5)
    reference, batched = ABScorer(default_lm, items), BatchedScorer(default_lm, items, group=6)
    pos, neg = contrastive_activations(default_lm, load_ab(BEHAVIOR, "generate", limit=24), 4, progress=False)[4]
    other = fit_caa(pos, neg, layer=4)
    for steerer in (caa, other, caa):
        expected = reference.scores(steerer, 2.0)
        got = batched.scores(steerer, 2.0)
        assert batched._replay == steerer.layer  # the replayed pass equalled the full pass exactly
        for metric in METRICS:
            torch.testing.assert_close(got[metric], expected[metric], atol=2e-4, rtol=0)


@pytest.mark.parametrize("alpha", [0.0, 4.0])
def test_batched_fluency_equals_generate_and_reply_nll(default_lm, caa, alpha):
    prompts = list(NEUTRAL_PROMPTS[:3])
    _, prompt_ids, reply_ids = generate(default_lm, prompts, steerer=caa, alpha=alpha, max_new_tokens=12)
    nll, tokens, replies = BatchedFluency(default_lm, prompts, max_new_tokens=12)(caa, alpha)
    assert all(torch.equal(a, b) for a, b in zip(replies, reply_ids))
    for i in range(len(prompts)):
        total, count = reply_nll(default_lm, prompt_ids[i : i + 1], reply_ids[i : i + 1])
        assert tokens[i] == count
        assert nll[i].item() == pytest.approx(total, rel=1e-4, abs=1e-3)
