"""Chat helpers for a (steered) llama-cpp-python Llama: the last token's logits, a prompt formatted
with the GGUF's own chat template, and a greedy reply to it."""

from __future__ import annotations

import numpy as np

from .bindings import INSTALL_HINT

try:
    import llama_cpp
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
except ImportError as _error:  # optional dependency
    raise ImportError(INSTALL_HINT) from _error


def last_token_logits(llm: llama_cpp.Llama) -> np.ndarray:
    """A copy of the logits llama.cpp computed for the last token of the last decode."""
    logits = llama_cpp.llama_get_logits_ith(llm._ctx.ctx, -1)
    return np.ctypeslib.as_array(logits, shape=(llm.n_vocab(),)).copy()


def chat_tokens(llm: llama_cpp.Llama, prompt: str) -> list[int]:
    """``prompt`` as a user message formatted with the GGUF's chat template, up to where the reply
    starts (the plain text, after BOS, if it has no template)."""
    template = llm.metadata.get("tokenizer.chat_template")
    text = prompt
    if template:
        formatter = Jinja2ChatFormatter(
            template=template,
            eos_token=llm._model.token_get_text(llm.token_eos()),
            bos_token=llm._model.token_get_text(llm.token_bos()),
        )
        text = formatter(messages=[{"role": "user", "content": prompt}]).prompt
    return llm.tokenize(text.encode(), add_bos=not template, special=True)


def chat_reply(llm: llama_cpp.Llama, prompt: str, max_tokens: int, *, steer_prompt: bool = False) -> str:
    """A greedy reply to ``prompt`` formatted with the GGUF's chat template (plain text if none)."""
    tokens = chat_tokens(llm, prompt)
    llm.steering.steer_from(0 if steer_prompt else len(tokens) - 1)
    out = llm.create_completion(tokens, max_tokens=max_tokens, temperature=0.0)
    return out["choices"][0]["text"].strip()
