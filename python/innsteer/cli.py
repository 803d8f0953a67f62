"""The ``innsteer`` command line: collect | train | eval | generate | demo (+ subcommands that other
modules register, e.g. ``export`` from ``innsteer.llama_cli`` when llama.cpp support is present).

On a busy shared CPU, set OMP_WAIT_POLICY=PASSIVE before starting: spinning OpenMP threads made
every forward pass ~10x slower here when other processes held the cores.
"""
from __future__ import annotations

import argparse
import importlib
import json
import sys
import time
from pathlib import Path
from typing import Optional, Sequence

from .data import BEHAVIORS

# Modules that may add subcommands: each has ``register(subparsers)``; absent ones are skipped.
EXTENSIONS = ("innsteer.llama_cli",)
DEMO_BEHAVIOR = "corrigible-neutral-HHH"
DEMO_LAYER = 10


class CLIError(Exception):
    """A user error: printed as 'innsteer: error: ...' with exit status 2."""


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got '{text}'") from None


def _ints(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got '{text}'") from None


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="Hugging Face model directory or .gguf file (default: the embedded SmolLM2-135M-Instruct)")


def _add_data(p: argparse.ArgumentParser, *, layer_default: Optional[int] = DEMO_LAYER) -> None:
    p.add_argument("--behavior", choices=BEHAVIORS, default=DEMO_BEHAVIOR, metavar="BEHAVIOR",
                   help=f"CAA behavior: {', '.join(BEHAVIORS)} (default: %(default)s)")
    p.add_argument("--layer", type=int, default=layer_default, help="decoder layer to steer (default: %(default)s)")
    p.add_argument("--mode", choices=("answer", "letter"), default="answer",
                   help="activations at the answer text's tokens (mean) or at the answer letter (CAA) (default: %(default)s)")
    p.add_argument("--n-train", type=int, default=None, help="use at most this many training pairs (default: all)")


def _methods(text: str) -> list[str]:
    from .baselines import METHODS

    methods = [m.strip() for m in text.split(",") if m.strip()]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise argparse.ArgumentTypeError(f"unknown method(s) {unknown}; choose from: {', '.join(METHODS)}")
    return methods


