"""Behaviour and fluency metrics.

Behaviour (per A/B item, averaged over items):
- ``letter`` (CAA): p(matching letter) / (p(matching) + p(non-matching)) for the reply opening
  with ``(``. The continuations ``(A`` and ``(B`` are scored as strings (whatever tokens they are),
  so the shared ``(`` cancels on tokenizers that split it and a single ``(A`` token works too.
  For A/B items this is CAA's p(match)/(p(A)+p(B)); items with more options are normalized over
  their two labelled answers.
- ``answer``: both options' texts scored as the assistant's reply by mean per-token
  log-probability; p_match = softmax over {matching, non-matching}.
- ``fork``: the same texts scored at the first token where they differ only, after the tokens they
  share. A steer sees the same states before it on both sides: p_match is the model's choice where
  the answers part, as generation makes it. Scoring the whole texts (``answer``) lets a steer that
  moves each state differently raise p_match by disrupting the non-matching text, which it was
  trained to recognise, without changing that choice (docs/RESULTS.md).
While steering, the steerer acts from the last prompt token onward (as in generation).

Fluency: greedy replies to open-ended prompts, generated with steering, scored by the unsteered
model as mean negative log-likelihood per token (log perplexity). The fluency cost of a setting is
its NLL minus the unsteered model's NLL on its own greedy replies. Repetitive loops can score a low
NLL, so the distinct-bigram ratio of the replies is reported beside it, and the comparison protocol
records each reply's repetition (``repetition``) to keep such loops out of its budgets.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Sequence
from typing import Optional

import torch
from torch import Tensor
from tqdm.auto import tqdm

from ..core.hooks import steering_unless_identity
from ..datasets.ab import METRICS, ABItem, DataError, parse_item
from ..hf.encoding import encode_spans
from ..hf.generation import generate
from ..hf.models import LoadedModel
from ..hf.prompts import ab_prompt

SANITY_ITEMS = (
    {
        "question": "What is 2+2?\n\nChoices:\n (A) 4\n (B) 7",
        "answer_matching_behavior": "(A)",
        "answer_not_matching_behavior": "(B)",
    },
    {
        "question": "What is 2+2?\n\nChoices:\n (A) 7\n (B) 4",
        "answer_matching_behavior": "(B)",
        "answer_not_matching_behavior": "(A)",
    },
)


class ABScorer:
    """Scores the continuations of A/B items under any steering, reusing each prompt's KV cache.

    Steering acts from the last prompt token onward, so everything before it is the same for every
    method and alpha: it runs once (unsteered) per item and is cached; each evaluation runs only
    the last prompt token and the continuations (one small batch per item, all metrics at once).
    """

    def __init__(self, lm: LoadedModel, items: Sequence[ABItem], metrics: Sequence[str] = METRICS):
        for metric in metrics:
            if metric not in METRICS:
                raise DataError(f"unknown metric '{metric}'; choose one of: {', '.join(METRICS)}")
        if not items:
            raise ValueError("ABScorer needs at least one item")
        self.lm, self.items, self.metrics = lm, list(items), tuple(metrics)
        self._records = [self._encode(item) for item in self.items]
        self._caches: list = [None] * len(self.items)

    def _encode(self, item: ABItem) -> dict:
        prompt = ab_prompt(self.lm.tokenizer, item)
        conts = [text for metric in self.metrics for text in item.continuations(metric)]  # matching, non-matching
        batch = encode_spans(
            self.lm.tokenizer, [prompt + c for c in conts], [(len(prompt), len(prompt) + len(c)) for c in conts]
        )
        lengths = batch.attention_mask.sum(1)
        rows = [batch.input_ids[i, : int(lengths[i])] for i in range(len(conts))]
        span_start, span_end = batch.span_start.clone(), batch.span_end.clone()
        for k, metric in enumerate(self.metrics):
            if metric == "fork":
                fork_span(rows, 2 * k, 2 * k + 1, span_start, span_end)
        rows = [row[: int(end)] for row, end in zip(rows, span_end)]  # no later token is scored
        # The shared prefix ends before the last prompt token (the first steered position).
        prefix = int(batch.span_start.min()) - 1
        for row in rows[1:]:
            same = (row[:prefix] == rows[0][:prefix]).long()
            prefix = min(prefix, int(same.cumprod(0).sum()))
        if prefix < 1:
            raise ValueError(f"the prompt of item {item.question[:60]!r} has no tokens before the reply")
        return {
            "prefix": rows[0][:prefix],
            "suffixes": [r[prefix:] for r in rows],
            "steer_start": batch.span_start,  # each reply's first token: steering acts from the one before
            "span_start": span_start,  # the scored tokens
            "span_end": span_end,
        }

    @torch.inference_mode()
    def _prefix_cache(self, i: int):
        if self._caches[i] is None:
            out = self.lm.model(input_ids=self._records[i]["prefix"][None], use_cache=True)
            self._caches[i] = out.cache
        return self._caches[i]

    @torch.inference_mode()
    def _run(self, i: int, rows: Sequence[int], steerer, alpha) -> tuple[Tensor, Tensor]:
        """(sum of log-probs, token count) of item i's continuations ``rows``, in one forward pass."""
        rec = self._records[i]
        prefix = len(rec["prefix"])
        suffixes = [rec["suffixes"][r] for r in rows]
        start, end = rec["span_start"][list(rows)], rec["span_end"][list(rows)]
        steer_start = rec["steer_start"][list(rows)]
        width = max(len(s) for s in suffixes)
        ids = torch.full((len(rows), width), self.lm.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), prefix + width), dtype=torch.long)
        mask[:, :prefix] = 1
        for r, s in enumerate(suffixes):
            ids[r, : len(s)] = s
            mask[r, prefix : prefix + len(s)] = 1
        # The token at absolute position t is predicted at t - 1: keep only the logits that score spans.
        targets = torch.arange(prefix + 1, prefix + width)
        wanted = (targets >= start[:, None]) & (targets < end[:, None])
        keep = wanted.any(0).nonzero()[:, 0]
        cache = copy.deepcopy(self._prefix_cache(i))
        cache.batch_repeat_interleave(len(rows))
        with steering_unless_identity(
            self.lm.model, steerer, alpha, positions="after_prompt", prompt_length=steer_start
        ):
            logits = self.lm.model(
                input_ids=ids, attention_mask=mask, cache=cache, use_cache=True, logits_to_keep=keep
            ).logits
        logp = torch.log_softmax(logits.float(), dim=-1).gather(-1, ids[:, keep + 1, None])[..., 0]
        wanted = wanted[:, keep]
        return (logp * wanted).sum(1), wanted.sum(1).float()

    def scores(self, steerer=None, alpha: Optional[float] = None, progress: bool = False) -> dict[str, Tensor]:
        """{metric: p_match per item}; p_match = softmax over {matching, non-matching}."""
        out = {m: torch.empty(len(self.items)) for m in self.metrics}
        for i in tqdm(range(len(self.items)), desc="scoring", disable=not progress, unit="item"):
            for k, metric in enumerate(self.metrics):  # per metric: continuations of similar length
                total, count = self._run(i, (2 * k, 2 * k + 1), steerer, alpha)
                match, other = 0, 1
                if metric == "letter":  # the string's probability ("(" cancels where it is its own token)
                    diff = total[match] - total[other]
                else:  # mean per-token log-probability
                    diff = total[match] / count[match] - total[other] / count[other]
                out[metric][i] = torch.sigmoid(diff)
        return out


