"""The llama.cpp commands of the ``innsteer`` command line (registered by ``innsteer.cli.main``).

innsteer export STEERER -o steer.gguf [--format controlvector] [--weight-dtype bfloat16] [--side away]
innsteer generate --gguf MODEL.gguf --steer steer.gguf --alpha 4 "prompt"   (via generate_gguf;
                                             --gguf smollm2 is the embedded default model; --steer
                                             also takes a .safetensors steerer)
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from typing import Any, Optional

from ._args import CLIError, check_input_file

# innsteer.llama.export's FORMATS and WEIGHT_DTYPES and the signed steerer's SIDES, without importing
# torch to parse arguments
FORMATS = ("innsteer", "controlvector")
WEIGHT_DTYPES = ("float32", "bfloat16")
SIDES = ("toward", "away")


def register(subparsers) -> None:
    """Add the ``export`` subcommand to the main parser's subparsers."""
    p = subparsers.add_parser(
        "export",
        help="export a steerer as a GGUF for llama.cpp",
        description="Write a steer file (from `innsteer train` or a linear baseline) as an innsteer steer GGUF "
        "for innsteer.llama.steering, or a linear steerer as a stock llama.cpp control vector "
        "(llama-cli --control-vector). innsteer layer L is llama.cpp's l_out-L (direction.L).",
    )
    p.add_argument("steerer", help="steer file (.safetensors) written by innsteer")
    p.add_argument("-o", "--output", required=True, help="output .gguf path")
    p.add_argument(
        "--format",
        choices=FORMATS,
        default="innsteer",
        help="innsteer: the INN for the native hook (default); controlvector: linear steerers only",
    )
    p.add_argument(
        "--weight-dtype",
        choices=WEIGHT_DTYPES,
        default="float32",
        help="storage of the coupling weights (bfloat16 halves the bytes the hook reads per token)",
    )
    p.add_argument(
        "--model-hint",
        default=None,
        help="architecture the steerer is for (e.g. llama); default: read from the steerer or the default model",
    )
    p.add_argument(
        "--side",
        choices=SIDES,
        default=None,
        help="of a signed steerer (two maps, as `innsteer tune` may write): the map to export; the away "
        "map is the one for negative alphas and is run at negative alphas",
    )
    p.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:
    from ..llama.export import export

    steerer = export(
        args.steerer, args.output, format=args.format, weight_dtype=args.weight_dtype, model_hint=args.model_hint,
        side=args.side,
    )  # fmt: skip
    side = "" if args.side is None else f", the {args.side} map"
    print(f"wrote {args.output} ({args.format}, layer {steerer.layer}, method {steerer.method}{side})")
    return 0


# Room for a prompt's chat template in the llama.cpp context, on top of the prompt's bytes (a token
# holds at least one byte, so bytes bound the prompt's tokens).
TEMPLATE_ROOM = 512


def _steer_for_llama(args: argparse.Namespace, model_id: str, tmpdir: str) -> tuple[Any, Optional[str], float, str]:
    """(the prepared INN steer, control vector GGUF, its strength, its label) for ``--steer``, as
    ``innsteer.llama.export.for_llama`` prepares it: an INN (or a signed steerer's two maps) runs in
    the hook; a linear steerer (CAA, PCA, probe: h + alpha * v) or a control vector GGUF as a
    llama.cpp control vector, which llama.cpp adds at every position."""
    from ..llama.export import for_llama

    prepared = for_llama(args.steer, model_id=model_id, workdir=tmpdir)
    if prepared.kind == "innsteer":
        return prepared, None, 0.0, ""
    what = "a control vector" if prepared.steerer is None else f"the {prepared.steerer.method} steerer"
    if args.control_vector:
        raise CLIError(
            f"--steer {args.steer} runs as a llama.cpp control vector: it cannot be combined with --control-vector"
        )
    if not args.steer_prompt:
        print(
            f"innsteer: note: {what} runs as a llama.cpp control vector, which steers the prompt too "
            "(as --steer-prompt)",
            file=sys.stderr,
        )
    default = 1.0 if prepared.steerer is None else prepared.steerer.alpha
    alpha = default if args.alpha is None else args.alpha
    method = "control vector" if prepared.steerer is None else prepared.steerer.method
    return None, prepared.path, alpha, f"{method} alpha={alpha:g} (control vector)"