def _add_eval(p: argparse.ArgumentParser, *, methods: str, alphas: str, n_test: Optional[int], n_open: int,
              max_new_tokens: int) -> None:
    p.add_argument("--methods", type=_methods, default=_methods(methods),
                   help="comma-separated: caa, pca, probe, linear_act, innsteer (default: %(default)s)")
    p.add_argument("--alphas", type=_floats, default=_floats(alphas),
                   help="steering strengths to sweep; alpha 1 moves the class means by CAA's difference for every "
                        "method (default: %(default)s)")
    p.add_argument("--n-test", type=int, default=n_test, help="test A/B items to score (default: %(default)s = all 50)")
    p.add_argument("--n-open", type=int, default=n_open, help="open-ended prompts for fluency (default: %(default)s)")
    p.add_argument("--max-new-tokens", type=int, default=max_new_tokens, help="reply length for fluency (default: %(default)s)")
    p.add_argument("--out", default=None, help="report directory (Markdown, JSON, PNG plots)")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots (no matplotlib needed)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="innsteer",
        description="Nonlinear activation steering with invertible networks (INNSteer), with linear baselines, "
                    "on Hugging Face causal LMs. Start with `innsteer demo`.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("collect", help="collect and cache contrastive activations",
                       description="Run the model on a behavior's A/B items with the matching and the non-matching "
                                   "answer and cache the residual-stream output of the given layers (safetensors).")
    _add_model(p)
    _add_data(p)
    p.add_argument("--layers", type=_ints, default=None, help="several layers in one pass, e.g. 6,8,10,12")
    p.add_argument("--split", choices=("generate", "test_ab"), default="generate", help="(default: %(default)s)")
    p.set_defaults(func=cmd_collect)

    p = sub.add_parser("train", help="fit a steerer (INNSteer or a baseline) and save it",
                       description="Fit a steerer on the training part of a behavior's generate split and save it "
                                   "as a safetensors steer file.")
    _add_model(p)
    _add_data(p)
    p.add_argument("--method", choices=("innsteer", "caa", "pca", "probe", "linear_act"), default="innsteer",
                   help="(default: %(default)s)")
    p.add_argument("--alpha", type=float, default=None, help="default alpha stored in the file")
    p.add_argument("-o", "--output", required=True, help="steer file to write (.safetensors)")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser("eval", help="sweep alpha for several methods; behaviour vs fluency report",
                       description="Fit each method at one layer, sweep alpha, score the test A/B items (answer-text "
                                   "and letter metrics) and the fluency of open-ended replies, and write a report. "
                                   "--all runs every behavior and writes a summary table; --layer-sweep picks a layer.")
    _add_model(p)
    _add_data(p)
    _add_eval(p, methods="caa,pca,probe,linear_act,innsteer", alphas="0.5,1,2,4", n_test=None, n_open=5,
              max_new_tokens=32)
    p.add_argument("--all", action="store_true", help="every behavior; writes summary.md and summary.json in --out")
    p.add_argument("--layer-sweep", type=_ints, default=None, metavar="LAYERS",
                   help="instead of a report: CAA's behaviour shift at each of these layers (comma-separated)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("generate", help="greedy replies with and without steering",
                       description="Print the unsteered and the steered greedy reply to each prompt. With --gguf the "
                                   "model runs in llama.cpp (needs llama-cpp-python).")
    _add_model(p)
    p.add_argument("prompt", nargs="+", help="user message(s)")
    p.add_argument("--steer", default=None, help="steer file written by `innsteer train` (or a steer GGUF with --gguf)")
    p.add_argument("--alpha", type=float, default=None, help="steering strength (default: the file's)")
    p.add_argument("--max-new-tokens", type=int, default=64, help="(default: %(default)s)")
    p.add_argument("--steer-prompt", action="store_true", help="steer every position, the prompt included "
                                                              "(default: from the last prompt token onward)")
    p.add_argument("--gguf", default=None, help="run this GGUF in llama.cpp instead of PyTorch")
    p.add_argument("--control-vector", default=None, help="(--gguf only) a llama.cpp control vector GGUF")
    p.add_argument("--control-strength", type=float, default=1.0, help="(--gguf only) (default: %(default)s)")
    p.set_defaults(func=cmd_generate)

    p = sub.add_parser("demo", help="the main job: train INNSteer and CAA on one behavior, compare, report",
                       description=f"On the default model: {DEMO_BEHAVIOR} at layer {DEMO_LAYER}, answer-text "
                                   "activations; trains INNSteer and CAA, sweeps alpha, prints the trade-off table and "
                                   "steered/unsteered generations, writes the report. A few minutes on 2 CPU cores.")
    _add_model(p)
    _add_data(p)
    _add_eval(p, methods="caa,innsteer", alphas="0.5,1,2", n_test=20, n_open=3, max_new_tokens=24)
    p.set_defaults(func=cmd_demo, n_train=150)

    for name in EXTENSIONS:
        _register_extension(name, sub)
    return parser


def _register_extension(name: str, subparsers) -> None:
    try:
        module = importlib.import_module(name)
    except ImportError as error:
        if error.name != name:  # present but broken: say so, keep the rest of the CLI working
            print(f"innsteer: warning: {name} not loaded ({error})", file=sys.stderr)
        return
    module.register(subparsers)


def _load(args):
    from .models import load_model

    t = time.perf_counter()
    lm = load_model(args.model)
    print(f"model {lm.model_id}: {lm.num_layers} layers, hidden size {lm.hidden_size} "
          f"(loaded in {time.perf_counter() - t:.1f} s)", file=sys.stderr)
    if getattr(args, "layer", None) is not None:
        from .models import check_layer

        check_layer(lm.model, args.layer)
    return lm