def fork_span(rows: Sequence[Tensor], first: int, second: int, start: Tensor, end: Tensor) -> None:
    """Narrow the scored token spans ``start`` / ``end`` of rows ``first`` and ``second`` (one
    item's two answers) to the first token where they differ, in place; left whole where one
    answer's tokens begin the other's (nothing parts them)."""
    a, b = rows[first], rows[second]
    lo, hi = int(start[first]), min(int(end[first]), int(end[second]))
    if int(start[second]) != lo:  # the replies start at different tokens: no shared part to score after
        return
    differ = (a[lo:hi] != b[lo:hi]).nonzero()
    if len(differ):
        at = lo + int(differ[0])
        start[[first, second]] = at
        end[[first, second]] = at + 1


def behaviour_scores(
    lm: LoadedModel, items: Sequence[ABItem], metric: str = "answer", *, steerer=None, alpha: Optional[float] = None
) -> Tensor:
    """p_match per item under ``metric`` ('answer', 'letter' or 'fork'); builds a one-off ABScorer."""
    return ABScorer(lm, items, (metric,)).scores(steerer, alpha)[metric]


def multiple_choice_sanity(lm: LoadedModel) -> dict:
    """Can the model map options to letters? 'What is 2+2? (A) 4 (B) 7' and the swapped order."""
    items = [parse_item(raw) for raw in SANITY_ITEMS]
    letter = behaviour_scores(lm, items, "letter").tolist()
    answer = behaviour_scores(lm, items, "answer").tolist()
    return {
        "p_correct_letter": letter,
        "p_correct_answer": answer,
        "letter_ok": all(p > 0.5 for p in letter),
        "answer_ok": all(p > 0.5 for p in answer),
    }


@torch.inference_mode()
def reply_nll(lm: LoadedModel, prompt_ids: Sequence[Tensor], reply_ids: Sequence[Tensor]) -> tuple[float, int]:
    """Total negative log-likelihood of the replies under the (unsteered) model, and their token count."""
    total, count = 0.0, 0
    for p, r in zip(prompt_ids, reply_ids):
        if len(r) == 0:
            continue
        ids = torch.cat([p, r])[None]
        logp = torch.log_softmax(lm.model(input_ids=ids, use_cache=False).logits[0, len(p) - 1 : -1].float(), -1)
        total -= float(logp.gather(-1, r[:, None]).sum())
        count += len(r)
    return total, count


def distinct_bigrams(reply_ids: Sequence[Tensor]) -> float:
    pairs = [tuple(r[i : i + 2].tolist()) for r in reply_ids for i in range(len(r) - 1)]
    return len(set(pairs)) / len(pairs) if pairs else 0.0


def repetition(reply: Sequence[int], n: int = 4) -> float:
    """seq-rep-n of one reply (Welleck et al. 2019): the fraction of its n-grams that repeat an
    earlier one, 1 - unique / total; 0 for a reply with no n-gram. Degenerate loops ("and and and",
    "I, I, I") have a low NLL under the unsteered model; this is what catches them."""
    grams = [tuple(reply[i : i + n]) for i in range(len(reply) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def fluency(
    lm: LoadedModel, questions: Sequence[str], *, steerer=None, alpha: Optional[float] = None, max_new_tokens: int = 32
) -> dict:
    texts, prompt_ids, reply_ids = generate(lm, questions, steerer=steerer, alpha=alpha, max_new_tokens=max_new_tokens)
    total, count = reply_nll(lm, prompt_ids, reply_ids)
    nll = total / max(count, 1)
    repeats = [repetition(r.tolist()) for r in reply_ids]
    return {
        "nll": nll,
        "ppl": math.exp(nll),
        "distinct2": distinct_bigrams(reply_ids),
        "repetition": sum(repeats) / max(len(repeats), 1),
        "samples": texts,
    }
