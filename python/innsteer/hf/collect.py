"""Contrastive activations: the residual-stream output of decoder layer L (HF ``hidden_states[L+1]``)
for the behavior-matching vs the non-matching answer of each A/B item.

Two modes:
- ``"letter"`` (CAA): the prompt, then the assistant turn opening with ``(X)``; the activation at
  the token(s) holding the letter X.
- ``"answer"``: the prompt, then the option's own text as the assistant's reply; the mean over the
  tokens of that text.
One forward pass serves several layers (for layer sweeps) and stops after the deepest one.
Results are cached as safetensors keyed by model, behavior, split, mode, layer and item content.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor
from tqdm.auto import tqdm

from ..core.errors import ConfigError
from ..datasets.ab import ABItem
from .encoding import encode_spans
from .models import LoadedModel, cache_dir, check_layer, decoder_layers
from .prompts import ab_prompt

MODES = ("letter", "answer")


class _StopForward(Exception):
    """Raised by the capture hook of the deepest wanted layer: the rest of the model is not needed."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown activation mode '{mode}'; choose one of: {', '.join(MODES)}")
    return mode


def answer_text(tokenizer, item: ABItem, letter: str, mode: str) -> tuple[str, tuple[int, int]]:
    """The full text for one answer and the character span whose tokens give its activation."""
    prompt = ab_prompt(tokenizer, item)
    if check_mode(mode) == "letter":
        return prompt + f"({letter})", (len(prompt) + 1, len(prompt) + 2)
    reply = item.options[letter]
    return prompt + reply, (len(prompt), len(prompt) + len(reply))


def layer_outputs(
    model,
    tokenizer,
    texts: Sequence[str],
    spans: Sequence[tuple[int, int]],
    layers: Iterable[int],
    *,
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "activations",
) -> dict[int, Tensor]:
    """Mean over each span's tokens of decoder layer outputs: {layer: [len(texts), hidden]} (float32)."""
    layers = sorted({check_layer(model, layer) for layer in layers})
    blocks = decoder_layers(model)
    captured: dict[int, Tensor] = {}

    def capture(layer):
        def hook(module, args, output):
            captured[layer] = output[0] if isinstance(output, tuple) else output
            if layer == layers[-1]:
                raise _StopForward

        return hook

    # Longest first, batched by length: little padding, and memory problems show up at once.
    order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
    result = {layer: torch.empty(len(texts), model.get_input_embeddings().weight.shape[1]) for layer in layers}
    handles = [blocks[layer].register_forward_hook(capture(layer)) for layer in layers]
    try:
        with torch.inference_mode():
            for start in tqdm(range(0, len(order), batch_size), desc=desc, disable=not progress, unit="batch"):
                idx = order[start : start + batch_size]
                batch = encode_spans(tokenizer, [texts[i] for i in idx], [spans[i] for i in idx])
                try:
                    model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, use_cache=False)
                except _StopForward:
                    pass
                weights = batch.span_mask().float()
                weights /= weights.sum(1, keepdim=True)
                for layer in layers:
                    result[layer][idx] = torch.einsum("bt,btd->bd", weights, captured[layer].float())
    finally:
        for handle in handles:
            handle.remove()
    return result


def _cache_path(model_id: str, behavior: str, split: str, mode: str, layer: int, key: str) -> Path:
    return cache_dir() / "activations" / model_id / f"{behavior}-{split}-{mode}-L{layer}-{key}.safetensors"


def contrastive_activations(
    lm: LoadedModel,
    items: Sequence[ABItem],
    layers: int | Iterable[int],
    *,
    mode: str = "answer",
    behavior: str = "",
    split: str = "",
    batch_size: int = 16,
    use_cache: bool = True,
    progress: bool = True,
) -> dict[int, tuple[Tensor, Tensor]]:
    """{layer: (pos [N, d], neg [N, d])} for the matching / non-matching answers of ``items``.

    Cached on disk when ``use_cache`` (key: model id, behavior, split, mode, layer, a hash of the texts).
    """
    check_mode(mode)
    if not items:
        raise ValueError("contrastive_activations needs at least one item")
    single = isinstance(layers, int)
    layers = sorted({check_layer(lm.model, layer) for layer in ([layers] if single else layers)})
    pairs = [answer_text(lm.tokenizer, item, item.matching, mode) for item in items] + [
        answer_text(lm.tokenizer, item, item.not_matching, mode) for item in items
    ]
    texts, spans = [p[0] for p in pairs], [p[1] for p in pairs]
    key = hashlib.sha256("\x00".join(f"{t}\x01{s}" for t, s in zip(texts, spans)).encode()).hexdigest()[:12]
    paths = {
        layer: _cache_path(lm.model_id, behavior or "custom", split or "items", mode, layer, key) for layer in layers
    }
    out: dict[int, tuple[Tensor, Tensor]] = {}
    if use_cache:
        for layer, path in paths.items():
            if path.is_file():
                tensors = load_file(path)
                out[layer] = (tensors["pos"], tensors["neg"])
    missing = [layer for layer in layers if layer not in out]
    if missing:
        acts = layer_outputs(
            lm.model,
            lm.tokenizer,
            texts,
            spans,
            missing,
            batch_size=batch_size,
            progress=progress,
            desc=f"{behavior or 'items'} {mode} L{','.join(map(str, missing))}",
        )
        n = len(items)
        for layer in missing:
            pos, neg = acts[layer][:n].contiguous(), acts[layer][n:].contiguous()
            out[layer] = (pos, neg)
            if use_cache:
                paths[layer].parent.mkdir(parents=True, exist_ok=True)
                tmp = paths[layer].with_suffix(".tmp")
                save_file(
                    {"pos": pos, "neg": neg},
                    str(tmp),
                    metadata={
                        "model_id": lm.model_id,
                        "behavior": behavior,
                        "split": split,
                        "mode": mode,
                        "layer": str(layer),
                        "n_items": str(n),
                    },
                )
                os.replace(tmp, paths[layer])  # atomic: concurrent runs never read half a file
    return out
