"""Fake (meta) kernels and autograd for the innsteer ops.

Fake kernels let torch.compile / export trace through the ops without running them. The
backward of each functional op recomputes the forward with the pure-PyTorch reference under
autograd (activation checkpointing): exact gradients, and no second hand-written kernel whose
math could drift from the forward's.
"""

from __future__ import annotations

import torch

from . import _reference

_LIB = "innsteer"


def _fake_check(x: torch.Tensor, name: str, **tensors) -> None:
    """The checks the real kernels make that depend only on metadata (shapes and devices)."""
    mean = tensors["mean"]
    torch._check(x.dim() >= 1, lambda: f"innsteer: {name} must have at least one dimension")
    torch._check(
        x.shape[-1] == mean.shape[0],
        lambda: f"innsteer: {name} has hidden size {x.shape[-1]} but the flow was built for {mean.shape[0]}",
    )
    for arg, value in tensors.items():
        for k, t in enumerate(value if isinstance(value, (list, tuple)) else [value]):
            where = f"{arg}[{k}]" if isinstance(value, (list, tuple)) else arg
            torch._check(
                t is None or t.device == x.device,
                lambda where=where, t=t: f"innsteer: {where} is on {t.device} but the activations are on {x.device}",
            )


@torch.library.register_fake(f"{_LIB}::coupling_forward")
def _(x, mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp):
    _fake_check(x, "x", mean=mean, scale=scale, cond_idx=cond_idx, trans_idx=trans_idx, w1=w1, b1=b1, w2=w2, b2=b2)
    return torch.empty_like(x, memory_format=torch.contiguous_format), x.new_empty(x.shape[:-1], dtype=mean.dtype)


@torch.library.register_fake(f"{_LIB}::coupling_inverse")
def _(z, mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp):
    _fake_check(z, "z", mean=mean, scale=scale, cond_idx=cond_idx, trans_idx=trans_idx, w1=w1, b1=b1, w2=w2, b2=b2)
    return torch.empty_like(z, memory_format=torch.contiguous_format)


def _check_steer(hidden, residual, direction, alpha, mean, scale, cond_idx, trans_idx, w1, b1, w2, b2, clamp):
    """The fake check shared by ``steer`` and its in-place form ``steer_`` (one schema but the return)."""
    _fake_check(
        hidden,
        "hidden",
        residual=residual,
        direction=direction,
        mean=mean,
        scale=scale,
        cond_idx=cond_idx,
        trans_idx=trans_idx,
        w1=w1,
        b1=b1,
        w2=w2,
        b2=b2,
    )


@torch.library.register_fake(f"{_LIB}::steer")
def _(*args):
    _check_steer(*args)
    return torch.empty_like(args[0], memory_format=torch.contiguous_format)


@torch.library.register_fake(f"{_LIB}::steer_")
def _(*args):
    _check_steer(*args)


def _save_inputs(ctx, inputs) -> None:
    """Saves the tensor inputs (lists flattened) with save_for_backward, so autograd refuses a
    backward through an input that was modified in place since; other arguments stay on ctx."""
    tensors, layout = [], []  # layout: per input, a list length, "tensor", or ("value", arg)
    for arg in inputs:
        if isinstance(arg, (list, tuple)):
            layout.append(len(arg))
            tensors.extend(arg)
        elif isinstance(arg, torch.Tensor):
            layout.append("tensor")
            tensors.append(arg)
        else:
            layout.append(("value", arg))
    ctx.save_for_backward(*tensors)
    ctx.input_layout = layout


def _saved_inputs(ctx) -> list:
    saved = iter(ctx.saved_tensors)
    inputs = []
    for entry in ctx.input_layout:
        if isinstance(entry, int):
            inputs.append([next(saved) for _ in range(entry)])
        elif entry == "tensor":
            inputs.append(next(saved))
        else:
            inputs.append(entry[1])
    return inputs


def _recompute_backward(reference):
    """A backward that re-runs `reference` on the saved inputs and differentiates it."""

    def setup_context(ctx, inputs, output):
        _save_inputs(ctx, inputs)

    def backward(ctx, *grad_outputs):
        inputs = _saved_inputs(ctx)
        detached = []
        wanted = []  # (position in inputs, list index or None, leaf)
        for pos, (arg, needs) in enumerate(zip(inputs, ctx.needs_input_grad)):
            if isinstance(arg, (list, tuple)):
                leaves = [t.detach().requires_grad_(t.is_floating_point()) for t in arg]
                detached.append(leaves)
                wanted += [(pos, i, leaf) for i, leaf in enumerate(leaves) if leaf.requires_grad]
            elif isinstance(arg, torch.Tensor):
                leaf = arg.detach().requires_grad_(bool(needs) and arg.is_floating_point())
                detached.append(leaf)
                if leaf.requires_grad:
                    wanted.append((pos, None, leaf))
            else:
                detached.append(arg)
        with torch.enable_grad():
            outputs = reference(*detached)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        pairs = [(o, g) for o, g in zip(outputs, grad_outputs) if g is not None and o.requires_grad]
        grads = (
            torch.autograd.grad(
                [o for o, _ in pairs], [leaf for _, _, leaf in wanted], [g for _, g in pairs], allow_unused=True
            )
            if pairs and wanted
            else [None] * len(wanted)
        )
        result: list = [[None] * len(arg) if isinstance(arg, (list, tuple)) else None for arg in inputs]
        for (pos, index, _), grad in zip(wanted, grads):
            if index is None:
                result[pos] = grad
            else:
                result[pos][index] = grad
        return tuple(result)

    return backward, setup_context


for _name, _reference_fn in (
    ("coupling_forward", _reference.coupling_forward),
    ("coupling_inverse", _reference.coupling_inverse),
    ("steer", _reference.steer),
):
    _backward, _setup = _recompute_backward(_reference_fn)
    torch.library.register_autograd(f"{_LIB}::{_name}", _backward, setup_context=_setup)
