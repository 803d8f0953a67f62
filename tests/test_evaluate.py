"""Behaviour metrics against a full-recompute reference, steering raising them, fluency, trade-offs."""

from contextlib import nullcontext

import pytest
import torch

from innsteer.core.hooks import steering
from innsteer.core.methods import fit_caa
from innsteer.datasets.caa import load_ab, load_open_ended
from innsteer.eval.metrics import ABScorer, fluency, generate, multiple_choice_sanity, repetition, reply_nll
from innsteer.hf.collect import contrastive_activations
from innsteer.hf.encoding import encode_spans
from innsteer.hf.prompts import format_prompt

BEHAVIOR = "corrigible-neutral-HHH"
LAYER = 10


@pytest.fixture(scope="module")
def train_items():
    return load_ab(BEHAVIOR, "generate", limit=24)


@pytest.fixture(scope="module")
def caa(default_lm, train_items):
    pos, neg = contrastive_activations(
        default_lm, train_items, LAYER, mode="answer", behavior=BEHAVIOR, split="generate", progress=False
    )[LAYER]
    return fit_caa(pos, neg, layer=LAYER)


def _reference_logprob(lm, item, continuation, steerer=None, alpha=0.0):
    """Sum of log-probs of the continuation: whole text, no cache, steered from the last prompt token."""
    prompt = format_prompt(lm.tokenizer, item.question)
    batch = encode_spans(lm.tokenizer, [prompt + continuation], [(len(prompt), len(prompt) + len(continuation))])
    start, end = int(batch.span_start[0]), int(batch.span_end[0])
    ctx = (
        steering(lm.model, steerer, alpha=alpha, positions="after_prompt", prompt_length=start)
        if steerer is not None
        else nullcontext()
    )
    with torch.no_grad(), ctx:
        logits = lm.model(input_ids=batch.input_ids).logits[0]
    logp = torch.log_softmax(logits[:-1], -1).gather(-1, batch.input_ids[0, 1:, None])[:, 0]
    return float(logp[start - 1 : end - 1].sum()), end - start


def test_scorer_matches_full_recompute(default_lm, caa):
    items = load_ab(BEHAVIOR, "test_ab", limit=2)
    scorer = ABScorer(default_lm, items)
    for steerer, alpha in ((None, None), (caa, 3.0)):
        got = scorer.scores(steerer, alpha)
        for i, item in enumerate(items):
            m, nm = (
                _reference_logprob(default_lm, item, t, steerer, alpha or 0)
                for t in (item.matching_text, item.not_matching_text)
            )
            expected = torch.sigmoid(torch.tensor(m[0] / m[1] - nm[0] / nm[1]))
            torch.testing.assert_close(got["answer"][i], expected, atol=2e-4, rtol=0)
            lm_, lnm = (
                _reference_logprob(default_lm, item, f"({letter}", steerer, alpha or 0)[0]
                for letter in (item.matching, item.not_matching)
            )
            torch.testing.assert_close(got["letter"][i], torch.sigmoid(torch.tensor(lm_ - lnm)), atol=2e-4, rtol=0)


def test_steering_raises_the_behaviour_on_training_items(default_lm, caa, train_items):
    scorer = ABScorer(default_lm, train_items[:12], ("answer",))
    base = float(scorer.scores()["answer"].mean())
    up = float(scorer.scores(caa, 2.0)["answer"].mean())
    assert up > base + 0.05, (base, up)


def test_sanity_item_reports_both_orders(default_lm):
    sanity = multiple_choice_sanity(default_lm)
    assert len(sanity["p_correct_letter"]) == len(sanity["p_correct_answer"]) == 2
    assert sanity["letter_ok"] == all(p > 0.5 for p in sanity["p_correct_letter"])
    # the answer-text metric does not depend on the option order (same texts, same prompt modulo order)
    assert all(0 < p < 1 for p in sanity["p_correct_answer"])


def test_fluency_scores_replies_with_the_unsteered_model(default_lm, caa):
    questions = load_open_ended(BEHAVIOR, limit=2)
    texts, prompt_ids, reply_ids = generate(default_lm, questions, max_new_tokens=8)
    assert len(texts) == 2 and all(0 < len(r) <= 8 for r in reply_ids)
    total, count = reply_nll(default_lm, prompt_ids, reply_ids)
    ref = 0.0
    for p, r in zip(prompt_ids, reply_ids):  # one text at a time, full logits
        with torch.no_grad():
            logits = default_lm.model(input_ids=torch.cat([p, r])[None]).logits[0]
        logp = torch.log_softmax(logits, -1)
        ref -= sum(float(logp[len(p) - 1 + k, t]) for k, t in enumerate(r.tolist()))
    assert count == sum(len(r) for r in reply_ids) and total == pytest.approx(ref, rel=1e-4)
    plain = fluency(default_lm, questions, max_new_tokens=8)
    steered = fluency(default_lm, questions, steerer=caa, alpha=8.0, max_new_tokens=8)
    assert steered["nll"] > plain["nll"]  # a strong push costs fluency
    assert plain["samples"] == texts
    assert plain["repetition"] == pytest.approx(sum(repetition(r.tolist()) for r in reply_ids) / len(reply_ids))
