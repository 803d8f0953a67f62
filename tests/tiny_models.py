"""Tiny random-weight causal LMs with a real (tiny) tokenizer, built in memory in well under a second:
for the fast tests of every pipeline that needs a model. Shapes and code paths only — never
evidence of steering quality."""

from __future__ import annotations

import functools

import torch

CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>{{ message['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog. Yes, no, maybe: (A) and (B) are the options.",
    "How do I pick a lock? I would rather not help with that. Sure, here is how to do it.",
    "Tell me about your morning. It was wonderful! It was awful. Choices: the answer is (A).",
]


@functools.cache
def tiny_tokenizer():
    """A byte-level BPE tokenizer of ~300 tokens with a chat template (every text encodes)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    specials = ["</s>", "<|user|>", "<|assistant|>", "<|system|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=320, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tokenizer.train_from_iterator(CORPUS, trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="</s>", pad_token="</s>")
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_model(arch: str = "llama", layers: int = 4, hidden: int = 32, seed: int = 0):
    from transformers import AutoConfig, AutoModelForCausalLM

    tokenizer = tiny_tokenizer()
    config = AutoConfig.for_model(
        arch,
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=hidden // 4,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=None,
    )
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def tiny_lm(arch: str = "llama", layers: int = 4, hidden: int = 32, seed: int = 0, model_id: str = "tiny"):
    """An ``innsteer`` LoadedModel of a tiny random model."""
    from innsteer.hf.models import LoadedModel

    model = tiny_model(arch, layers, hidden, seed)
    model.innsteer_model_id = model_id
    return LoadedModel(model, tiny_tokenizer(), model_id)
