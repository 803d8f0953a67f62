"""A/B scoring through llama.cpp: the same continuations and p_match as the PyTorch scorer
(``innsteer.eval.metrics``), computed by a (steered) ``llama_cpp.Llama``."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np

from ..datasets.ab import METRICS, DataError
from ..eval.metrics import fork_span
from ..hf.encoding import encode_spans
from ..hf.prompts import ab_prompt
from .chat import last_token_logits

if TYPE_CHECKING:
    import llama_cpp


def continuation_logprobs(
    llm: llama_cpp.Llama, tokenizer, prompts: Sequence[str], continuations: Sequence[str], *, fork: bool = False
) -> tuple[np.ndarray, np.ndarray]:
    """(sum of log-probs, number of tokens) of each continuation after its prompt, through llama.cpp.

    Mirrors the PyTorch scorer (``innsteer.eval.metrics.ABScorer``): each text is tokenized whole by the model's
    Hugging Face tokenizer (the same vocabulary as the GGUF) and, when ``llm`` is steered, steering
    acts from the last prompt token onward. ``fork``: continuations i and n + i are one item's two
    answers (2n in all), each scored at the first token where they differ only (``fork_span``).
    """
    if fork and len(prompts) % 2:
        raise ValueError("the fork metric scores answers in pairs: an even number of continuations")
    batch = encode_spans(
        tokenizer,
        [p + c for p, c in zip(prompts, continuations)],
        [(len(p), len(p) + len(c)) for p, c in zip(prompts, continuations)],
    )
    rows = [batch.input_ids[i, : int(n)] for i, n in enumerate(batch.attention_mask.sum(1))]
    span_start, span_end = batch.span_start.clone(), batch.span_end.clone()
    if fork:
        half = len(rows) // 2
        for i in range(half):
            fork_span(rows, i, half + i, span_start, span_end)
    steering = getattr(llm, "steering", None)
    old_start = steering.start_position if steering is not None else 0
    total, count = np.zeros(len(prompts)), np.zeros(len(prompts))
    try:
        for i, row in enumerate(rows):
            ids, reply = row.tolist(), int(batch.span_start[i])
            start, end = int(span_start[i]), int(span_end[i])
            if reply < 1:
                raise ValueError("a continuation starts at the first token: it has no context to be scored from")
            if steering is not None:
                steering.steer_from(reply - 1)
            llm.reset()
            llm.eval(ids[:start])
            for t in range(start, end):  # token t is predicted from the logits after t - 1
                logits = last_token_logits(llm).astype(np.float64)
                top = logits.max()
                total[i] += logits[ids[t]] - top - np.log(np.exp(logits - top).sum())
                count[i] += 1
                if t + 1 < end:
                    llm.eval([ids[t]])
    finally:
        if steering is not None:
            steering.steer_from(old_start)
    return total, count


def behaviour_scores(llm: llama_cpp.Llama, tokenizer, items, metric: str = "letter") -> np.ndarray:
    """p_match per A/B item through llama.cpp, as ``innsteer.eval.metrics.behaviour_scores`` computes it
    ('letter': p(matching letter) against p(non-matching); 'answer': mean per-token log-prob; 'fork':
    the log-prob of the first token where the answers differ)."""
    if metric not in METRICS:
        raise DataError(f"unknown metric '{metric}'; choose one of: {', '.join(METRICS)}")
    prompt = [ab_prompt(tokenizer, item) for item in items]
    pairs = [item.continuations(metric) for item in items]
    conts = [match for match, _ in pairs] + [other for _, other in pairs]
    total, count = continuation_logprobs(llm, tokenizer, prompt + prompt, conts, fork=metric == "fork")
    score = total if metric == "letter" else total / count
    n = len(items)
    return 1.0 / (1.0 + np.exp(-(score[:n] - score[n:])))
