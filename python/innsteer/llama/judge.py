"""The judge (``innsteer.eval.judge``) as a GGUF through llama-cpp-python, and ``--judge``'s loader."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional

import numpy as np

from ..core.errors import ConfigError
from ..eval.judge import DEFAULT_JUDGE, HFJudge, Judge, answer_tokens, check_answers, share


class LlamaJudge:
    """A GGUF as the judge, through llama-cpp-python, formatted with the GGUF's chat template."""

    def __init__(self, path: str, n_ctx: int = 8192, n_threads: Optional[int] = None):
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
    ``.gguf`` file (llama.cpp) or a Hugging Face model directory (PyTorch); checked to have the
    answer tokens the questions read, so a judge that cannot answer fails before any measurement."""
    from ..hf.models import load_model, resolve_model_path
    from .model_file import ModelFileError, read_model_info

    path = resolve_model_path(DEFAULT_JUDGE if spec == "default" else spec)
    if Path(path).suffix == ".gguf":
        read_model_info(path)  # a steer GGUF, a control vector or a damaged file: one line naming it
        try:
            judge = LlamaJudge(str(path))
        except ValueError as error:  # llama.cpp could not load it after all
            raise ModelFileError(f"--judge {path}: {error}") from None
    else:
        judge = HFJudge(load_model(str(path)))
    check_answers(judge)
    return judge
