"""Steering a model (a Hugging Face causal LM, or any torch module with a stack of decoder layers)
during forward passes and ``model.generate``.

    with steering(model, steerer, alpha=4.0, positions="after_prompt"):
        out = model.generate(**batch)

A forward hook on decoder layer L replaces the layer's output h by ``steerer(h, alpha)`` (the
steerer's own call, i.e. the fused ops for INN steerers) at the chosen positions:
- ``"all"``: every position;
- ``"after_prompt"``: from the last prompt token onward (CAA applies its vector "from the end of the
  instruction onward"); the last prompt token is where the first reply token is predicted;
- a sequence of ints: those absolute token positions.
Positions are the model's ``position_ids``, so left-padded batches under ``generate`` count each
row from its first real token. The prompt length is taken from the first forward pass of a sequence
(the one holding position 0) unless ``prompt_length`` ([B] or int) is given. Leaving the context
removes the hook: the model computes exactly what it did before.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, nullcontext
from typing import Optional, Union

import torch
from torch import Tensor, nn

from .errors import ConfigError, SteerFileError


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (llama, qwen2, gemma, ... layouts): the one whose length is
    ``config.num_hidden_layers``; found by structure, not by class or attribute name."""
    config = getattr(model, "config", None)
    n = getattr(config, "num_hidden_layers", None)
    if hasattr(config, "get_text_config"):
        n = getattr(config.get_text_config(), "num_hidden_layers", n)
    candidates = [
        (name, m)
        for name, m in model.named_modules()
        if isinstance(m, nn.ModuleList) and len(m) > 0 and (n is None or len(m) == n)
    ]
    if not candidates:
        raise ConfigError(f"{type(model).__name__}: found no ModuleList of {n} decoder layers to steer")
    # Prefer the shallowest match (the model's own layer stack, not a nested per-layer list).
    return min(candidates, key=lambda item: item[0].count("."))[1]


def check_layer(model: nn.Module, layer: int) -> int:
    """``layer`` as an index into the model's decoder layers (negative counts from the end)."""
    if isinstance(layer, bool) or not isinstance(layer, numbers.Integral):
        raise ConfigError(f"layer must be an integer (a decoder layer index), got {layer!r}")
    layer = int(layer)
    n = len(decoder_layers(model))
    if not -n <= layer < n:
        raise ConfigError(f"layer {layer} is out of range: this model has {n} decoder layers (0..{n - 1})")
    return layer % n


Positions = Union[str, Sequence[int]]
POSITION_MODES = ("all", "after_prompt")


class _SteeringHook:
    def __init__(self, steerer, alpha: Optional[float], positions: Positions, prompt_length):
        if isinstance(positions, str):
            if positions not in POSITION_MODES:
                raise ConfigError(
                    f"positions must be one of {POSITION_MODES} or a list of token indices, got '{positions}'"
                )
            self.indices = None
        else:
            self.indices = torch.as_tensor(list(positions), dtype=torch.long)
            if self.indices.numel() == 0 or (self.indices < 0).any():
                raise ConfigError(f"explicit positions must be a non-empty list of indices >= 0, got {list(positions)}")
        self.steerer, self.alpha, self.positions = steerer, alpha, positions
        self.fixed_prompt_length = prompt_length
        self.prompt_length: Optional[Tensor] = None
        self.seen = 0  # fallback position counter for layers called without position_ids

    def _position_ids(self, kwargs: dict, batch: int, length: int) -> Tensor:
        ids = kwargs.get("position_ids")
        if ids is None:
            if length > 1:  # a new prompt (decode steps pass one token)
                self.seen = 0
            ids = torch.arange(self.seen, self.seen + length)[None]
            self.seen += length
        return ids.expand(batch, length)

    def mask(self, kwargs: dict, hidden: Tensor) -> Optional[Tensor]:
        """[B, T] bool of the positions to steer, or None for all of them."""
        if self.positions == "all":
            return None
        ids = self._position_ids(kwargs, hidden.shape[0], hidden.shape[1]).to(hidden.device)
        if self.indices is not None:
            return torch.isin(ids, self.indices.to(hidden.device))
        if self.fixed_prompt_length is not None:
            length = torch.as_tensor(self.fixed_prompt_length, device=hidden.device).reshape(-1, 1)
        else:
            if (ids == 0).any() or self.prompt_length is None:  # the prompt's pass: remember its length per row
                self.prompt_length = ids.max(dim=1, keepdim=True).values + 1
            length = self.prompt_length
        return ids >= length - 1

    def __call__(self, module, args, kwargs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        mask = self.mask(kwargs, hidden)
        if mask is None:
            steered = self.steerer(hidden, self.alpha)
        elif not mask.any():
            return output
        else:
            steered = hidden.clone()
            steered[mask] = self.steerer(hidden[mask], self.alpha)
        return (steered,) + tuple(output[1:]) if isinstance(output, tuple) else steered


@contextmanager
def steering(
    model,
    steerer,
    *,
    alpha: Optional[float] = None,
    layer: Optional[int] = None,
    positions: Positions = "all",
    prompt_length: Union[int, Tensor, None] = None,
) -> Iterator[None]:
    """Steer ``model`` with ``steerer`` at ``layer`` (default: the steerer's) while inside the block.

    ``alpha`` None uses the steerer's own alpha. ``prompt_length`` (int or [B] tensor) fixes where
    "after_prompt" starts; by default it is read from the first forward pass of each sequence.
    """
    layer = check_layer(model, steerer.layer if layer is None else layer)
    model_id = getattr(model, "innsteer_model_id", "")  # set by innsteer.hf.models.load_model
    if model_id and steerer.model_id and steerer.model_id != model_id:
        raise SteerFileError(f"this steerer was trained on '{steerer.model_id}', not on '{model_id}'")
    hidden_size = model.get_input_embeddings().weight.shape[1]
    if getattr(steerer, "hidden_size", hidden_size) != hidden_size:
        raise ConfigError(
            f"steerer was trained for hidden size {steerer.hidden_size}, but this model has {hidden_size}"
        )
    hook = _SteeringHook(steerer, alpha, positions, prompt_length)
    handle = decoder_layers(model)[layer].register_forward_hook(hook, with_kwargs=True)
    try:
        yield
    finally:
        handle.remove()


def steering_unless_identity(model, steerer, alpha: Optional[float], **kwargs):
    """``steering(...)``, or no hook at all when there is nothing to steer (no steerer, alpha 0:
    the identity for every method)."""
    if steerer is None or alpha == 0:
        return nullcontext()
    return steering(model, steerer, alpha=alpha, **kwargs)
