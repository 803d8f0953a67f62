"""The batched scorer and fluency paths on tiny random models of other architectures than the
default model's: `innsteer tune` and `eval` run on whatever model a user brings, and these paths
pass caches, masks and positions by hand, so each layout is checked against the unbatched path."""

import numpy as np
import pytest
import torch
from tiny_models import tiny_lm

from innsteer.core.methods import fit_caa
from innsteer.datasets.ab import METRICS
from innsteer.datasets.caa import load_ab
from innsteer.eval.batched import BatchedFluency, BatchedScorer, length_groups
from innsteer.eval.metrics import ABScorer, generate, reply_nll
from innsteer.hf.collect import contrastive_activations

# rotary with and without GQA, sliding windows and logit softcapping (gemma2), learned absolute
# positions (gpt2), parallel attention and MLP (gpt_neox), QK norms (qwen3, olmo2), ALiBi with
# layers whose outputs the model indexes (bloom, mpt: the scorer's replay of the lower layers
# fails there, and the full pass must serve)
ARCHITECTURES = ["qwen2", "gemma2", "gemma3_text", "phi3", "olmo2", "qwen3", "gpt2", "gpt_neox", "bloom", "mpt"]


@pytest.fixture(params=ARCHITECTURES)
def lm_and_caa(request):
    lm = tiny_lm(request.param, layers=4)
    pos, neg = contrastive_activations(lm, load_ab("refusal", "generate", limit=8), 2, progress=False)[2]
    return lm, fit_caa(pos, neg, layer=2)


def test_batched_scores_equal_abscorer(lm_and_caa):
    lm, caa = lm_and_caa
    items = load_ab("refusal", "test_ab", limit=4)  # 16 continuations in groups of 3
    for alpha in (0.0, 3.0):
        reference = ABScorer(lm, items).scores(caa, alpha)
        batched = BatchedScorer(lm, items, group=3).scores(caa, alpha)
        for metric in METRICS:
            torch.testing.assert_close(batched[metric], reference[metric], atol=1e-5, rtol=0)


def test_batched_fluency_equals_generate_and_reply_nll(lm_and_caa):
    lm, caa = lm_and_caa
    prompts = ["Hello there, how are you?", "Tell me a story"]
    _, prompt_ids, reply_ids = generate(lm, prompts, steerer=caa, alpha=3.0, max_new_tokens=5)
    nll, tokens, replies = BatchedFluency(lm, prompts, max_new_tokens=5)(caa, 3.0)
    assert all(torch.equal(a, b) for a, b in zip(replies, reply_ids))
    for i in range(len(prompts)):
        total, count = reply_nll(lm, prompt_ids[i : i + 1], reply_ids[i : i + 1])
        assert tokens[i] == count and nll[i].item() == pytest.approx(total, rel=1e-4, abs=1e-4)


def test_length_groups_bound_the_padding_and_the_rows():
    assert length_groups([], 4) == []
    assert length_groups([3, 3, 3, 3, 3], 2) == [range(0, 2), range(2, 4), range(4, 5)]
    # 2, 2 then 10: padding the 2s to 10 would be 16 of 14 real tokens: a group of its own
    assert length_groups([2, 2, 10, 11], 64) == [range(0, 2), range(2, 4)]
    lengths = sorted(np.random.default_rng(0).integers(1, 120, 500).tolist())
    groups = length_groups(lengths, 64, waste=0.2)
    assert [i for g in groups for i in g] == list(range(500))  # every row once, in order
    for g in groups:
        real = sum(lengths[i] for i in g)
        assert len(g) <= 64 and lengths[g.stop - 1] * len(g) <= 1.2 * real