def generate_gguf(args: argparse.Namespace) -> int:
    """``innsteer generate --gguf MODEL``: the unsteered and the steered greedy chat reply to each
    prompt from a GGUF in llama.cpp, steered by ``--steer`` (a steer GGUF, or a .safetensors steerer
    exported on the fly: an INN as a steer GGUF, a linear one as a control vector) at ``--alpha``
    and/or ``--control-vector``. Steering starts at the last prompt token (as in the PyTorch path)
    unless ``--steer-prompt``; control vectors steer every position."""
    from ..hf.models import model_id_for, resolve_model_path

    if getattr(args, "model", None):
        raise CLIError("--model and --gguf both name the model: pass one")
    model = resolve_model_path(args.gguf)  # 'smollm2': the embedded default GGUF
    if model.suffix != ".gguf":
        raise CLIError(f"--gguf needs a .gguf file, got {model}")
    if args.control_vector:
        check_input_file(args.control_vector, "--control-vector")
    prompts = [args.prompt] if isinstance(args.prompt, str) else list(args.prompt)
    from ..llama.model_file import read_model_info

    context = read_model_info(model).context_length  # a file that is no model: one line naming what it is
    if context is not None and args.max_new_tokens >= context:
        raise CLIError(f"--max-new-tokens {args.max_new_tokens} does not fit the model's context of {context} tokens")
    n_ctx = args.max_new_tokens + max(len(p.encode()) for p in prompts) + TEMPLATE_ROOM
    n_ctx = n_ctx if context is None else min(n_ctx, context)
    with tempfile.TemporaryDirectory() as tmpdir:
        steer, control_vector = None, args.control_vector
        strength = 1.0 if args.control_strength is None else float(args.control_strength)
        label = f"control vector x{strength:g}"
        if args.steer:
            steer, steer_vector, steer_strength, steer_label = _steer_for_llama(args, model_id_for(model), tmpdir)
            if steer_vector:
                control_vector, strength, label = steer_vector, steer_strength, steer_label
        from ..llama.steering import SteeredLlama

        try:  # llama.cpp's and the hook's ValueErrors: a file that is no model, a layer it lacks, ...
            signed = steer is not None and steer.away_path is not None
            llm = SteeredLlama(
                str(model),
                steer=None if steer is None or signed else steer.path,
                alpha=args.alpha,
                n_ctx=n_ctx,
                expect_model_id=model_id_for(model),
            )
            if signed:  # its two maps, each at its sign of the alpha
                llm.steering.add_signed(steer.path, steer.away_path, args.alpha, expect_model_id=model_id_for(model))
            if control_vector:
                llm.steering.set_control_vector(control_vector, strength)  # checked before any reply
                llm.steering.clear_control_vector()
        except ValueError as error:
            raise CLIError(str(error)) from error
        steering = llm.steering
        steering.disable()
        plain = [_reply(llm, i, p, args.max_new_tokens, False) for i, p in enumerate(prompts)]
        steered = None
        if steer or control_vector:
            steering.enable()
            if control_vector:
                steering.set_control_vector(control_vector, strength)
            steered = [_reply(llm, i, p, args.max_new_tokens, args.steer_prompt) for i, p in enumerate(prompts)]
    # the alpha of the entry that runs (a signed steerer's other map runs at 0)
    labels = [f"innsteer alpha={next((a for a in steering.alphas if a), 0.0):g}"] if steer else []
    if control_vector:
        labels.append(label)
    for i, prompt in enumerate(prompts):
        print(f">>> {prompt}\n[unsteered] {plain[i]}")
        if steered is not None:
            print(f"[{', '.join(labels)}] {steered[i]}")
        print()
    return 0


def _reply(llm, index: int, prompt: str, max_new_tokens: int, steer_prompt: bool) -> str:
    from ..llama.chat import chat_reply

    try:
        return chat_reply(llm, prompt, max_new_tokens, steer_prompt=steer_prompt)
    except ValueError as error:
        if "exceed context window" in str(error):  # llama-cpp-python's check of the prompt's length
            raise CLIError(f"prompt {index + 1} is too long for the model: {error}") from error
        raise
