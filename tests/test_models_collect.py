"""Model loading, decoder-layer discovery, token positions and contrastive activation collection."""

import copy
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from tiny_models import tiny_lm

from innsteer.core.hooks import check_layer, decoder_layers
from innsteer.datasets.caa import load_ab
from innsteer.hf import collect
from innsteer.hf.collect import answer_text, contrastive_activations
from innsteer.hf.encoding import encode_spans
from innsteer.hf.models import LoadedModel, ModelLoadError, load_model, model_id_for
from innsteer.hf.prompts import format_prompt

BEHAVIOR = "corrigible-neutral-HHH"


def _tiny(arch: str):
    """A random-weight model of the given family (shapes only; never evidence of steering quality)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(
        arch,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        vocab_size=128,
    )
    return AutoModelForCausalLM.from_config(config)


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gemma", "gemma2"])
def test_decoder_layers_found_by_structure(arch):
    model = _tiny(arch)
    layers = decoder_layers(model)
    assert len(layers) == 3
    assert type(layers[0]).__name__.endswith("DecoderLayer")
    # each found layer's output is HF's hidden_states[L + 1] (checked on a middle layer)
    seen = {}
    handle = layers[1].register_forward_hook(
        lambda m, a, out: seen.setdefault("h", out[0] if isinstance(out, tuple) else out)
    )
    with torch.no_grad():
        hs = model(input_ids=torch.arange(10)[None], output_hidden_states=True).hidden_states
    handle.remove()
    torch.testing.assert_close(seen["h"], hs[2])


def test_check_layer_range():
    model = _tiny("llama")
    assert check_layer(model, 2) == 2 and check_layer(model, -1) == 2
    with pytest.raises(ValueError, match="layer 3 is out of range: this model has 3 decoder layers"):
        check_layer(model, 3)


def test_default_model_and_bad_paths(default_lm, tmp_path):
    assert default_lm.model_id == "SmolLM2-135M-Instruct.Q4_1"
    assert default_lm.num_layers == 30 and default_lm.hidden_size == 576
    assert not default_lm.model.training
    with pytest.raises(ModelLoadError, match="neither"):
        load_model(str(tmp_path / "missing"))
    (tmp_path / "weights.bin").write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        load_model(str(tmp_path / "weights.bin"))
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(str(tmp_path))
    assert model_id_for(tmp_path / "m.gguf") == "m"


def test_letter_and_answer_positions_smollm2(default_lm):
    tok = default_lm.tokenizer
    item = load_ab(BEHAVIOR, "test_ab")[0]
    text, span = answer_text(tok, item, "B", "letter")
    assert text.endswith("<|im_start|>assistant\n(B)") and text[span[0] : span[1]] == "B"
    batch = encode_spans(tok, [text], [span])
    ids = batch.input_ids[0]
    # SmolLM2 splits "(B" into "(" + "B": the letter token is its own, right after "("
    assert batch.span_end[0] - batch.span_start[0] == 1
    assert tok.decode(ids[batch.span_start[0]]) == "B" and tok.decode(ids[batch.span_start[0] - 1]) == "("
    text, span = answer_text(tok, item, item.matching, "answer")
    batch = encode_spans(tok, [text], [span])
    covered = tok.decode(batch.input_ids[0, batch.span_start[0] : batch.span_end[0]])
    assert covered == item.matching_text
    assert text.startswith(format_prompt(tok, item.question))


def test_letter_position_with_a_single_paren_letter_token(default_lm):
    """Qwen2.5-style tokenizers hold "(A" as one token: the letter position is that token."""
    tok = default_lm.tokenizer
    from transformers import AutoTokenizer

    qwenish = AutoTokenizer.from_pretrained(tok.name_or_path)
    qwenish.add_tokens(["(A", "(B"])
    item = load_ab(BEHAVIOR, "test_ab")[0]
    text, span = answer_text(qwenish, item, "A", "letter")
    batch = encode_spans(qwenish, [text], [span])
    token = batch.input_ids[0, batch.span_start[0]]
    assert batch.span_end[0] - batch.span_start[0] == 1 and qwenish.convert_ids_to_tokens(int(token)) == "(A"


def _reference_activation(lm, text, span, layer):
    """Unbatched, unpadded hidden_states[layer + 1] averaged over the span's tokens."""
    batch = encode_spans(lm.tokenizer, [text], [span])
    with torch.no_grad():
        hs = lm.model(input_ids=batch.input_ids, output_hidden_states=True).hidden_states[layer + 1][0]
    return hs[batch.span_start[0] : batch.span_end[0]].mean(0)