def cmd_collect(args) -> int:
    from .collect import contrastive_activations
    from .data import load_ab

    lm = _load(args)
    layers = args.layers or [args.layer]
    items = load_ab(args.behavior, args.split, limit=args.n_train)
    acts = contrastive_activations(lm, items, layers, mode=args.mode, behavior=args.behavior, split=args.split)
    for layer, (pos, neg) in sorted(acts.items()):
        gap = float((pos.mean(0) - neg.mean(0)).norm())
        print(f"layer {layer}: {tuple(pos.shape)} pairs, |mean(pos) - mean(neg)| = {gap:.3f}")
    return 0


def cmd_train(args) -> int:
    from .experiment import fit_methods

    lm = _load(args)
    steerers, seconds = fit_methods(lm, args.behavior, args.layer, [args.method], mode=args.mode, n_train=args.n_train)
    steerer = steerers[args.method]
    if args.alpha is not None:
        steerer.alpha = args.alpha
    steerer.extra["mode"] = args.mode
    steerer.save(args.output)
    print(f"wrote {args.output}: {args.method} steerer for {lm.model_id} layer {steerer.layer} "
          f"({args.behavior}, fitted in {seconds[args.method]:.1f} s)")
    return 0


def _report(result: dict, args, command: str) -> None:
    from .report import markdown, write_report

    result["command"] = command
    if args.out:
        paths = write_report(result, args.out, plots=not args.no_plots)
        print("report: " + ", ".join(str(p) for p in paths.values()))
    else:
        print(markdown(result))


def cmd_eval(args) -> int:
    from .experiment import run_behavior

    command = "innsteer " + " ".join(sys.argv[1:])
    lm = _load(args)
    if args.layer_sweep:
        return _layer_sweep(lm, args)
    behaviors = BEHAVIORS if args.all else (args.behavior,)
    results = []
    for behavior in behaviors:
        result, _ = run_behavior(lm, behavior, args.layer, args.methods, mode=args.mode, alphas=args.alphas,
                                 n_train=args.n_train, n_test=args.n_test, n_open=args.n_open,
                                 max_new_tokens=args.max_new_tokens)
        results.append(result)
        if args.all and args.out:
            sub = argparse.Namespace(**{**vars(args), "out": str(Path(args.out) / behavior)})
            _report(result, sub, command)
        elif not args.all:
            _report(result, args, command)
    if args.all:
        from .report import summary_markdown

        text = summary_markdown(results, command)
        print(text)
        if args.out:
            Path(args.out, "summary.md").write_text(text)
            Path(args.out, "summary.json").write_text(json.dumps(results, indent=1, default=str))
    return 0


def _layer_sweep(lm, args) -> int:
    from .baselines import fit_caa
    from .data import load_ab, train_val_split
    from .evaluate import layer_sweep

    train, val = train_val_split(load_ab(args.behavior, "generate"))
    train = train[: args.n_train] if args.n_train else train
    val = val[: args.n_test] if args.n_test else val
    alpha = max(args.alphas)
    shifts = layer_sweep(lm, fit_caa, train, val, args.layer_sweep, alpha=alpha, mode=args.mode, behavior=args.behavior)
    print(f"CAA at alpha {alpha:g}: shift of p_match (answer text) on {len(val)} validation items")
    for layer, shift in sorted(shifts.items()):
        print(f"  layer {layer:3d}: {shift:+.3f}")
    print(f"best layer: {max(shifts, key=shifts.get)}")
    return 0


