"""GBNF grammars checked before llama.cpp sees them.

llama-cpp-python hands every grammar (a request's ``grammar``, the one it derives from a
``response_format`` JSON schema, from forced ``tools`` or ``functions``) to
``llama_sampler_init_grammar`` and adds the result to the sampler chain unchecked: a grammar
llama.cpp cannot parse gives a NULL sampler, which crashes the process at the first token, and a
deeply nested one overflows the C stack inside llama.cpp's recursive parser. ``guard_grammars``
replaces that one step (``LlamaSampler.add_grammar``) with a checked one, so each of those paths
raises ``GrammarError`` instead.
"""

from __future__ import annotations

import itertools
import re

from ..core.errors import ConfigError

MAX_GRAMMAR_BYTES = 64 * 1024  # a JSON schema's grammar is a few KB; sampling time grows with the size
MAX_GRAMMAR_NESTING = 100  # parenthesis depth; llama.cpp's parser recurses once per level
# what cannot hold a grouping parenthesis: string literals, character classes, comments
_NOT_GROUPING = re.compile(r'"(?:\\.|[^"\\\n])*"|\[(?:\\.|[^\]\\\n])*\]|#[^\n]*')


class GrammarError(ConfigError):
    """A grammar llama.cpp must not be given."""


def check_grammar(text: str, what: str = "grammar") -> bytes:
    """``text`` as UTF-8 after the bounds llama.cpp's parser needs; raises GrammarError."""
    try:
        encoded = text.encode()
    except UnicodeEncodeError:
        raise GrammarError(f"{what}: not valid UTF-8 text") from None
    if len(encoded) > MAX_GRAMMAR_BYTES:
        raise GrammarError(f"{what}: {len(encoded)} bytes, more than the {MAX_GRAMMAR_BYTES} this server parses")
    steps = (1 if c == "(" else -1 for c in re.findall(r"[()]", _NOT_GROUPING.sub("", text)))
    depth = max(itertools.accumulate(steps, initial=0))
    if depth > MAX_GRAMMAR_NESTING:
        raise GrammarError(f"{what}: parentheses nested {depth} deep, more than {MAX_GRAMMAR_NESTING}")
    return encoded


def grammar_sampler(vocab, text: str, root: str = "root", what: str = "grammar"):
    """A llama.cpp grammar sampler for ``text`` (the caller owns it); raises GrammarError where
    llama.cpp cannot parse it."""
    import llama_cpp

    sampler = llama_cpp.llama_sampler_init_grammar(vocab, check_grammar(text, what), root.encode())
    if not sampler:
        raise GrammarError(f"{what}: llama.cpp cannot parse it as a GBNF grammar with a '{root}' rule")
    return sampler


def check_parses(vocab, text: str, what: str = "grammar") -> None:
    """Raise GrammarError unless llama.cpp parses ``text`` (with a 'root' rule)."""
    import llama_cpp

    llama_cpp.llama_sampler_free(grammar_sampler(vocab, text, what=what))


def guard_grammars() -> None:
    """Make llama-cpp-python's sampler chains check every grammar (idempotent; see the module)."""
    import llama_cpp
    from llama_cpp import _internals

    if getattr(_internals.LlamaSampler.add_grammar, "innsteer_checked", False):
        return

    def add_grammar(self, model, grammar) -> None:
        what = "the grammar of this request's response_format, tools or functions"
        sampler = grammar_sampler(model.vocab, grammar._grammar, grammar._root, what=what)
        llama_cpp.llama_sampler_chain_add(self.sampler, sampler)  # the chain owns it from here

    add_grammar.innsteer_checked = True
    _internals.LlamaSampler.add_grammar = add_grammar
