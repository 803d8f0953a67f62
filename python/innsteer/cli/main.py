"""The ``innsteer`` command line: collect | train | eval | tune | generate | demo | export | serve.

Parsing only: the commands live in ``commands`` (PyTorch), ``llama`` and ``serve`` (llama.cpp) and
import torch when they run, so ``innsteer --help`` stays fast. On a busy shared CPU, set
OMP_WAIT_POLICY=PASSIVE for the PyTorch commands (spinning OpenMP threads made every forward pass
~10x slower here when other processes held the cores), never for the llama.cpp ones: ggml's
decode runs about 3x slower with it.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from collections.abc import Sequence
from typing import Optional

from ..core.errors import InnsteerError
from ..datasets.ab import METRICS, RANKED_BY
from ..datasets.caa import BEHAVIORS
from . import commands, llama, serve
from ._args import count
from .commands import DEFAULT_BEHAVIOR, DEMO_BEHAVIOR, METHOD_NAMES, PROMPT

FLOAT32_MAX = 3.4028234663852886e38  # steerers compute in float32: a larger alpha overflows
NUMBER_OPTIONS = ("--layer", "--layers", "--alpha", "--alphas", "--control-strength")
NEGATIVE = re.compile(r"-(\d|\.\d|inf|nan)", re.IGNORECASE)


def _attach_negative_values(argv: Sequence[str]) -> list[str]:
    """argparse reads a value such as '-1,2', '-1e3' or '-inf' as an unknown option; '--alphas=-1,2' is the
    form it understands, so a negative value after a numeric option is attached that way."""
    out: list[str] = []
    i = 0
    while i < len(argv):
        if argv[i] == "--":  # the rest is positional
            return out + list(argv[i:])
        if argv[i] in NUMBER_OPTIONS and i + 1 < len(argv) and NEGATIVE.match(argv[i + 1]):
            out.append(f"{argv[i]}={argv[i + 1]}")
            i += 2
        else:
            out.append(argv[i])
            i += 1
    return out


def _finite(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, got '{text}'") from None
    if not abs(value) <= FLOAT32_MAX:  # also false for NaN
        raise argparse.ArgumentTypeError(f"expected a finite number within float32's range, got '{text}'")
    return value


def _distinct(values: list, what: str, text: str) -> list:
    """``values`` parsed from a comma-separated option: at least one, none twice."""
    if not values:
        raise argparse.ArgumentTypeError(f"expected at least one {what}, got '{text}'")
    repeated = sorted({v for v in values if values.count(v) > 1}, key=str)
    if repeated:
        raise argparse.ArgumentTypeError(f"{what} {repeated[0]} is listed more than once in '{text}'")
    return values


def _alphas(text: str) -> list[float]:
    try:
        values = [_finite(x) for x in text.split(",") if x.strip()]
    except argparse.ArgumentTypeError:
        raise argparse.ArgumentTypeError(f"expected comma-separated finite numbers, got '{text}'") from None
    return _distinct(values, "alpha", text)


def _int_list(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _layers(text: str) -> list[int]:
    return _distinct(_int_list(text), "layer", text)


SEED_LIMIT = 2**32  # numpy's and most generators' seed range


def _seeds(text: str) -> list[int]:
    values = _distinct(_int_list(text), "seed", text)
    bad = [v for v in values if not 0 <= v < SEED_LIMIT]
    if bad:
        raise argparse.ArgumentTypeError(f"seeds must be in 0..{SEED_LIMIT - 1}, got {bad[0]}")
    return values


def _json_object(text: str) -> dict:
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise argparse.ArgumentTypeError(f"expected a JSON object, got '{text}' ({error})") from None
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a JSON object {{name: {{option: value}}}}, got '{text}'")
    return value


def _utf8(text: str) -> str:
    """A prompt: Python decodes undecodable argv bytes to lone surrogates, which no tokenizer takes."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        shown = text.encode("utf-8", "backslashreplace").decode("ascii", "backslashreplace")
        raise argparse.ArgumentTypeError(f"'{shown}' is not valid UTF-8 text") from None
    return text


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model",
        default=None,
        help="Hugging Face model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="the PyTorch model's weights and activations; bfloat16 runs a larger model several times faster on "
        "CPUs with AVX-512 BF16 or AMX (steerers compute in float32 either way) (default: %(default)s)",
    )


def _add_data(p: argparse.ArgumentParser, *, behavior_default: str = DEFAULT_BEHAVIOR) -> None:
    _add_sources(p, behavior_default)
    _add_activations(p)


