"""The llama.cpp commands of the ``innsteer`` command line (registered by ``innsteer.cli.main``).

innsteer export STEERER -o steer.gguf [--format controlvector] [--weight-dtype bfloat16]
innsteer generate --gguf MODEL.gguf --steer steer.gguf --alpha 4 "prompt"   (via generate_gguf;
                                             --gguf smollm2 is the embedded default model)
"""

from __future__ import annotations

import argparse
import os
import tempfile

from .commands import CLIError

# innsteer.llama.export's FORMATS and WEIGHT_DTYPES, without importing torch to parse arguments
FORMATS = ("innsteer", "controlvector")
WEIGHT_DTYPES = ("float32", "bfloat16")


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
    p.set_defaults(func=export_command)


def export_command(args: argparse.Namespace) -> int:
    from ..llama.export import export

    steerer = export(
        args.steerer, args.output, format=args.format, weight_dtype=args.weight_dtype, model_hint=args.model_hint
    )
    print(f"wrote {args.output} ({args.format}, layer {steerer.layer}, method {steerer.method})")
    return 0


def _steer_gguf_path(steer: str, tmpdir: str) -> str:
    """A steer GGUF for ``steer``: the file itself, or a safetensors steerer exported on the fly."""
    with open(steer, "rb") as handle:
        if handle.read(4) == b"GGUF":
            return steer
    from ..llama.export import export

    path = os.path.join(tmpdir, "steer.gguf")
    export(steer, path)
    return path


def generate_gguf(args: argparse.Namespace) -> int:
    """``innsteer generate --gguf MODEL``: the unsteered and the steered greedy chat reply to each
    prompt from a GGUF in llama.cpp, steered by ``--steer`` (a steer GGUF, or an INN .safetensors
    exported on the fly) at ``--alpha`` and/or ``--control-vector``. Steering starts at the last
    prompt token (as in the PyTorch path) unless ``--steer-prompt``."""
    from ..hf.models import resolve_model_path
    from ..llama.steering import SteeredLlama, chat_reply

    model = resolve_model_path(args.gguf)  # 'smollm2': the embedded default GGUF
    if model.suffix != ".gguf":
        raise CLIError(f"--gguf needs a .gguf file, got {model}")
    prompts = [args.prompt] if isinstance(args.prompt, str) else list(args.prompt)
    control_vector = getattr(args, "control_vector", None)
    strength = float(getattr(args, "control_strength", 1.0))
    steer_prompt = bool(getattr(args, "steer_prompt", False))
    with tempfile.TemporaryDirectory() as tmpdir:
        steer = _steer_gguf_path(os.fspath(args.steer), tmpdir) if args.steer else None
        llm = SteeredLlama(str(model), steer=steer, alpha=args.alpha, n_ctx=2048)
    steering = llm.steering
    steering.disable()
    plain = [chat_reply(llm, p, args.max_new_tokens) for p in prompts]
    steered = None
    if steer or control_vector:
        steering.enable()
        if control_vector:
            steering.set_control_vector(control_vector, strength)
        steered = [chat_reply(llm, p, args.max_new_tokens, steer_prompt=steer_prompt) for p in prompts]
    label = []
    if steer:
        label.append(f"innsteer alpha={steering.alphas[0]:g}")
    if control_vector:
        label.append(f"control vector x{strength:g}")
    for i, prompt in enumerate(prompts):
        print(f">>> {prompt}\n[unsteered] {plain[i]}")
        if steered is not None:
            print(f"[{', '.join(label)}] {steered[i]}")
        print()
    return 0