@pytest.mark.parametrize("mode", ["letter", "answer"])
def test_activations_match_unbatched_hidden_states(default_lm, mode, tmp_path, monkeypatch):
    monkeypatch.setenv("INNSTEER_CACHE", str(tmp_path))
    items = load_ab(BEHAVIOR, "generate", limit=5)  # questions of different lengths: padding in the batch
    acts = contrastive_activations(
        default_lm, items, [3, 10], mode=mode, behavior=BEHAVIOR, split="generate", batch_size=4, progress=False
    )
    assert sorted(acts) == [3, 10]
    for layer in (3, 10):
        pos, neg = acts[layer]
        assert pos.shape == neg.shape == (5, 576) and pos.dtype == torch.float32
    for i in (0, 3):
        for letter, rows in ((items[i].matching, acts[10][0]), (items[i].not_matching, acts[10][1])):
            text, span = answer_text(default_lm.tokenizer, items[i], letter, mode)
            torch.testing.assert_close(rows[i], _reference_activation(default_lm, text, span, 10), atol=1e-3, rtol=1e-4)
    # cached on disk, keyed by model, behavior, split, mode, reduction and layer; the second call reads it back
    files = sorted(p.name for p in (tmp_path / "activations" / default_lm.model_id).iterdir())
    assert len(files) == 2 and all(f.startswith(f"{BEHAVIOR}-generate-{mode}-mean-L") for f in files)
    again = contrastive_activations(
        default_lm, items, 10, mode=mode, behavior=BEHAVIOR, split="generate", progress=False
    )
    assert torch.equal(again[10][0], acts[10][0])


