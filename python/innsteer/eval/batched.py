"""Batched fast paths of the A/B scorer and the fluency measure, for alpha sweeps.

They compute what ``ABScorer.scores`` and ``generate`` + ``reply_nll`` compute (the tests compare
them), but many items or prompts per forward pass: steering acts from the last prompt token on,
so every prompt's unsteered prefix KV cache is computed once, left-padded into one batch (rotary
positions passed explicitly), and each call feeds only the steered positions. The LM head runs
only where a token is scored.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import replace
from typing import Optional

import torch
from torch import Tensor

from ..core.hooks import check_layer, decoder_layers, steering_unless_identity
from ..datasets.ab import METRICS, ABItem
from ..hf.models import LoadedModel
from ..hf.prompts import format_prompt, uses_chat_template, with_instruction
from .metrics import ABScorer


def _padded_cache(caches: Sequence, lengths: Sequence[int], width: int) -> list[tuple[Tensor, Tensor]]:
    """Per layer (K, V) [len(caches), heads, width, head_dim]: each row's prefix cache left-padded
    to ``width`` (one cache may serve several rows)."""
    out = []
    for layer in range(len(caches[0].layers)):
        first = caches[0].layers[layer].keys
        keys = first.new_zeros(len(caches), first.shape[1], width, first.shape[3])
        values = torch.zeros_like(keys)
        for row, (cache, n) in enumerate(zip(caches, lengths)):
            keys[row, :, width - n :] = cache.layers[layer].keys[0, :, :n]
            values[row, :, width - n :] = cache.layers[layer].values[0, :, :n]
        out.append((keys, values))
    return out


def length_groups(lengths: Sequence[int], most: int, waste: float = 0.2) -> list[range]:
    """Consecutive runs of ``lengths`` (sorted ascending), each at most ``most`` long and padded to
    its longest with padding at most ``waste`` of its real tokens. A fixed number of rows per group
    padded hallucination's answers half-empty (8784 tokens computed for 4531 scored on SmolLM2)."""
    groups, start, total = [], 0, 0
    for i, n in enumerate(lengths):
        size = i - start + 1
        if size > most or n * size > (1 + waste) * (total + n):
            groups.append(range(start, i))
            start, total = i, 0
        total += n
    if lengths:
        groups.append(range(start, len(lengths)))
    return groups


def _fresh_cache(kv: list[tuple[Tensor, Tensor]]):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=kv)  # update() concatenates into new tensors: kv is never mutated


@contextmanager
def _replaying_layers_up_to(model, layer: int, hidden: Tensor) -> Iterator[None]:
    """Inside: decoder layers 0..layer are not computed; layer ``layer`` returns ``hidden`` (its
    output, recorded from an unsteered pass over the same inputs) and the layers below pass their
    input through. Hooks on these layers still run, so steering at ``layer`` acts on ``hidden``.
    Their KV caches are never read: only the layers above attend, over their own caches."""
    layers = decoder_layers(model)[: layer + 1]
    for k, module in enumerate(layers):
        module.forward = (lambda h, *a, **kw: hidden) if k == layer else (lambda h, *a, **kw: h)
    try:
        yield
    finally:
        for module in layers:
            del module.forward  # back to the class's forward


