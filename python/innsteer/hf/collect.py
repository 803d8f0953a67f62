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
texts' hash, with each text's rows under its own key, so that overlapping splits (the seeds' training
parts of one item set) run each text through the model once.
"""

from __future__ import annotations

import glob
import hashlib
import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Optional

import safetensors
import torch
from safetensors import safe_open
from safetensors.torch import save_file
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


def _text_keys(labels: Sequence[str]) -> Tensor:
    """One int64 per text-and-span label: its activations' identity in the cache, whatever split holds it."""
    digests = [hashlib.sha256(label.encode()).digest()[:8] for label in labels]
    return torch.tensor([int.from_bytes(d, "little", signed=True) for d in digests], dtype=torch.int64)


def _read_cached(path: Path, wanted: set[int]) -> dict[int, Tensor]:
    """{text key: its rows} for the ``wanted`` keys a cache file holds; {} for a file that is
    damaged, of an older layout or holds none of them (a cache is never trusted to be whole)."""
    try:
        with safe_open(str(path), "pt") as f:
            if not {"rows", "counts", "keys"} <= set(f.keys()):
                return {}
            keys, counts = f.get_tensor("keys"), f.get_tensor("counts")
            if keys.shape != counts.shape or not wanted & set(keys.tolist()):
                return {}
            rows = f.get_tensor("rows")
    except (OSError, ValueError, RuntimeError, safetensors.SafetensorError):
        return {}
    if rows.ndim != 2 or int(counts.sum()) != len(rows) or bool((counts < 0).any()):
        return {}
    found: dict[int, Tensor] = {}
    for key, piece in zip(keys.tolist(), torch.split(rows, counts.tolist())):
        if key in wanted:
            found.setdefault(key, piece)
    return found


def _read_pair(path: Path) -> Optional[tuple[Tensor, Tensor]]:
    """(pos, neg) from a cache file of the layout before texts were kept apart; None otherwise."""
    try:
        with safe_open(str(path), "pt") as f:
            return (f.get_tensor("pos"), f.get_tensor("neg")) if set(f.keys()) == {"pos", "neg"} else None
    except (OSError, ValueError, RuntimeError, safetensors.SafetensorError):
        return None


def contrast_activations(
    lm: LoadedModel,
    texts: Sequence[str],
    spans: Sequence[tuple[int, int]],
    layers: Sequence[int],
    *,
    tokens: str,
    cache_name: str,
    reuse_prefix: str = "",
    use_cache: bool = True,
    batch_size: int = 16,
    progress: bool = True,
) -> dict[int, tuple[Tensor, Tensor]]:
    """{layer: (pos, neg)} from texts whose first half are positive and second half negative
    completions (``spans``: the completions' characters). Cached under ``cache_name`` and the texts'
    hash, and reused per text: a text that another cached file whose name starts with
    ``reuse_prefix`` holds (another seed's split of the same items) is read from it, and only the
    others run through the model (three seeds' splits cost about one pass, not three). Rows read
    from another file were computed in other batches: the same up to rounding."""
    n = len(texts) // 2
    labels = [f"{t}\x01{s}" for t, s in zip(texts, spans)]
    keys = _text_keys(labels)
    key_list = keys.tolist()
    wanted = set(key_list)
    name = f"{cache_name}-{tokens}"
    request = hashlib.sha256("\x00".join(labels).encode()).hexdigest()[:12]  # the file's name, as before
    paths = {layer: _cache_path(lm, name, layer, request) for layer in layers}
    found: dict[int, dict[int, Tensor]] = {layer: {} for layer in layers}
    out: dict[int, tuple[Tensor, Tensor]] = {}
    whole = set()  # the layers whose own cache file held every text
    if use_cache:
        for layer, path in paths.items():
            if (pair := _read_pair(path)) is not None:
                out[layer] = pair  # written before texts were kept apart: whole, but no use to other splits
                continue
            found[layer] = _read_cached(path, wanted)
            if len(found[layer]) == len(wanted):
                whole.add(layer)
                continue
            pattern = f"{glob.escape(reuse_prefix or cache_name)}*-{tokens}-L{layer}-*.safetensors"
            for other in sorted(path.parent.glob(pattern)):
                if other != path and len(found[layer]) < len(wanted):
                    found[layer].update(_read_cached(other, wanted - set(found[layer])))
    short = [layer for layer in layers if layer not in out and len(found[layer]) < len(wanted)]
    if short:
        # the texts some layer lacks, each once, through the model for every layer that lacks one
        todo: dict[int, int] = {}
        for i, key in enumerate(key_list):
            if key not in todo and any(key not in found[layer] for layer in short):
                todo[key] = i
        acts, owner = span_activations(
            lm.model,
            lm.tokenizer,
            [texts[i] for i in todo.values()],
            [spans[i] for i in todo.values()],
            short,
            tokens=tokens,
            batch_size=batch_size,
            progress=progress,
            desc=f"{cache_name} {tokens} L{','.join(map(str, short))} ({len(todo)} of {len(texts)} texts)",
        )
        counts = torch.bincount(owner, minlength=len(todo)).tolist()
        for layer in short:
            for key, piece in zip(todo, torch.split(acts[layer], counts)):
                found[layer].setdefault(key, piece)
    for layer in [layer for layer in layers if layer not in out]:
        pieces = [found[layer][key] for key in key_list]
        rows = torch.cat(pieces).contiguous()
        counts = torch.tensor([len(piece) for piece in pieces], dtype=torch.int64)
        split = int(counts[:n].sum())
        out[layer] = (rows[:split], rows[split:])
        if use_cache and layer not in whole:
            paths[layer].parent.mkdir(parents=True, exist_ok=True)
            tmp = paths[layer].with_suffix(f".{os.getpid()}.tmp")
            tensors = {"rows": rows, "counts": counts, "keys": keys}
            save_file(tensors, str(tmp), metadata={"model_id": lm.model_id, "layer": str(layer)})
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

    Cached on disk when ``use_cache`` (key: model id, behavior, split, mode, tokens, layer, a hash of
    the texts); a text another split of the behavior already holds is read from its file.
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
        reuse_prefix=f"{behavior or 'custom'}-",
        use_cache=use_cache,
        batch_size=batch_size,
        progress=progress,
    )
    if tokens == "all":
        return {layer: balance_classes(pos, neg, seed) for layer, (pos, neg) in acts.items()}
    return acts