def _add_sources(p: argparse.ArgumentParser, behavior_default: str = DEFAULT_BEHAVIOR) -> None:
    data = p.add_argument_group("data (a shipped CAA behavior, or your own files)")
    data.add_argument(
        "--behavior",
        choices=BEHAVIORS,
        default=None,
        metavar="BEHAVIOR",
        help=f"shipped CAA behavior: {', '.join(BEHAVIORS)} (default: {behavior_default})",
    )
    data.add_argument(
        "--data",
        default=None,
        metavar="FILE",
        help="your contrastive items (JSON, JSONL or CSV with a header row): CAA A/B records, model-written-evals "
        "records with plain answers, or {prompt, positive, negative}; a seeded 20%% is held out for testing unless "
        "--test-data",
    )
    data.add_argument("--test-data", default=None, metavar="FILE", help="test items for --data (same formats)")
    data.add_argument(
        "--prompts",
        default=None,
        metavar="FILE",
        help="open-ended prompts for fluency (one per line, or JSON/JSONL, or CSV with a question or prompt "
        "column); default: the behavior's own, "
        "or a built-in neutral set for --data",
    )


def _add_activations(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--layer",
        type=int,
        default=None,
        help="decoder layer to steer; negative counts from the last (-1) (default: each method's layer and "
        "options from `innsteer tune`'s shipped record for the behavior on this model, else a layer at the "
        "depth the shipped records chose most; run `innsteer tune` to choose them for your data)",
    )
    p.add_argument(
        "--mode",
        choices=("answer", "letter"),
        default="answer",
        help="activations at the answer text or at the answer letter (CAA; lettered items only) (default: %(default)s)",
    )
    p.add_argument(
        "--tokens",
        choices=("all", "mean", "last"),
        default="all",
        help="which answer tokens give activations: all (each its own row), their mean, or the last "
        "(default: %(default)s)",
    )
    p.add_argument("--n-train", type=count(1), default=None, help="use at most this many training pairs (default: all)")


def _methods(text: str) -> list[str]:
    methods = [m.strip() for m in text.split(",") if m.strip()]
    known = (*METHOD_NAMES, PROMPT, *(f"{PROMPT}+{m}" for m in METHOD_NAMES))
    unknown = [m for m in methods if m not in known]
    if unknown:
        raise argparse.ArgumentTypeError(
            f"unknown method(s) {unknown}; choose from: {', '.join(METHOD_NAMES)}, {PROMPT} (the instruction "
            f"alone) or {PROMPT}+METHOD (the instruction and the method's steering)"
        )
    return _distinct(methods, "method", text)


def _text(text: str) -> str:
    from ..datasets.ab import DataError, check_text

    try:
        check_text(text, "the text")
    except DataError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    if not text.strip():
        raise argparse.ArgumentTypeError("expected some text, got an empty string")
    return text


