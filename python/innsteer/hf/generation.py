"""Greedy chat replies from a Hugging Face model, optionally steered."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Optional

import torch
from torch import Tensor

from ..core.hooks import steering_unless_identity
from .prompts import format_prompt, uses_chat_template

if TYPE_CHECKING:  # models imports this module for LoadedModel.chat
    from .models import LoadedModel


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    questions: Sequence[str],
    *,
    steerer=None,
    alpha: Optional[float] = None,
    max_new_tokens: int = 32,
    batch_size: int = 8,
    positions: str = "after_prompt",
) -> tuple[list[str], list[Tensor], list[Tensor]]:
    """Greedy chat replies (steered from the last prompt token onward by default): (texts, prompt ids, reply ids)."""
    tok = lm.tokenizer
    texts, prompt_ids, reply_ids = [], [], []
    old_side = tok.padding_side
    tok.padding_side = "left"
    try:
        for start in range(0, len(questions), batch_size):
            prompts = [format_prompt(tok, q) for q in questions[start : start + batch_size]]
            enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=not uses_chat_template(tok))
            with steering_unless_identity(lm.model, steerer, alpha, positions=positions):
                out = lm.model.generate(
                    **enc,
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tok.pad_token_id,
                    temperature=None,
                    top_p=None,
                    top_k=None,
                )
            for row in range(out.shape[0]):
                reply = out[row, enc.input_ids.shape[1] :]
                eos = (reply == tok.eos_token_id).nonzero()
                reply = reply[: int(eos[0]) + 1] if len(eos) else reply  # keep the EOS: ending is part of fluency
                prompt_ids.append(enc.input_ids[row][enc.attention_mask[row].bool()])
                reply_ids.append(reply)
                texts.append(tok.decode(reply, skip_special_tokens=True))
    finally:
        tok.padding_side = old_side
    return texts, prompt_ids, reply_ids
