"""The fork metric: each answer scored only at the first token where the two answers differ, after
the tokens they share, steered from the last prompt token as generation is. Checked against a
direct full-sequence computation, and for the property it exists for: what a text holds after the
fork cannot move it, however the steer acts on those states."""

from dataclasses import replace

import pytest
import torch
from tiny_models import tiny_lm

from innsteer.core.hooks import steering
from innsteer.core.methods import fit_caa, fit_innsteer
from innsteer.datasets.ab import ABItem
from innsteer.datasets.caa import load_ab
from innsteer.eval.batched import BatchedScorer
from innsteer.eval.metrics import ABScorer
from innsteer.hf.encoding import encode_spans
from innsteer.hf.prompts import ab_prompt


@pytest.fixture(scope="module")
def lm_and_steerers():
    lm = tiny_lm("llama", layers=4)
    pos, neg = contrastive_activations_of(lm)
    inn = fit_innsteer(pos, neg, layer=2, max_epochs=3, mlp_hidden=16, num_couplings=2)
    return lm, {"caa": fit_caa(pos, neg, layer=2), "innsteer": inn}


def contrastive_activations_of(lm):
    from innsteer.hf.collect import contrastive_activations

    items = load_ab("refusal", "generate", limit=8)
    return contrastive_activations(lm, items, 2, tokens="all", use_cache=False, progress=False)[2]


def reference_fork(lm, item: ABItem, steerer, alpha: float) -> float:
    """p_match at the fork: both answers tokenized whole, the first differing reply token found,
    one full forward pass over the shared tokens, steered from the last prompt token."""
    prompt = ab_prompt(lm.tokenizer, item)
    rows, starts = [], []
    for text in (item.matching_text, item.not_matching_text):
        batch = encode_spans(lm.tokenizer, [prompt + text], [(len(prompt), len(prompt) + len(text))])
        rows.append(batch.input_ids[0, : int(batch.attention_mask[0].sum())])
        starts.append(int(batch.span_start[0]))
    a, b = rows
    at = next(t for t in range(starts[0], min(len(a), len(b))) if a[t] != b[t])
    with (
        torch.inference_mode(),
        steering(lm.model, steerer, alpha=alpha, positions="after_prompt", prompt_length=starts[0]),
    ):
        logp = torch.log_softmax(lm.model(a[None, :at]).logits[0, -1].float(), -1)
    return float(torch.sigmoid(logp[a[at]] - logp[b[at]]))


@pytest.mark.parametrize("method", ["caa", "innsteer"])
def test_fork_equals_a_direct_computation(lm_and_steerers, method):
    lm, steerers = lm_and_steerers
    items = load_ab("refusal", "test_ab", limit=4)
    for alpha in (0.0, 3.0):
        expected = torch.tensor([reference_fork(lm, item, steerers[method], alpha) for item in items])
        scored = ABScorer(lm, items, ("answer", "fork")).scores(steerers[method], alpha)["fork"]
        batched = BatchedScorer(lm, items, ("answer", "fork"), group=3).scores(steerers[method], alpha)["fork"]
        torch.testing.assert_close(scored.float(), expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(batched.float(), expected, atol=1e-5, rtol=0)


def test_what_follows_the_fork_moves_the_answer_metric_not_the_fork(lm_and_steerers):
    lm, steerers = lm_and_steerers
    item = load_ab("refusal", "test_ab", limit=1)[0]
    other = replace(item, options={**item.options, item.not_matching: item.not_matching_text + " zq zq zq zq"})
    for steerer in steerers.values():
        first, second = (ABScorer(lm, [x], ("answer", "fork")).scores(steerer, 3.0) for x in (item, other))
        assert float(first["fork"][0]) == pytest.approx(float(second["fork"][0]), abs=1e-6)
        assert abs(float(first["answer"][0]) - float(second["answer"][0])) > 1e-4


def test_an_answer_that_begins_the_other_is_scored_whole():
    lm = tiny_lm("llama", layers=2)
    item = ABItem.plain("Is the sky blue?", "Yes", "Yes, it is")
    scores = ABScorer(lm, [item], ("answer", "fork")).scores()
    assert float(scores["fork"][0]) == pytest.approx(float(scores["answer"][0]), abs=1e-6)