def cmd_generate(args) -> int:
    if args.gguf:
        try:
            from .llama_cli import generate_gguf
        except ImportError as error:
            raise CLIError(f"--gguf needs innsteer's llama.cpp support and llama-cpp-python "
                           f"(pip install 'innsteer[llama]'): {error}") from error
        return generate_gguf(args)
    from .evaluate import generate
    from .steerer import load_steerer

    lm = _load(args)
    steerer = None
    if args.steer:
        steerer = load_steerer(args.steer, expect_hidden_size=lm.hidden_size, expect_model_id=lm.model_id)
    positions = "all" if args.steer_prompt else "after_prompt"
    plain, _, _ = generate(lm, args.prompt, max_new_tokens=args.max_new_tokens)
    steered = None
    if steerer is not None:
        steered, _, _ = generate(lm, args.prompt, steerer=steerer, alpha=args.alpha,
                                 max_new_tokens=args.max_new_tokens, positions=positions)
    for i, prompt in enumerate(args.prompt):
        print(f">>> {prompt}\n[unsteered] {plain[i].strip()}")
        if steered is not None:
            alpha = steerer.alpha if args.alpha is None else args.alpha
            print(f"[{steerer.method} alpha={alpha:g}] {steered[i].strip()}")
        print()
    return 0


def cmd_demo(args) -> int:
    from .evaluate import generate
    from .experiment import run_behavior
    from .report import sanity_line, tradeoff_table

    start = time.perf_counter()
    lm = _load(args)
    result, steerers = run_behavior(lm, args.behavior, args.layer, args.methods, mode=args.mode, alphas=args.alphas,
                                    n_train=args.n_train, n_test=args.n_test, n_open=args.n_open,
                                    max_new_tokens=args.max_new_tokens)
    base = next(p for p in result["points"] if p["method"] == "none")
    print(f"\n== {args.behavior}, layer {result['layer']}, {result['n_test']} test items ==")
    print(sanity_line(result["sanity"]))
    print(f"unsteered: p_match (answer text) {base['answer']:.3f}, (letter) {base['letter']:.3f}, "
          f"fluency NLL/token {base['nll']:.3f}\n")
    for p in result["points"]:
        if p["method"] != "none":
            print(f"{p['method']:>10} alpha {p['alpha']:>4g}: p_match answer {p['answer']:.3f} letter {p['letter']:.3f}"
                  f"  fluency cost {p['nll'] - base['nll']:+.3f} nats/token")
    print("\n" + tradeoff_table(result) + "\n")
    # Sample generations: each method at its largest alpha costing at most 1 nat/token (else its smallest).
    prompts = _open_questions(args.behavior, 2)
    samples = {"unsteered": generate(lm, prompts, max_new_tokens=40)[0]}
    for method in args.methods:
        alpha = _alpha_within_budget(result, method, budget=1.0) or min(args.alphas)
        samples[f"{method} alpha={alpha:g}"] = generate(lm, prompts, steerer=steerers[method], alpha=alpha,
                                                         max_new_tokens=40)[0]
    result["samples"] = samples
    for i, prompt in enumerate(prompts):
        print(f">>> {prompt}")
        for label, texts in samples.items():
            print(f"[{label}] {texts[i].strip()}")
        print()
    args.out = args.out or "innsteer-demo"
    _report(result, args, "innsteer " + " ".join(sys.argv[1:]))
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0


def _open_questions(behavior: str, n: int) -> list[str]:
    from .data import load_open_ended

    return load_open_ended(behavior, limit=n)


def _alpha_within_budget(result: dict, method: str, budget: float) -> Optional[float]:
    base = next(p for p in result["points"] if p["method"] == "none")
    fits = [p for p in result["points"] if p["method"] == method and p["nll"] - base["nll"] <= budget]
    return max((p["alpha"] for p in fits), default=None)


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    from .data import DataError
    from .models import ModelLoadError
    from .steerer import SteerFileError

    try:
        return int(args.func(args) or 0)
    except (CLIError, DataError, ModelLoadError, SteerFileError, FileNotFoundError, ValueError) as error:
        print(f"innsteer: error: {error}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
