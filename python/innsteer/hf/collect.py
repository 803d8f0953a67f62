"""Contrastive activations: the residual-stream output of decoder layer L (HF ``hidden_states[L+1]``)
at the tokens of a positive vs a negative completion.

Which completion (for CAA A/B items, ``mode``):
- ``"letter"`` (CAA): the prompt, then the assistant turn opening with ``(X)``; the token(s) holding X;
- ``"answer"``: the prompt, then the option's own text as the assistant's reply.
Which tokens give the activation (``tokens``):
- ``"mean"``: one row per completion, the mean over its tokens;
- ``"last"``: one row per completion, its last token;
- ``"all"``: one row per completion token. Steering acts on every position after the prompt,
  so training on these rows trains on the distribution the steerer is applied to. The classes
  then have different row counts; ``contrastive_activations`` subsamples the larger one (seeded).
One forward pass serves several layers (for layer sweeps) and stops after the deepest one.
Results are cached as safetensors keyed by model (and its dtype), data, mode, reduction, layer and the
texts' hash.
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
from ..core.hooks import check_layer, decoder_layers
from ..datasets.ab import ABItem
from .encoding import encode_spans
from .models import LoadedModel, cache_dir
from .prompts import ab_prompt

MODES = ("letter", "answer")
TOKEN_CHOICES = ("mean", "last", "all")


class _StopForward(Exception):
    """Raised by the capture hook of the deepest wanted layer: the rest of the model is not needed."""


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ConfigError(f"unknown activation mode '{mode}'; choose one of: {', '.join(MODES)}")
    return mode


def check_tokens(tokens: str) -> str:
    if tokens not in TOKEN_CHOICES:
        raise ConfigError(f"unknown token choice '{tokens}'; choose one of: {', '.join(TOKEN_CHOICES)}")
    return tokens


def answer_text(tokenizer, item: ABItem, letter: str, mode: str) -> tuple[str, tuple[int, int]]:
    """The full text for one answer and the character span whose tokens give its activation."""
    prompt = ab_prompt(tokenizer, item)
    if check_mode(mode) == "letter":
        return prompt + f"({letter})", (len(prompt) + 1, len(prompt) + 2)
    reply = item.options[letter]
    return prompt + reply, (len(prompt), len(prompt) + len(reply))


def span_activations(
    model,
    tokenizer,
    texts: Sequence[str],
    spans: Sequence[tuple[int, int]],
    layers: Iterable[int],
    *,
    tokens: str = "mean",
    batch_size: int = 16,
    progress: bool = True,
    desc: str = "activations",
) -> tuple[dict[int, Tensor], Tensor]:
    """Decoder layer outputs at each text's span: ``({layer: rows [R, hidden]}, owner [R])`` (float32),
    ``owner[r]`` the text row r came from; rows in text order. ``tokens`` as in the module docstring."""
    check_tokens(tokens)
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
    per_text: dict[int, list] = {layer: [None] * len(texts) for layer in layers}
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
                mask = batch.span_mask()
                for layer in layers:
                    hidden = captured[layer].float()
                    for row, i in enumerate(idx):
                        rows = hidden[row, mask[row]]
                        if tokens == "mean":
                            rows = rows.mean(0, keepdim=True)
                        elif tokens == "last":
                            rows = rows[-1:]
                        per_text[layer][i] = rows
    finally:
        for handle in handles:
            handle.remove()
    counts = torch.tensor([len(rows) for rows in per_text[layers[0]]])
    owner = torch.repeat_interleave(torch.arange(len(texts)), counts)
    return {layer: torch.cat(rows) for layer, rows in per_text.items()}, owner


def balance_classes(pos: Tensor, neg: Tensor, seed: int = 0) -> tuple[Tensor, Tensor]:
    """Equal row counts (unpaired token rows): a seeded subsample of the larger class, in order."""
    n = min(len(pos), len(neg))
    generator = torch.Generator().manual_seed(seed)

    def take(rows: Tensor) -> Tensor:
        if len(rows) == n:
            return rows
        return rows[torch.randperm(len(rows), generator=generator)[:n].sort().values]

    return take(pos), take(neg)


def contrast_activations(
    lm: LoadedModel,
    texts: Sequence[str],
    spans: Sequence[tuple[int, int]],
    layers: Sequence[int],
    *,
    tokens: str,
    cache_name: str,
    use_cache: bool = True,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[int, tuple[Tensor, Tensor]]:
    """{layer: (pos, neg)} from texts whose first half are positive and second half negative
    completions (``spans``: the completions' characters). Cached under ``cache_name`` and the texts' hash."""
    n = len(texts) // 2
    key = hashlib.sha256("\x00".join(f"{t}\x01{s}" for t, s in zip(texts, spans)).encode()).hexdigest()[:12]
    paths = {layer: _cache_path(lm, f"{cache_name}-{tokens}", layer, key) for layer in layers}
    out: dict[int, tuple[Tensor, Tensor]] = {}
    if use_cache:
        for layer, path in paths.items():
            if path.is_file():
                tensors = load_file(path)
                out[layer] = (tensors["pos"], tensors["neg"])
    missing = [layer for layer in layers if layer not in out]
    if missing:
        acts, owner = span_activations(
            lm.model,
            lm.tokenizer,
            texts,
            spans,
            missing,
            tokens=tokens,
            batch_size=batch_size,
            progress=progress,
            desc=f"{cache_name} {tokens} L{','.join(map(str, missing))}",
        )
        for layer in missing:
            pos, neg = acts[layer][owner < n].contiguous(), acts[layer][owner >= n].contiguous()
            out[layer] = (pos, neg)
            if use_cache:
                paths[layer].parent.mkdir(parents=True, exist_ok=True)
                tmp = paths[layer].with_suffix(f".{os.getpid()}.tmp")
                save_file({"pos": pos, "neg": neg}, str(tmp), metadata={"model_id": lm.model_id, "layer": str(layer)})
                os.replace(tmp, paths[layer])  # atomic: concurrent runs never read half a file
    return out


def _cache_path(lm: LoadedModel, name: str, layer: int, key: str) -> Path:
    """The model's float32 activations under its id; another dtype's (a bfloat16 load) beside them,
    never mixed with them."""
    folder = lm.model_id if lm.dtype == "float32" else f"{lm.model_id}-{lm.dtype}"
    return cache_dir() / "activations" / folder / f"{name}-L{layer}-{key}.safetensors"


def contrastive_activations(
    lm: LoadedModel,
    items: Sequence[ABItem],
    layers: int | Iterable[int],
    *,
    mode: str = "answer",
    tokens: str = "mean",
    behavior: str = "",
    split: str = "",
    batch_size: int = 16,
    use_cache: bool = True,
    progress: bool = True,
    seed: int = 0,
) -> dict[int, tuple[Tensor, Tensor]]:
    """{layer: (pos, neg)} for the matching / non-matching answers of A/B ``items``: [N, d] each
    (paired by item) for ``tokens`` 'mean' / 'last'; for 'all', every answer token's row with the
    larger class subsampled to the smaller one's count (seeded by ``seed``; rows are not paired).

    Cached on disk when ``use_cache`` (key: model id, behavior, split, mode, tokens, layer, a hash of the texts).
    """
    check_mode(mode)
    check_tokens(tokens)
    if not items:
        raise ConfigError("contrastive_activations needs at least one item")
    single = isinstance(layers, int)
    layers = sorted({check_layer(lm.model, layer) for layer in ([layers] if single else layers)})
    pairs = [answer_text(lm.tokenizer, item, item.matching, mode) for item in items] + [
        answer_text(lm.tokenizer, item, item.not_matching, mode) for item in items
    ]
    acts = contrast_activations(
        lm,
        [p[0] for p in pairs],
        [p[1] for p in pairs],
        layers,
        tokens=tokens,
        cache_name=f"{behavior or 'custom'}-{split or 'items'}-{mode}",
        use_cache=use_cache,
        batch_size=batch_size,
        progress=progress,
    )
    if tokens == "all":
        return {layer: balance_classes(pos, neg, seed) for layer, (pos, neg) in acts.items()}
    return acts