def _add_eval(
    p: argparse.ArgumentParser, *, methods: str, alphas: str, n_test: Optional[int], n_open: int, max_new_tokens: int
) -> None:
    p.add_argument(
        "--methods",
        type=_methods,
        default=_methods(methods),
        help=f"comma-separated: {', '.join(METHOD_NAMES)}; {PROMPT} (an instruction asking for the behavior, "
        f"or its opposite away from it, instead of steering) and {PROMPT}+METHOD (both at once) (default: {methods})",
    )
    p.add_argument(
        "--instruction",
        type=_text,
        default=None,
        help="for the prompt methods: the instruction that asks for the behavior, put before each question "
        "(default: the shipped behavior's, CAA's system prompt; required with --data)",
    )
    p.add_argument(
        "--away-instruction",
        type=_text,
        default=None,
        help="the instruction that asks for the opposite (default: the shipped behavior's; without one, the "
        "prompt methods are measured toward the behavior only)",
    )
    p.add_argument(
        "--alphas",
        type=_alphas,
        default=_alphas(alphas),
        help="steering strengths to sweep; alpha 1 moves the class means by CAA's difference for every "
        "method (default: %(default)s)",
    )
    p.add_argument(
        "--n-test", type=count(1), default=n_test, help="test A/B items to score (default: %(default)s = all 50)"
    )
    p.add_argument(
        "--n-open", type=count(1), default=n_open, help="open-ended prompts for fluency (default: %(default)s)"
    )
    p.add_argument(
        "--max-new-tokens",
        type=count(1),
        default=max_new_tokens,
        help="reply length for fluency (default: %(default)s)",
    )
    p.add_argument(
        "--judge",
        default=None,
        metavar="MODEL",
        help="score the open-ended replies with a judge model: its probability of yes to 'does the reply show "
        "the behavior / is it coherent / does it address the prompt', validated on known answers first; "
        "'default' (Qwen2.5-Coder-1.5B-Instruct: python -m innsteer.hf.models install qwen2.5-coder-1.5b), a "
        "named model, a .gguf (llama.cpp) or a Hugging Face directory (demo: the default judge where it is "
        "installed; 'none': no judge)",
    )
    p.add_argument(
        "--behavior-description",
        type=_text,
        default=None,
        help="for --judge: what a reply showing the behavior does, e.g. 'refuse the request' (the judge "
        "chooses between it and --opposite-description) (default: the shipped behavior's; without one, your "
        "data is judged for coherence and relevance only)",
    )
    p.add_argument(
        "--opposite-description",
        type=_text,
        default=None,
        help="for --judge: what a reply showing the opposite does (default: the shipped behavior's, else "
        "'not' + --behavior-description)",
    )
    p.add_argument("--out", default=None, help="report directory (Markdown, JSON, PNG plots)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="innsteer",
        description="Nonlinear activation steering with invertible networks (INNSteer), with linear baselines, "
        "on Hugging Face causal LMs. Start with `innsteer demo`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser(
        "collect",
        help="collect and cache contrastive activations",
        description="Run the model on a behavior's A/B items with the matching and the non-matching "
        "answer and cache the residual-stream output of the given layers (safetensors).",
    )
    _add_model(p)
    _add_data(p)
    p.add_argument("--layers", type=_layers, default=None, help="several layers in one pass, e.g. 6,8,10,12")
    p.add_argument("--split", choices=("generate", "test_ab"), default="generate", help="(default: %(default)s)")
    p.set_defaults(func=commands.cmd_collect)

    p = sub.add_parser(
        "train",
        help="fit a steerer (INNSteer or a baseline) and save it",
        description="Fit a steerer on the training part of a behavior's generate split and save it "
        "as a safetensors steer file.",
    )
    _add_model(p)
    _add_data(p)
    p.add_argument("--method", choices=METHOD_NAMES, default="innsteer", help="(default: %(default)s)")
    p.add_argument("--alpha", type=_finite, default=None, help="default alpha stored in the file")
    p.add_argument("-o", "--output", required=True, help="steer file to write (.safetensors)")
    p.set_defaults(func=commands.cmd_train)

    p = sub.add_parser(
        "eval",
        help="compare methods with the protocol of docs/RESULTS.md: seeds, both directions, intervals",
        description="For each seed, fit each method on a seeded training part, sweep alpha on both sides until "
        "the fluency cost passes 1 nat/token, score the test A/B items (answer-text and letter metrics) and the "
        "fluency of open-ended replies; compare INNSteer with CAA at fluency budgets with paired bootstrap 95%% "
        "intervals, and write a report. --all runs every behavior and writes a summary table. With --out, each "
        "curve is kept as it finishes (--out/stages): rerun the same command to resume an interrupted run. To "
        "choose the layer and options for your data, run `innsteer tune`.",
    )
    _add_model(p)
    _add_data(p)
    _add_eval(p, methods="caa,innsteer", alphas="0.5,1,2,3,4,6,8,12", n_test=None, n_open=10, max_new_tokens=32)
    p.add_argument(
        "--seeds", type=_seeds, default=[0, 1, 2], help="training seeds (each also reseeds the train/validation split)"
    )
    p.add_argument("--all", action="store_true", help="every behavior; writes summary.md and summary.json in --out")
    p.set_defaults(func=commands.cmd_eval)

    p = sub.add_parser(
        "tune",
        help="choose the layer and options for your data and model, then compare INNSteer with CAA",
        description="On validation data only, choose each method's layer from a grid relative to the model's "
        "depth (CAA's too: the baseline is tuned as hard as the method) and INNSteer's training options, by the "
        "area under the behaviour-vs-fluency curve to 1 nat/token (--metric); then fit the chosen configurations and "
        "compare them on the test items in both directions with paired bootstrap intervals. Writes "
        "tune.json, tune.md and the chosen steerers (.safetensors) in --out; rerun the same command to "
        "resume an interrupted run. --budget quick measures at most 200 pool and 50 test items (a seeded "
        "sample of larger data) and takes about 15-30 minutes on the default model on 2 CPU cores; full "
        "measures every item and more layers, options and seeds.",
    )
    _add_model(p)
    _add_sources(p)
    p.add_argument("--budget", choices=("quick", "full"), default="quick", help="(default: %(default)s)")
    p.add_argument(
        "--metric",
        choices=METRICS,
        default=RANKED_BY,
        help="the A/B metric the layers and options are ranked by and the test comparison leads with; 'fork' "
        "scores the two answers where they first differ, the model's choice, which a steer cannot raise by "
        "disrupting the other answer's text, as it can 'answer' (every metric is reported; default: %(default)s)",
    )
    p.add_argument(
        "--variants",
        type=_json_object,
        default=None,
        help="more INNSteer option sets to try beside the budget's, as JSON {name: {option: value}} "
        '(TrainConfig / FlowConfig fields), e.g. \'{"mine": {"num_couplings": 8, "scaling": "displacement"}}\'; '
        "rerun into a finished --out to measure only them",
    )
    p.add_argument("--out", default="innsteer-tune", help="output directory (default: %(default)s)")
    p.add_argument("--no-plots", action="store_true", help="skip tune.png (no matplotlib needed)")
    p.add_argument("--seed", type=int, default=0, help="seed of the train/test split (default: %(default)s)")
    p.add_argument("--n-train", type=count(1), default=None, help="use at most this many training items (default: all)")
    p.set_defaults(func=commands.cmd_tune)

    p = sub.add_parser(
        "generate",
        help="greedy replies with and without steering",
        description="Print the unsteered and the steered greedy reply to each prompt. With --gguf the "
        "model runs in llama.cpp (needs llama-cpp-python).",
    )
    _add_model(p)
    p.add_argument("prompt", nargs="+", type=_utf8, help="user message(s)")
    p.add_argument(
        "--steer",
        default=None,
        help="steer file written by `innsteer train` (with --gguf also a steer GGUF; a linear steerer then "
        "runs as a llama.cpp control vector)",
    )
    p.add_argument("--alpha", type=_finite, default=None, help="steering strength (default: the file's)")
    p.add_argument("--max-new-tokens", type=count(1), default=64, help="(default: %(default)s)")
    p.add_argument(
        "--steer-prompt",
        action="store_true",
        help="steer every position, the prompt included (default: from the last prompt token onward)",
    )
    p.add_argument("--gguf", default=None, help="run this GGUF in llama.cpp instead of PyTorch")
    p.add_argument("--control-vector", default=None, help="(--gguf only) a llama.cpp control vector GGUF")
    p.add_argument("--control-strength", type=_finite, default=None, help="(--gguf only) (default: 1)")
    p.set_defaults(func=commands.cmd_generate)

    p = sub.add_parser(
        "demo",
        help="the main job: INNSteer vs CAA on one behavior, with intervals, samples and a report",
        description=f"On the default model: {DEMO_BEHAVIOR}. Fits CAA and INNSteer on the same per-token "
        "activations, each at the layer and with the settings `innsteer tune` chose on validation data "
        "(its records ship in innsteer/eval/tuned/; docs/RESULTS.md), "
        "sweeps alpha on both sides until the fluency cost passes 1 nat/token, and prints each method's "
        "behaviour shift at fluency budgets with the paired bootstrap 95% interval of the difference, "
        "sample generations, and the report. About 5-10 minutes for the default behavior on 2 CPU cores "
        "(50 items, 10 prompts, both sides), up to 25 for others.",
    )
    _add_model(p)
    _add_data(p, behavior_default=DEMO_BEHAVIOR)
    _add_eval(p, methods="caa,innsteer", alphas="0.5,1,2,3,4,6,8,12", n_test=None, n_open=10, max_new_tokens=32)
    p.add_argument(
        "--seeds", type=_seeds, default=[0], help="training seeds (each also reseeds the train/validation split)"
    )
    p.set_defaults(func=commands.cmd_demo)

    llama.register(sub)
    serve.register(sub)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(_attach_negative_values(sys.argv[1:] if argv is None else argv))
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if hasattr(sys.stdout, "reconfigure"):
        # a path from undecodable argv bytes holds lone surrogates: print them escaped, never crash
        sys.stdout.reconfigure(errors="backslashreplace")
    try:
        code = int(args.func(args) or 0)
        sys.stdout.flush()  # a closed pipe fails here, inside the handlers below, not at exit
        return code
    except InnsteerError as error:
        print(f"innsteer: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("innsteer: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # the reader went away (`innsteer ... | head`): stop quietly, and keep Python's exit-time
        # flush of stdout from failing again
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except OSError as error:  # disk full, permissions, a file vanishing mid-run: not a bug of ours
        print(f"innsteer: error: {error}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
