"""Tokenizing texts and locating character spans as token positions (via offset mappings).

Tokenizers disagree on how `(A` splits (SmolLM2: `(` + `A`; Qwen2.5: one `(A` token), so
positions are never derived from assumed token ids: each text is tokenized whole and the tokens
whose character offsets overlap the wanted span are taken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from .prompts import uses_chat_template


@dataclass
class SpanBatch:
    input_ids: Tensor  # [B, T], right-padded
    attention_mask: Tensor  # [B, T]
    span_start: Tensor  # [B] first token overlapping the span
    span_end: Tensor  # [B] one past the last token overlapping the span

    def span_mask(self) -> Tensor:
        """[B, T] bool: the span's tokens."""
        positions = torch.arange(self.input_ids.shape[1])
        return (positions >= self.span_start[:, None]) & (positions < self.span_end[:, None])


def encode_spans(tokenizer, texts: Sequence[str], spans: Sequence[tuple[int, int]]) -> SpanBatch:
    """Tokenize each text (special tokens only where no chat template put them) and find the
    tokens covering its character span [a, b)."""
    if len(texts) != len(spans):
        raise ValueError(f"{len(texts)} texts but {len(spans)} spans")
    if not getattr(tokenizer, "is_fast", False):
        raise TypeError(f"{type(tokenizer).__name__} is not a fast tokenizer: offset mappings are needed")
    enc = tokenizer(
        list(texts), add_special_tokens=not uses_chat_template(tokenizer), return_offsets_mapping=True, padding=False
    )
    rows, starts, ends = [], [], []
    for i, (ids, offsets, (a, b)) in enumerate(zip(enc["input_ids"], enc["offset_mapping"], spans)):
        if not 0 <= a < b <= len(texts[i]):
            raise ValueError(f"span {(a, b)} is not inside text {i} of length {len(texts[i])}")
        hit = [t for t, (s, e) in enumerate(offsets) if e > s and s < b and e > a]
        if not hit:
            raise ValueError(f"no token covers characters {a}..{b} of text {i}: {texts[i][a:b]!r}")
        rows.append(ids)
        starts.append(hit[0])
        ends.append(hit[-1] + 1)
    width = max(len(ids) for ids in rows)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    input_ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, ids in enumerate(rows):
        input_ids[i, : len(ids)] = torch.tensor(ids)
        mask[i, : len(ids)] = 1
    return SpanBatch(input_ids, mask, torch.tensor(starts), torch.tensor(ends))
