"""Steering hooks: positions, batched left-padded generate, clean detach, INN steerers through the ops."""

import pytest
import torch

from innsteer.core.flow import INN
from innsteer.core.hooks import decoder_layers, steering
from innsteer.core.steerers import INNSteerer, LinearSteerer

LAYER = 10


def _vector_steerer(dim=576, seed=0, scale=8.0):
    v = torch.randn(dim, generator=torch.Generator().manual_seed(seed))
    return LinearSteerer(v / v.norm() * scale, LAYER)


def _layer_outputs(model, ids, mask=None):
    """(what decoder layer LAYER passes on, i.e. the next layer's input; logits). HF's own
    hidden_states are recorded before user hooks run, so they would not show the steering."""
    seen = {}

    def grab(module, args, kwargs):
        seen["h"] = (args[0] if args else kwargs["hidden_states"]).clone()

    handle = decoder_layers(model)[LAYER + 1].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()
    return seen["h"], logits


@pytest.fixture(scope="module")
def ids(default_lm):
    return default_lm.tokenizer(
        ["The capital of France is Paris, and the capital of Spain is"], return_tensors="pt"
    ).input_ids


def test_all_positions_equal_steerer_on_unhooked_layer_output_and_detach_restores(default_lm, ids):
    model = default_lm.model
    before_h, before_logits = _layer_outputs(model, ids)
    steerer = _vector_steerer()
    with steering(model, steerer, alpha=1.0):
        steered_h, steered_logits = _layer_outputs(model, ids)
    torch.testing.assert_close(steered_h, before_h + steerer.vector)
    assert not torch.allclose(steered_logits, before_logits, atol=1e-3)
    after_h, after_logits = _layer_outputs(model, ids)
    assert torch.equal(after_logits, before_logits) and torch.equal(after_h, before_h)


def test_detach_on_exception(default_lm, ids):
    _, before = _layer_outputs(default_lm.model, ids)
    with pytest.raises(RuntimeError, match="boom"):
        with steering(default_lm.model, _vector_steerer(), alpha=1.0):
            raise RuntimeError("boom")
    assert torch.equal(_layer_outputs(default_lm.model, ids)[1], before)


def test_after_prompt_and_explicit_positions(default_lm, ids):
    model = default_lm.model
    base, _ = _layer_outputs(model, ids)
    n = ids.shape[1]
    with steering(model, _vector_steerer(), alpha=1.0, positions="after_prompt", prompt_length=n - 3):
        h, _ = _layer_outputs(model, ids)
    changed = (h - base).abs().amax(-1)[0] > 1e-4
    assert changed.tolist() == [p >= n - 4 for p in range(n)]
    with steering(model, _vector_steerer(), alpha=1.0, positions=[1, 5]):
        h, _ = _layer_outputs(model, ids)
    changed = (h - base).abs().amax(-1)[0] > 1e-4
    assert changed.nonzero()[:, 0].tolist() == [1, 5]
    with pytest.raises(ValueError, match="positions must be one of"):
        with steering(model, _vector_steerer(), positions="middle"):
            pass


def test_inn_steerer_goes_through_the_ops(default_lm, ids):
    """The hooked layer output equals the INN steerer (fused op) applied to the unhooked output."""
    model = default_lm.model
    base, _ = _layer_outputs(model, ids)
    inn = INN(576, num_couplings=2, mlp_hidden=32, seed=1)
    inn.fit_standardization(base[0, 1:])  # skip the massive-activation first row
    for p in inn.parameters():  # a non-identity flow
        torch.nn.init.normal_(p, std=0.02)
    steerer = INNSteerer(inn, torch.randn(576, generator=torch.Generator().manual_seed(2)), LAYER)
    with steering(model, steerer, alpha=0.5):
        h, _ = _layer_outputs(model, ids)
    with torch.no_grad():
        expected = torch.ops.innsteer.steer(base, None, steerer.direction, 0.5, *inn.flow_args())
    torch.testing.assert_close(h, expected)
    assert (h - base).abs().max() > 1e-3
    with steering(model, steerer, alpha=0.0):  # alpha 0: the identity, bit for bit
        assert torch.equal(_layer_outputs(model, ids)[0], base)


def test_hidden_size_mismatch_is_refused(default_lm):
    with pytest.raises(ValueError, match="hidden size 64"):
        with steering(default_lm.model, _vector_steerer(dim=64), alpha=1.0):
            pass
    with pytest.raises(ValueError, match="out of range"):
        with steering(default_lm.model, _vector_steerer(), layer=30):
            pass


def test_batched_left_padded_generate_matches_single_rows(default_lm):
    tok, model = default_lm.tokenizer, default_lm.model
    prompts = [
        tok.apply_chat_template([{"role": "user", "content": q}], tokenize=False, add_generation_prompt=True)
        for q in ("Name a fruit.", "Tell me something about the history of the city of Rome.")
    ]
    steerer = _vector_steerer(scale=60.0)

    def run(texts):
        tok.padding_side = "left"
        enc = tok(texts, return_tensors="pt", padding=True, add_special_tokens=False)
        with steering(model, steerer, alpha=1.0, positions="after_prompt"):
            out = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
        tok.padding_side = "right"
        return [row[enc.input_ids.shape[1] :].tolist() for row in out]

    batched = run(prompts)
    single = [run([p])[0] for p in prompts]
    assert batched == single
    enc = tok(prompts[:1], return_tensors="pt", add_special_tokens=False)
    plain = model.generate(**enc, max_new_tokens=6, do_sample=False, pad_token_id=tok.pad_token_id)
    assert plain[0, enc.input_ids.shape[1] :].tolist() != single[0]  # steering changed the reply