def test_activations_of_another_dtype_are_cached_apart(default_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("INNSTEER_CACHE", str(tmp_path))
    half = LoadedModel(copy.deepcopy(default_lm.model).to(torch.bfloat16), default_lm.tokenizer, default_lm.model_id)
    items = load_ab(BEHAVIOR, "generate", limit=3)
    common = dict(mode="answer", behavior=BEHAVIOR, split="generate", progress=False)
    half_pos = contrastive_activations(half, items, 10, **common)[10][0]
    pos = contrastive_activations(default_lm, items, 10, **common)[10][0]
    text, span = answer_text(default_lm.tokenizer, items[0], items[0].matching, "answer")
    reference = _reference_activation(default_lm, text, span, 10)
    # the float32 model's rows are computed afresh, not the bfloat16 model's rows read back
    assert (half_pos[0] - reference).abs().max() > 1e-2
    torch.testing.assert_close(pos[0], reference, atol=1e-3, rtol=1e-4)
    folders = sorted(p.name for p in (tmp_path / "activations").iterdir())
    assert folders == [default_lm.model_id, f"{default_lm.model_id}-bfloat16"]


def _reference_span_rows(lm, text, span, layer):
    """Unbatched, unpadded hidden_states[layer + 1] at each of the span's tokens."""
    batch = encode_spans(lm.tokenizer, [text], [span])
    with torch.no_grad():
        hs = lm.model(input_ids=batch.input_ids, output_hidden_states=True).hidden_states[layer + 1][0]
    return hs[batch.span_start[0] : batch.span_end[0]]


def test_last_and_every_token_reductions_match_unbatched_hidden_states(default_lm, tmp_path, monkeypatch):
    monkeypatch.setenv("INNSTEER_CACHE", str(tmp_path))
    items = load_ab(BEHAVIOR, "generate", limit=4)
    common = dict(mode="answer", behavior=BEHAVIOR, split="generate", batch_size=3, progress=False)
    last_pos, last_neg = contrastive_activations(default_lm, items, 10, tokens="last", **common)[10]
    refs = {
        (i, side): _reference_span_rows(default_lm, *answer_text(default_lm.tokenizer, item, letter, "answer"), 10)
        for i, item in enumerate(items)
        for side, letter in (("pos", item.matching), ("neg", item.not_matching))
    }
    for i in range(len(items)):
        torch.testing.assert_close(last_pos[i], refs[i, "pos"][-1], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(last_neg[i], refs[i, "neg"][-1], atol=1e-3, rtol=1e-4)
    pos, neg = contrastive_activations(default_lm, items, 10, tokens="all", seed=3, **common)[10]
    all_pos = torch.cat([refs[i, "pos"] for i in range(len(items))])
    all_neg = torch.cat([refs[i, "neg"] for i in range(len(items))])
    n = min(len(all_pos), len(all_neg))
    assert pos.shape == neg.shape == (n, 576) and len(all_pos) != len(all_neg)  # the larger class subsampled
    for rows, reference in ((pos, all_pos), (neg, all_neg)):
        # every row is one of the class's token states (a subsample keeps rows, never mixes them)
        distance = torch.cdist(rows, reference).min(1).values
        assert distance.max() < 1e-2 * reference.norm(dim=1).min()
    assert torch.equal(contrastive_activations(default_lm, items, 10, tokens="all", seed=3, **common)[10][0], pos)


def test_overlapping_splits_run_each_text_through_the_model_once(tmp_path, monkeypatch):
    monkeypatch.setenv("INNSTEER_CACHE", str(tmp_path))
    lm = tiny_lm(layers=3)
    forwarded = []
    span_activations = collect.span_activations

    def counting(model, tokenizer, texts, *args, **kwargs):
        forwarded.append(list(texts))
        return span_activations(model, tokenizer, texts, *args, **kwargs)

    monkeypatch.setattr(collect, "span_activations", counting)
    items = load_ab(BEHAVIOR, "generate", limit=9)
    common = dict(mode="answer", tokens="all", behavior=BEHAVIOR, batch_size=4, seed=1, progress=False)
    contrastive_activations(lm, items[:6], [1, 2], split="s0", **common)
    folder = tmp_path / "activations" / lm.model_id
    (folder / f"{BEHAVIOR}-s9-answer-all-L2-000000000000.safetensors").write_bytes(b"damaged")  # skipped
    forwarded.clear()
    second = contrastive_activations(lm, items[3:], [1, 2], split="s1", **common)
    new = {answer_text(lm.tokenizer, item, letter, "answer")[0] for item in items[6:] for letter in "AB"}
    assert len(forwarded) == 1 and set(forwarded[0]) == new  # the three items the first split lacked
    fresh = contrastive_activations(lm, items[3:], [1, 2], use_cache=False, **common)
    for layer in (1, 2):
        for got, want in zip(second[layer], fresh[layer]):
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)  # other batches: rounding only
    forwarded.clear()
    again = contrastive_activations(lm, items[3:], 2, split="s1", **common)
    assert forwarded == [] and all(torch.equal(a, b) for a, b in zip(again[2], second[2]))
    # a file of the layout before (pos and neg, no texts kept apart) still serves its own split
    (own,) = folder.glob(f"{BEHAVIOR}-s1-answer-all-L2-*.safetensors")
    save_file({"pos": torch.zeros(3, 32), "neg": torch.ones(3, 32)}, str(own))
    older = contrastive_activations(lm, items[3:], 2, split="s1", **common)
    assert forwarded == [] and torch.equal(older[2][0], torch.zeros(3, 32))


class _SavesConfig:
    def __init__(self, marker: str):
        self.marker = marker
        self.config = object()
        self.hf_quantizer = "gguf"

    def save_pretrained(self, directory):
        (Path(directory) / "config.json").write_text(self.marker)


def test_dequantize_cache_written_by_another_process_first_is_used(tmp_path, monkeypatch):
    """Two runs started together both dequantize the GGUF; the one that renames second finds the
    other's complete copy in place and uses it instead of failing ("Directory not empty")."""
    import transformers

    from innsteer.hf import models

    target = tmp_path / "models" / "m-key"
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", lambda *a, **k: _SavesConfig("tokenizer"))

    def from_pretrained(*args, **kwargs):
        # the other process finishes while this one is dequantizing
        target.mkdir(parents=True)
        (target / "config.json").write_text("the other copy")
        return _SavesConfig("this copy")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", from_pretrained)
    models._dequantize_gguf_to_cache(tmp_path / "m.gguf", target)
    assert (target / "config.json").read_text() == "the other copy"
    assert [p.name for p in target.parent.iterdir()] == ["m-key"]  # this one's temporary copy is gone

    # a target that exists but holds no model is still an error
    broken = tmp_path / "models" / "broken"
    broken.mkdir()
    (broken / "partial").write_text("")
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", lambda *a, **k: _SavesConfig("x"))
    with pytest.raises(OSError):
        models._dequantize_gguf_to_cache(tmp_path / "m.gguf", broken)
