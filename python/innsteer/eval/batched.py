"""Batched fast paths of the A/B scorer and the fluency measure, for alpha sweeps.

They compute what ``ABScorer.scores`` and ``generate`` + ``reply_nll`` compute (the tests compare
them), but many items or prompts per forward pass: steering acts from the last prompt token on,
so every prompt's unsteered prefix KV cache is computed once, left-padded into one batch (rotary
positions passed explicitly), and each call feeds only the steered positions. The LM head runs
only where a token is scored.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor

from ..core.hooks import steering_unless_identity
from ..datasets.ab import METRICS, ABItem
from ..hf.models import LoadedModel
from ..hf.prompts import format_prompt, uses_chat_template
from .metrics import ABScorer


def _padded_cache(caches: Sequence, lengths: Sequence[int], rows_per: int, width: int) -> list[tuple[Tensor, Tensor]]:
    """Per layer (K, V) [len(caches) * rows_per, heads, width, head_dim]: each prefix cache
    left-padded to ``width`` and repeated ``rows_per`` times."""
    out = []
    for layer in range(len(caches[0].layers)):
        first = caches[0].layers[layer].keys
        keys = first.new_zeros(len(caches) * rows_per, first.shape[1], width, first.shape[3])
        values = torch.zeros_like(keys)
        for i, (cache, n) in enumerate(zip(caches, lengths)):
            rows = slice(i * rows_per, (i + 1) * rows_per)
            keys[rows, :, width - n :] = cache.layers[layer].keys[0, :, :n]
            values[rows, :, width - n :] = cache.layers[layer].values[0, :, :n]
        out.append((keys, values))
    return out


def _fresh_cache(kv: list[tuple[Tensor, Tensor]]):
    from transformers import DynamicCache

    return DynamicCache(ddp_cache_data=kv)  # update() concatenates into new tensors: kv is never mutated


class BatchedScorer:
    """``ABScorer(lm, items, metrics).scores`` with ``group`` items per forward pass."""

    def __init__(self, lm: LoadedModel, items: Sequence[ABItem], metrics: Sequence[str] = METRICS, group: int = 16):
        self.lm, self.metrics = lm, tuple(metrics)
        reference = ABScorer(lm, items, self.metrics)  # the same records and prefix caches
        rows_per = 2 * len(self.metrics)  # per metric: matching, non-matching
        pad = lm.tokenizer.pad_token_id
        self.groups = []
        for first in range(0, len(items), group):
            idx = list(range(first, min(first + group, len(items))))
            records = [reference._records[i] for i in idx]
            prefix = [len(r["prefix"]) for r in records]
            width = max(prefix)
            kv = _padded_cache([reference._prefix_cache(i) for i in idx], prefix, rows_per, width)
            for i in idx:
                reference._caches[i] = None  # the padded copy is all that is kept
            suffixes = [r["suffixes"][k] for r in records for k in range(rows_per)]
            w = max(len(s) for s in suffixes)
            ids = torch.full((len(suffixes), w), pad, dtype=torch.long)
            mask = torch.zeros((len(suffixes), width + w), dtype=torch.long)
            pos = torch.zeros((len(suffixes), w), dtype=torch.long)
            start = torch.tensor([int(r["span_start"][k]) for r in records for k in range(rows_per)])
            end = torch.tensor([int(r["span_end"][k]) for r in records for k in range(rows_per)])
            wanted = torch.zeros((len(suffixes), max(w - 1, 1)), dtype=torch.bool)
            for row, suffix in enumerate(suffixes):
                p = prefix[row // rows_per]
                ids[row, : len(suffix)] = suffix
                mask[row, width - p : width + len(suffix)] = 1
                pos[row] = p + torch.arange(w)
                target = p + 1 + torch.arange(w - 1)  # absolute position of the token predicted at column j
                wanted[row, : w - 1] = (
                    (target >= start[row]) & (target < end[row]) & (torch.arange(w - 1) + 1 < len(suffix))
                )
            self.groups.append({"kv": kv, "ids": ids, "mask": mask, "pos": pos, "start": start, "wanted": wanted})

    @torch.inference_mode()
    def scores(self, steerer=None, alpha: Optional[float] = None) -> dict[str, Tensor]:
        """{metric: p_match per item}."""
        body, head = self.lm.model.get_decoder(), self.lm.model.get_output_embeddings()
        per_metric = {metric: [] for metric in self.metrics}
        rows_per = 2 * len(self.metrics)
        for g in self.groups:
            with steering_unless_identity(
                self.lm.model, steerer, alpha, positions="after_prompt", prompt_length=g["start"]
            ):
                hidden = body(
                    input_ids=g["ids"],
                    attention_mask=g["mask"],
                    position_ids=g["pos"],
                    cache=_fresh_cache(g["kv"]),
                    use_cache=True,
                ).last_hidden_state
            rows, cols = g["wanted"].nonzero(as_tuple=True)
            logp = torch.log_softmax(head(hidden[rows, cols]).float(), -1)
            token_logp = logp.gather(-1, g["ids"][rows, cols + 1][:, None])[:, 0]
            total = torch.zeros(len(g["ids"])).index_add_(0, rows, token_logp)
            count = g["wanted"].sum(1).float()
            for k, metric in enumerate(self.metrics):
                match, other = slice(2 * k, None, rows_per), slice(2 * k + 1, None, rows_per)
                if metric == "letter":  # the string's probability, as ABScorer
                    diff = total[match] - total[other]
                else:  # mean per-token log-probability
                    diff = total[match] / count[match] - total[other] / count[other]
                per_metric[metric].append(torch.sigmoid(diff))
        return {metric: torch.cat(parts) for metric, parts in per_metric.items()}


class BatchedFluency:
    """Greedy steered replies to fixed prompts (as ``generate``: steered from the last prompt token,
    ending after EOS or ``max_new_tokens``), scored by the unsteered model."""

    def __init__(self, lm: LoadedModel, prompts: Sequence[str], max_new_tokens: int = 32):
        self.lm, self.max_new_tokens = lm, max_new_tokens
        tok = lm.tokenizer
        encoded = [
            tok(format_prompt(tok, q), add_special_tokens=not uses_chat_template(tok))["input_ids"] for q in prompts
        ]
        self.prefix = [len(e) - 1 for e in encoded]  # everything before the last prompt token
        self.width = max(self.prefix)
        self.last = torch.tensor([[e[-1]] for e in encoded])
        with torch.inference_mode():
            caches = [lm.model(input_ids=torch.tensor([e[:-1]]), use_cache=True).cache for e in encoded]
        self.kv = _padded_cache(caches, self.prefix, 1, self.width)
        self.prefix_mask = torch.zeros((len(encoded), self.width), dtype=torch.long)
        for i, n in enumerate(self.prefix):
            self.prefix_mask[i, self.width - n :] = 1

    @torch.inference_mode()
    def __call__(self, steerer=None, alpha: Optional[float] = None) -> tuple[Tensor, Tensor, list[Tensor]]:
        """(NLL sum per prompt, reply tokens per prompt, reply ids) of the steered greedy replies."""
        model, eos, n = self.lm.model, self.lm.tokenizer.eos_token_id, len(self.prefix)
        cache = _fresh_cache(self.kv)
        ids, mask = self.last, torch.cat([self.prefix_mask, torch.ones(n, 1, dtype=torch.long)], 1)
        pos = torch.tensor(self.prefix)[:, None]
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
        feed[:, 0] = self.last[:, 0]
        feed_mask = torch.cat([self.prefix_mask, torch.zeros(n, w, dtype=torch.long)], 1)
        for i, reply in enumerate(replies):
            feed[i, 1 : len(reply)] = reply[:-1]
            feed_mask[i, self.width : self.width + len(reply)] = 1
        hidden = model.get_decoder()(
            input_ids=feed,
            attention_mask=feed_mask,
            position_ids=torch.tensor(self.prefix)[:, None] + torch.arange(w),
            cache=_fresh_cache(self.kv),
            use_cache=True,
        ).last_hidden_state
        head = model.get_output_embeddings()
        nll = torch.zeros(n)
        for i, reply in enumerate(replies):
            logp = torch.log_softmax(head(hidden[i, : len(reply)]).float(), -1)
            nll[i] = -logp.gather(-1, reply[:, None]).sum()
        return nll, torch.tensor([float(len(r)) for r in replies]), replies