class BatchedScorer:
    """``ABScorer(lm, items, metrics).scores`` with up to ``group`` continuations per forward pass
    (``instruction``: each question with it first, ``with_instruction``).

    Continuations (each item's matching and non-matching text per metric) are grouped by length
    (``length_groups``), so short letter continuations are not padded to long answers. Steering at
    layer L changes nothing below L on these fixed inputs, so the layers up to L run once per group
    and layer (unsteered, recording L's output) and every steered call computes only the layers
    above (``_replaying_layers_up_to``); the first use of a layer checks that this equals the full
    pass.
    """

    def __init__(
        self,
        lm: LoadedModel,
        items: Sequence[ABItem],
        metrics: Sequence[str] = METRICS,
        group: int = 64,
        instruction: Optional[str] = None,
    ):
        if instruction is not None:
            items = [replace(item, question=with_instruction(item.question, instruction)) for item in items]
        self.lm, self.metrics = lm, tuple(metrics)
        self.n_items, self.rows_per = len(items), 2 * len(self.metrics)  # per metric: matching, non-matching
        reference = ABScorer(lm, items, self.metrics)  # the same records and prefix caches
        records = reference._records
        rows = sorted(
            ((i, k) for i in range(len(items)) for k in range(self.rows_per)),
            key=lambda row: len(records[row[0]]["suffixes"][row[1]]),
        )
        # Each item's prefix cache is kept once, left-padded to the longest: a group's rows (an item
        # has 2 or 4) are gathered from it per call. Kept per row, the caches of long items took
        # gigabytes per scorer (hallucination's 50 test items: 2.2 GB on SmolLM2-135M).
        lengths = [len(record["prefix"]) for record in records]
        self.width = max(lengths)
        self.kv = _padded_cache([reference._prefix_cache(i) for i in range(len(items))], lengths, self.width)
        reference._caches = [None] * len(items)  # the padded copy is all that is kept
        pad = lm.tokenizer.pad_token_id
        self.groups = []
        for span in length_groups([len(records[i]["suffixes"][k]) for i, k in rows], group):
            members = rows[span.start : span.stop]
            prefix = [lengths[i] for i, _ in members]
            suffixes = [records[i]["suffixes"][k] for i, k in members]
            width, w = max(prefix), max(len(s) for s in suffixes)
            ids = torch.full((len(members), w), pad, dtype=torch.long)
            mask = torch.zeros((len(members), width + w), dtype=torch.long)
            pos = torch.zeros((len(members), w), dtype=torch.long)
            start = torch.tensor([int(records[i]["span_start"][k]) for i, k in members])
            steer_start = torch.tensor([int(records[i]["steer_start"][k]) for i, k in members])
            end = torch.tensor([int(records[i]["span_end"][k]) for i, k in members])
            wanted = torch.zeros((len(members), max(w - 1, 1)), dtype=torch.bool)
            for row, (suffix, p) in enumerate(zip(suffixes, prefix)):
                ids[row, : len(suffix)] = suffix
                mask[row, width - p : width + len(suffix)] = 1
                pos[row] = p + torch.arange(w)
                target = p + 1 + torch.arange(w - 1)  # absolute position of the token predicted at column j
                wanted[row, : w - 1] = (
                    (target >= start[row]) & (target < end[row]) & (torch.arange(w - 1) + 1 < len(suffix))
                )
            self.groups.append(
                {
                    "index": torch.tensor([i for i, _ in members]),  # each row's item and kind of continuation
                    "kinds": torch.tensor([k for _, k in members]),
                    "width": width,
                    "ids": ids,
                    "mask": mask,
                    "pos": pos,
                    "steer_start": steer_start,
                    "wanted": wanted,
                }
            )
        self._recorded_layer: Optional[int] = None  # the layer whose outputs the groups hold
        self._replay: Optional[int] = None  # that layer, if replaying it equals the full pass

    def _forward(self, g: dict, steerer, alpha, replay: Optional[int]) -> Tensor:
        """The group's last hidden states; ``replay``: the layer up to which recorded outputs stand in."""
        body = self.lm.model.get_decoder()
        replaying = nullcontext() if replay is None else _replaying_layers_up_to(self.lm.model, replay, g["lower"])
        with (
            replaying,
            steering_unless_identity(
                self.lm.model, steerer, alpha, positions="after_prompt", prompt_length=g["steer_start"]
            ),
        ):
            return body(
                input_ids=g["ids"],
                attention_mask=g["mask"],
                position_ids=g["pos"],
                cache=_fresh_cache(self._group_cache(g)),
                use_cache=True,
            ).last_hidden_state

    def _group_cache(self, g: dict) -> list[tuple[Tensor, Tensor]]:
        """The group's rows' prefix caches, left-padded to the group's longest prefix."""
        cut = self.width - g["width"]
        return [(keys[g["index"], :, cut:], values[g["index"], :, cut:]) for keys, values in self.kv]

    def _record_layer(self, layer: int) -> Optional[int]:
        """Record every group's output of ``layer`` (unsteered) and check the replay against the full
        pass: ``layer`` if they agree, else None (the full pass for every call at this layer)."""
        same = True
        for g in self.groups:
            recorded = []

            def record(module, args, output, into=recorded):
                into.append(output[0] if isinstance(output, tuple) else output)

            handle = decoder_layers(self.lm.model)[layer].register_forward_hook(record)
            try:
                full = self._forward(g, None, None, replay=None)
            finally:
                handle.remove()
            g["lower"] = recorded[0]
            same = same and self._replays(g, layer, full)
        self._recorded_layer = layer
        self._replay = layer if same else None
        return self._replay

    def _replays(self, g: dict, layer: int, full: Tensor) -> bool:
        """Whether replaying ``layer`` gives the full pass's ``full``. Some architectures' layers
        return what the stand-in does not (bloom's and mpt's a tuple their model indexes, so the
        replay fails there): the full pass then serves."""
        try:
            return torch.equal(self._forward(g, None, None, replay=layer), full)
        except Exception:  # any failure of the shortcut means: do not take it
            return False

    @torch.inference_mode()
    def log_likelihoods(self, steerer=None, alpha: Optional[float] = None) -> tuple[Tensor, Tensor]:
        """(summed log-probability, scored tokens) of each item's continuations [n_items, 2 per metric:
        matching, non-matching], steered as the scores are."""
        head = self.lm.model.get_output_embeddings()
        replay = None
        if steerer is not None and alpha != 0:
            layer = check_layer(self.lm.model, steerer.layer)
            replay = self._replay if self._recorded_layer == layer else self._record_layer(layer)
        total = torch.zeros(self.n_items, self.rows_per)
        count = torch.zeros(self.n_items, self.rows_per)
        for g in self.groups:
            hidden = self._forward(g, steerer, alpha, replay)
            rows, cols = g["wanted"].nonzero(as_tuple=True)
            logp = torch.log_softmax(head(hidden[rows, cols]).float(), -1)
            token_logp = logp.gather(-1, g["ids"][rows, cols + 1][:, None])[:, 0]
            sums = torch.zeros(len(g["ids"])).index_add_(0, rows, token_logp)
            total[g["index"], g["kinds"]] = sums
            count[g["index"], g["kinds"]] = g["wanted"].sum(1).float()
        return total, count

    def scores(self, steerer=None, alpha: Optional[float] = None) -> dict[str, Tensor]:
        """{metric: p_match per item}."""
        total, count = self.log_likelihoods(steerer, alpha)
        out = {}
        for k, metric in enumerate(self.metrics):
            match, other = 2 * k, 2 * k + 1
            if metric == "letter":  # the string's probability, as ABScorer
                diff = total[:, match] - total[:, other]
            else:  # mean per-token log-probability
                diff = total[:, match] / count[:, match] - total[:, other] / count[:, other]
            out[metric] = torch.sigmoid(diff)
        return out


