"""Prompt formatting for Hugging Face tokenizers: the chat template when there is one."""

from __future__ import annotations


def format_prompt(tokenizer, user_text: str) -> str:
    """The text up to where the assistant's reply starts: the tokenizer's chat template, or a plain
    'Question: ...\\nAnswer:' form for tokenizers without one (base models)."""
    if uses_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True
        )
    return f"Question: {user_text}\nAnswer:"


def reply_separator(tokenizer) -> str:
    """What goes between the prompt and the reply text: nothing after a chat template (it ends the
    assistant header with a newline), one space after the plain 'Answer:' form."""
    return "" if uses_chat_template(tokenizer) else " "


def uses_chat_template(tokenizer) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def ab_prompt(tokenizer, item) -> str:
    """An A/B item's prompt up to where the reply text starts (what its continuations follow); ""
    for an item without a prompt (bare contrastive texts, no chat template)."""
    if not item.question:
        return ""
    return format_prompt(tokenizer, item.question) + reply_separator(tokenizer)


def with_instruction(user_text: str, instruction: str) -> str:
    """The user's message with an instruction before it (the prompt baselines' form: it works with
    every chat template, and a template's own default system prompt stays as it was)."""
    return f"{instruction}\n\n{user_text}" if user_text else instruction
