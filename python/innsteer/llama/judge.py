"""The judge (``innsteer.eval.judge``) as a GGUF through llama-cpp-python, and ``--judge``'s loader."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.errors import ConfigError
from ..eval.judge import DEFAULT_JUDGE, HFJudge, Judge, answer_tokens, share


class LlamaJudge:
    """A GGUF as the judge, through llama-cpp-python, formatted with the GGUF's chat template."""

    def __init__(self, path: str, n_ctx: int = 4096, n_threads: Optional[int] = None):
        from .loading import load_llama

        self.name = Path(path).stem
        self.llm = load_llama(str(path), n_ctx=n_ctx, n_threads=n_threads, verbose=False)

    def p_first(self, messages: Sequence[str], first: Sequence[str], second: Sequence[str]) -> np.ndarray:
        from .chat import chat_tokens, last_token_logits

        encode = lambda w: self.llm.tokenize(w.encode(), add_bos=False, special=False)  # noqa: E731
        ids = answer_tokens(self.name, encode, first, second)
        out = []
        for message in messages:
            tokens = chat_tokens(self.llm, message)
            if len(tokens) >= self.llm.n_ctx():
                raise ConfigError(f"judge {self.name}: a judged message of {len(tokens)} tokens exceeds its context")
            # keep the cache of the beginning this message shares with the last one (one token at least
            # is evaluated, for its logits)
            done = self.llm.input_ids[: self.llm.n_tokens]
            common = 0
            for a, b in zip(done, tokens[:-1]):
                if a != b:
                    break
                common += 1
            self.llm.n_tokens = common  # eval drops the cache past it
            self.llm.eval(tokens[common:])
            out.append(share(last_token_logits(self.llm), *ids))
        return np.asarray(out)


def load_judge(spec: str) -> Judge:
    """``--judge``: ``default`` (Qwen2.5-Coder-1.5B-Instruct, once installed), a named model, a
    ``.gguf`` file (llama.cpp) or a Hugging Face model directory (PyTorch)."""
    from ..hf.models import load_model, resolve_model_path

    path = resolve_model_path(DEFAULT_JUDGE if spec == "default" else spec)
    if Path(path).suffix == ".gguf":
        return LlamaJudge(str(path))
    return HFJudge(load_model(str(path)))