class _Prefixes:
    """Prompts' KV caches up to (not including) their last token, left-padded into one batch."""

    def __init__(self, lm: LoadedModel, texts: Sequence[str]):
        tok = lm.tokenizer
        encoded = [
            tok(format_prompt(tok, q), add_special_tokens=not uses_chat_template(tok))["input_ids"] for q in texts
        ]
        self.lengths = [len(e) - 1 for e in encoded]  # everything before the last prompt token
        self.width = max(self.lengths)
        self.last = torch.tensor([[e[-1]] for e in encoded])
        with torch.inference_mode():
            caches = [lm.model(input_ids=torch.tensor([e[:-1]]), use_cache=True).cache for e in encoded]
        self.kv = _padded_cache(caches, self.lengths, self.width)
        self.mask = torch.zeros((len(encoded), self.width), dtype=torch.long)
        for i, n in enumerate(self.lengths):
            self.mask[i, self.width - n :] = 1


class BatchedFluency:
    """Greedy steered replies to fixed prompts (as ``generate``: steered from the last prompt token,
    ending after EOS or ``max_new_tokens``), scored by the unsteered model. With ``instruction``,
    the replies answer each prompt with the instruction first (``with_instruction``), and are still
    scored as replies to the prompt alone: the instruction's own cost in fluency is measured as a
    steer's is."""

    def __init__(
        self, lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 32, instruction: Optional[str] = None
    ):
        self.lm, self.max_new_tokens = lm, max_new_tokens
        self.scored = _Prefixes(lm, prompts)
        self.generated = (
            self.scored if instruction is None else _Prefixes(lm, [with_instruction(q, instruction) for q in prompts])
        )

    @torch.inference_mode()
    def __call__(self, steerer=None, alpha: Optional[float] = None) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(NLL sum per prompt, reply tokens per prompt, reply ids) of the steered greedy replies."""
        model, eos, gen, scored = self.lm.model, self.lm.tokenizer.eos_token_id, self.generated, self.scored
        n = len(gen.lengths)
        cache = _fresh_cache(gen.kv)
        ids, mask = gen.last, torch.cat([gen.mask, torch.ones(n, 1, dtype=torch.long)], 1)
        pos = torch.tensor(gen.lengths)[:, None]
        generated, done = [], torch.zeros(n, dtype=torch.bool)
        with steering_unless_identity(model, steerer, alpha, positions="all"):
            for _ in range(self.max_new_tokens):
                logits = model(input_ids=ids, attention_mask=mask, position_ids=pos, cache=cache, use_cache=True).logits
                token = logits[:, -1].argmax(-1)
                generated.append(token)
                done |= token == eos
                if done.all():
                    break
                ids, pos = token[:, None], pos + 1
                mask = torch.cat([mask, torch.ones(n, 1, dtype=torch.long)], 1)
        tokens = torch.stack(generated, 1)
        replies = []
        for i in range(n):
            stop = (tokens[i] == eos).nonzero()
            replies.append(tokens[i, : int(stop[0]) + 1] if len(stop) else tokens[i])
        # the unsteered model reads the last prompt token and the replies (right-padded) after the prefix
        w = max(len(r) for r in replies)
        feed = torch.full((n, w), self.lm.tokenizer.pad_token_id, dtype=torch.long)
        feed[:, 0] = scored.last[:, 0]
        feed_mask = torch.cat([scored.mask, torch.zeros(n, w, dtype=torch.long)], 1)
        for i, reply in enumerate(replies):
            feed[i, 1 : len(reply)] = reply[:-1]
            feed_mask[i, scored.width : scored.width + len(reply)] = 1
        hidden = model.get_decoder()(
            input_ids=feed,
            attention_mask=feed_mask,
            position_ids=torch.tensor(scored.lengths)[:, None] + torch.arange(w),
            cache=_fresh_cache(scored.kv),
            use_cache=True,
        ).last_hidden_state
        head = model.get_output_embeddings()
        nll = torch.zeros(n)
        for i, reply in enumerate(replies):
            logp = torch.log_softmax(head(hidden[i, : len(reply)]).float(), -1)
            nll[i] = -logp.gather(-1, reply[:, None]).sum()
        return nll, torch.tensor([float(len(r)) for r in replies]), replies
