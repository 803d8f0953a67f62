"""The PyTorch commands of the ``innsteer`` command line (parsed in ``innsteer.cli.main``)."""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Optional

from ..core.files import write_atomically
from ..datasets.caa import BEHAVIORS
from ._args import CLIError, check_input_file, check_output_dir, check_output_file

DEFAULT_BEHAVIOR = "corrigible-neutral-HHH"
# The demo's: the behavior where the validated settings steer best against CAA on validation data
# (docs/RESULTS.md, "Layer per behavior").
DEMO_BEHAVIOR = "myopic-reward"
DEMO_SAMPLES, DEMO_SAMPLE_TOKENS = 2, 40  # the demo's sample generations: prompts, reply length
JUDGE_HINT = "python -m innsteer.hf.models install qwen2.5-coder-1.5b"
PROMPT = "prompt"  # innsteer.eval.protocol.PROMPT: the prompt baselines' name
# the keys of innsteer.core.methods.METHODS, without importing torch to parse arguments
METHOD_NAMES = ("caa", "pca", "probe", "linear_act", "mimic", "odesteer", "hpr", "truthflow", "innsteer")


def _check_report(args) -> None:
    """Before any work: the report's directory, and matplotlib for its plots."""
    if args.out:
        check_output_dir(args.out, "--out")
        if not args.no_plots:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                from ..eval.report import PLOT_HINT

                raise CLIError(PLOT_HINT) from None


def _load(args):
    import torch

    from ..hf.models import load_model

    t = time.perf_counter()
    dtype = getattr(torch, getattr(args, "dtype", "float32"))
    lm = load_model(args.model, dtype=dtype)  # a file that holds no model raises ModelLoadError, in one line
    print(
        f"model {lm.model_id}: {lm.num_layers} layers, hidden size {lm.hidden_size} "
        f"(loaded in {time.perf_counter() - t:.1f} s)",
        file=sys.stderr,
    )
    _resolve_layers(lm, args)
    return lm


def _resolve_layers(lm, args) -> None:
    """Check the layer options against the model and make negative layers (from the last) absolute,
    so every later step, the files written included, sees one index per layer."""
    from ..core.hooks import check_layer

    if getattr(args, "layer", None) is not None:
        args.layer = check_layer(lm.model, args.layer)
    for option in ("layers",):
        layers = getattr(args, option, None)
        if layers:
            resolved = [check_layer(lm.model, layer) for layer in layers]
            repeated = sorted({layer for layer in resolved if resolved.count(layer) > 1})
            if repeated:
                raise CLIError(
                    f"--{option.replace('_', '-')} names layer {repeated[0]} more than once "
                    f"(negative layers count from the last: -1 is {lm.num_layers - 1})"
                )
            setattr(args, option, resolved)


def _choice(lm, args, source, method: str):
    """Where and how ``method`` steers (``innsteer.eval.tuned.Choice``): ``--layer`` if given, else the
    layer ``innsteer tune`` chose for this shipped behavior on this model (the shipped record; your
    --data never takes a shipped behavior's), else the depth-relative default. The record's training
    options come with its layer only."""
    from ..eval.tuned import Choice, choice

    tuned = choice(lm.model_id, None if args.data else source.name, method, lm.num_layers)
    if args.layer is None or args.layer == tuned.layer:
        return tuned
    return Choice(args.layer, {}, "--layer")


def _specs(lm, args, source, names) -> dict:
    """Each method's MethodSpec at its own chosen layer, with its chosen options (``prompt+<method>``:
    the method's)."""
    from ..eval.protocol import MethodSpec

    specs = {}
    for name in names:
        spec = MethodSpec.named(name, args.tokens, mode=getattr(args, "mode", "answer"))
        if not spec.steers:
            specs[name] = spec
            continue
        chosen = _choice(lm, args, source, spec.method)
        specs[name] = replace(spec, options=chosen.options, layer=chosen.layer)
        print(
            f"{name}: layer {chosen.layer}, options {chosen.options or 'the defaults'} ({chosen.source})",
            file=sys.stderr,
        )
    return specs


def _instructions(args, source) -> dict[int, str]:
    """{sign: instruction} for the prompt methods: --instruction / --away-instruction, else the
    shipped behavior's; checked before any model loads."""
    names = [m for m in args.methods if m == PROMPT or m.startswith(PROMPT + "+")]
    if not names:
        return {}
    if args.instruction is not None:
        toward, away = args.instruction, args.away_instruction
    else:
        toward, away = source.text.toward, args.away_instruction or source.text.away
    if toward is None:
        raise CLIError(f"--methods {','.join(names)}: your data has no shipped instruction; give --instruction TEXT")
    return {1: toward, **({-1: away} if away else {})}


def _check_judge_options(args) -> None:
    """Before any work: the description options go together, and --judge names a model that exists."""
    if args.opposite_description and not args.behavior_description and not args.behavior:
        raise CLIError("--opposite-description goes with --behavior-description (or a shipped --behavior)")
    from ..eval.judge import MAX_DESCRIPTION_CHARS

    for option in ("behavior_description", "opposite_description"):
        text = getattr(args, option)
        if text and len(text) > MAX_DESCRIPTION_CHARS:
            raise CLIError(
                f"--{option.replace('_', '-')} is {len(text)} characters long; a judge's choice takes at most "
                f"{MAX_DESCRIPTION_CHARS} (one sentence)"
            )
    if args.judge:
        from ..eval.judge import DEFAULT_JUDGE
        from ..hf.models import resolve_model_path

        resolve_model_path(DEFAULT_JUDGE if args.judge == "default" else args.judge)


def _load_judge(args):
    """The --judge model (None without one), loaded before the measurements so a judge that cannot
    load or answer fails first."""
    if not args.judge:
        return None
    from ..llama.judge import load_judge

    return load_judge(args.judge)


def _judged(
    report: dict, run, judge, args, source, lm, *, every_alpha: bool = True, answers: Optional[Path] = None
) -> None:
    """With a judge: its validation and its scores of the run's replies, into its report.
    ``answers``: a file keeping the judge's answers as they come (a rerun asks only the new ones)."""
    if judge is None:
        return
    from ..eval.judge import KeptAnswers, judge_result

    if answers is not None:
        judge = KeptAnswers(judge, answers)
    if args.behavior_description:  # your words replace both of the shipped behavior's
        description, opposite = args.behavior_description, args.opposite_description
    else:
        description, opposite = source.text.description, args.opposite_description or source.text.opposite
    items = source.test[: args.n_test] if args.n_test else source.test
    prompts = source.prompts[: args.n_open]
    chosen = report["chosen_alpha"]
    report.update(judge_result(run, chosen, judge, prompts, items, description, opposite, every_alpha=every_alpha))
    report["judge"]["self_judged"] = judge.name == lm.model_id  # the judge judged its own replies


def _pairs(methods) -> list[tuple[str, str]]:
    """The comparisons beside INNSteer - CAA where prompt methods run: each method against the prompt
    alone, and the prompt with INNSteer against the prompt with CAA."""
    pairs = [(m, PROMPT) for m in methods if m != PROMPT] if PROMPT in methods else []
    if {f"{PROMPT}+innsteer", f"{PROMPT}+caa"} <= set(methods):
        pairs.append((f"{PROMPT}+innsteer", f"{PROMPT}+caa"))
    return pairs


def _check_context(lm, max_new_tokens: int, prompts: list[str], what: str = "prompt") -> None:
    """Refuse replies to ``prompts`` that cannot fit the model's context (positions past it are garbage)."""
    from ..hf.prompts import format_prompt, uses_chat_template

    context = getattr(lm.model.config, "max_position_embeddings", None)
    if context is None:
        return
    special = not uses_chat_template(lm.tokenizer)
    for i, prompt in enumerate(prompts):
        length = len(lm.tokenizer(format_prompt(lm.tokenizer, prompt), add_special_tokens=special).input_ids)
        if length + max_new_tokens > context:
            raise CLIError(
                f"{what} {i + 1} ({length} tokens) plus --max-new-tokens {max_new_tokens} does not fit "
                f"the model's context of {context} tokens"
            )


def _data(args, behavior: Optional[str] = None):
    """The command's DataSource, read and checked before any model loads."""
    from ..datasets.source import from_files, shipped

    for option, path in (("--data", args.data), ("--test-data", args.test_data), ("--prompts", args.prompts)):
        if path:
            check_input_file(path, option)
    if args.data:
        if args.behavior:
            raise CLIError("give either --behavior (a shipped set) or --data (your file), not both")
        source = from_files(args.data, args.test_data, args.prompts)
    else:
        if args.test_data:
            raise CLIError("--test-data goes with --data (the shipped behaviors have their own test split)")
        source = shipped(behavior or args.behavior or DEFAULT_BEHAVIOR, args.prompts)
    if args.mode == "letter" and not source.lettered:
        raise CLIError(f"{source.name} has items with plain answers (no lettered options): use --mode answer")
    for note in source.notes:
        print(f"innsteer: note: {note}", file=sys.stderr)
    return source


def cmd_collect(args) -> int:
    from ..hf.collect import contrastive_activations

    source = _data(args)
    items = (source.test if args.split == "test_ab" else source.train)[: args.n_train]
    lm = _load(args)
    layers = args.layers or sorted({_choice(lm, args, source, method).layer for method in ("caa", "innsteer")})
    acts = contrastive_activations(
        lm, items, layers, mode=args.mode, tokens=args.tokens, behavior=source.name, split=args.split
    )
    for layer, (pos, neg) in sorted(acts.items()):
        gap = float((pos.mean(0) - neg.mean(0)).norm())
        print(f"layer {layer}: {tuple(pos.shape)} rows per class, |mean(pos) - mean(neg)| = {gap:.3f}")
    return 0


def cmd_train(args) -> int:
    from ..datasets.ab import train_val_split
    from ..hf.fit import fit_method

    check_output_file(args.output, "-o/--output")
    source = _data(args)
    lm = _load(args)
    chosen = _choice(lm, args, source, args.method)
    train = train_val_split(source.train)[0]  # the protocol's seed-0 training part; the rest validates
    start = time.perf_counter()
    steerer = fit_method(
        lm, args.method, train[: args.n_train] if args.n_train else train, chosen.layer, tokens=args.tokens,
        mode=args.mode, options=chosen.options, behavior=source.name, split="train-s0", progress=True,
    )  # fmt: skip
    if args.alpha is not None:
        steerer.alpha = args.alpha
    steerer.save(args.output)
    print(
        f"wrote {args.output}: {args.method} steerer for {lm.model_id} layer {steerer.layer} "
        f"({source.name}, fitted in {time.perf_counter() - start:.1f} s)"
    )
    return 0


def _report(result: dict, args, command: str) -> None:
    from ..eval.report import markdown, write_report

    result["command"] = command
    if args.out:
        paths = write_report(result, args.out, plots=not args.no_plots)
        print("report: " + ", ".join(str(p) for p in paths.values()))
    else:
        print(markdown(result))


def cmd_eval(args) -> int:
    """The comparison protocol of docs/RESULTS.md on one behavior (or --all): every method fitted per
    seed, swept on both sides, the paired bootstrap of INNSteer - CAA, the report."""
    from ..eval.metrics import multiple_choice_sanity
    from ..eval.protocol import protocol_report, run_protocol
    from ..eval.report import summary_markdown

    _check_report(args)
    if args.all and (args.data or args.behavior):
        raise CLIError("--all runs every shipped behavior; it takes neither --behavior nor --data")
    if 0 in args.alphas:
        raise CLIError("--alphas: the protocol sweeps magnitudes on both sides of the unsteered point; 0 is not one")
    command = "innsteer " + " ".join(sys.argv[1:])
    sources = [_data(args, behavior) for behavior in BEHAVIORS] if args.all else [_data(args)]
    instructions = {source.name: _instructions(args, source) for source in sources}
    _check_judge_options(args)
    lm = _load(args)
    judge = _load_judge(args)
    questions = [q for source in sources for q in source.prompts[: args.n_open]]
    _check_context(lm, args.max_new_tokens, questions, "open-ended prompt")
    sanity = multiple_choice_sanity(lm)
    compare = ("innsteer", "caa") if {"innsteer", "caa"} <= set(args.methods) else ()
    results = []
    for source in sources:
        specs = _specs(lm, args, source, args.methods)
        out = None if not args.out else Path(args.out, source.name) if args.all else Path(args.out)
        kept = None if out is None else out / "stages"  # each curve and judge answer as it comes: a rerun resumes
        result = run_protocol(
            lm,
            source.train[: args.n_train] if args.n_train else source.train,
            source.test[: args.n_test] if args.n_test else source.test,
            source.prompts[: args.n_open],
            layer=next(iter(specs.values())).layer,
            specs=specs,
            seeds=args.seeds,
            behavior=source.name,
            max_new_tokens=args.max_new_tokens,
            ladder=sorted({abs(a) for a in args.alphas}),
            compare=compare,
            instructions=instructions[source.name],
            also_compare=_pairs(args.methods),
            stages=kept,
        )
        report = {**protocol_report(result), "sanity": sanity, "mode": args.mode}
        _judged(report, result, judge, args, source, lm, answers=None if kept is None else kept / "judge.jsonl")
        results.append(report)
        if args.all and args.out:
            _report(report, argparse.Namespace(**{**vars(args), "out": str(out)}), command)
        elif not args.all:
            _report(report, args, command)
    if args.all:
        text = summary_markdown(results, command)
        print(text)
        if args.out:
            write_atomically(Path(args.out, "summary.md"), text)
            write_atomically(Path(args.out, "summary.json"), json.dumps(results, indent=1, default=str))
    return 0


def cmd_tune(args) -> int:
    from ..eval.tune import TUNE_BUDGETS, check_metric, check_variants, split_items, tune

    args.mode = "answer"
    source = _data(args)
    _check_report(args)
    items = source.train[: args.n_train] if args.n_train else source.train
    test_items = source.test or None  # None: tune holds a part of the items out
    # before the model loads (minutes on a first load)
    check_variants(args.variants, TUNE_BUDGETS[args.budget])
    split_items(items, test_items, args.seed)
    check_metric(args.metric, [*items, *(test_items or ())])
    out = Path(args.out)
    lm = _load(args)
    _check_context(lm, 64, source.prompts, "open-ended prompt")
    record = tune(
        lm, None, items, test_items=test_items, prompts=source.prompts,
        behavior=source.name, budget=args.budget, metric=args.metric, variants=args.variants, out=out, seed=args.seed,
        plots=not args.no_plots, command=["innsteer", *sys.argv[1:]],
    )  # fmt: skip
    print()
    print((out / "tune.md").read_text())
    written = [out / "tune.json", out / "tune.md", *([] if args.no_plots else [out / "tune.png"])]
    written += [out / path for path in record["steer_files"].values()]
    print("wrote " + ", ".join(map(str, written)))
    return 0


def cmd_generate(args) -> int:
    if args.alpha is not None and not args.steer:
        raise CLIError(
            "--alpha sets the strength of --steer, which is missing (a control vector's is --control-strength)"
        )
    if args.steer_prompt and not (args.steer or args.control_vector):
        raise CLIError("--steer-prompt needs --steer or --control-vector")
    if args.steer:
        check_input_file(args.steer, "--steer")
    if args.gguf:
        try:
            from .llama import generate_gguf
        except ImportError as error:
            raise CLIError(
                f"--gguf needs innsteer's llama.cpp support and llama-cpp-python "
                f"(pip install 'innsteer[llama]'): {error}"
            ) from error
        return generate_gguf(args)
    if args.control_vector or args.control_strength is not None:
        raise CLIError("--control-vector and --control-strength are for llama.cpp: they need --gguf MODEL.gguf")
    from ..llama.model_file import is_gguf

    if args.steer and is_gguf(args.steer):
        raise CLIError(f"--steer {args.steer} is a GGUF for llama.cpp: run it with --gguf MODEL.gguf")
    from ..core.steerers import load_steerer
    from ..eval.metrics import generate

    lm = _load(args)
    steerer = None
    if args.steer:
        from ..core.hooks import check_layer

        steerer = load_steerer(args.steer, expect_hidden_size=lm.hidden_size, expect_model_id=lm.model_id)
        check_layer(lm.model, steerer.layer)  # now, not after the unsteered replies
    _check_context(lm, args.max_new_tokens, args.prompt)
    positions = "all" if args.steer_prompt else "after_prompt"
    plain, _, _ = generate(lm, args.prompt, max_new_tokens=args.max_new_tokens)
    steered = None
    if steerer is not None:
        steered, _, _ = generate(
            lm, args.prompt, steerer=steerer, alpha=args.alpha, max_new_tokens=args.max_new_tokens, positions=positions
        )
    for i, prompt in enumerate(args.prompt):
        print(f">>> {prompt}\n[unsteered] {plain[i].strip()}")
        if steered is not None:
            alpha = steerer.alpha if args.alpha is None else args.alpha
            print(f"[{steerer.method} alpha={alpha:g}] {steered[i].strip()}")
        print()
    return 0


def cmd_demo(args) -> int:
    from ..eval.metrics import generate, multiple_choice_sanity
    from ..eval.protocol import comparison_table, layers_label, protocol_report, run_protocol
    from ..eval.report import sanity_line

    missing = [m for m in ("caa", "innsteer") if m not in args.methods]
    if missing:
        raise CLIError(f"--methods: the demo compares INNSteer with CAA; add {','.join(missing)}")
    if 0 in args.alphas:
        raise CLIError("--alphas: the demo sweeps magnitudes on both sides of the unsteered point; 0 is not one")
    args.out = args.out or "innsteer-demo"
    _check_report(args)
    if not args.behavior and not args.data:
        args.behavior = DEMO_BEHAVIOR
    source = _data(args)
    instructions = _instructions(args, source)
    if args.judge is None:
        from ..eval.judge import default_judge_installed

        args.judge = "default" if default_judge_installed() else None
    elif args.judge == "none":
        args.judge = None
    _check_judge_options(args)
    start = time.perf_counter()
    lm = _load(args)
    judge = _load_judge(args)
    _check_context(lm, max(args.max_new_tokens, DEMO_SAMPLE_TOKENS), source.prompts[: args.n_open], "open-ended prompt")
    specs = _specs(lm, args, source, args.methods)
    result = run_protocol(
        lm,
        source.train[: args.n_train] if args.n_train else source.train,
        source.test[: args.n_test] if args.n_test else source.test,
        source.prompts[: args.n_open],
        layer=specs["innsteer"].layer,
        specs=specs,
        seeds=args.seeds,
        behavior=source.name,
        max_new_tokens=args.max_new_tokens,
        ladder=sorted({abs(a) for a in args.alphas}),
        compare=("innsteer", "caa"),
        return_steerers=True,
        instructions=instructions,
        also_compare=_pairs(args.methods),
    )
    sanity = multiple_choice_sanity(lm)
    print(
        f"\n== {source.name}, layers {layers_label(result)}: {result.n_test} test items, "
        f"{result.n_prompts} prompts, seeds {result.seeds} =="
    )
    print(sanity_line(sanity))
    for metric in result.metrics:
        print(
            f"\nBehaviour shift ({metric} metric, toward the behavior) at fluency cost <= budget "
            "(nats/token); the difference's paired bootstrap 95% interval:\n"
        )
        print(comparison_table([result], metric))
    # samples: each method at its largest alpha costing at most 1 nat/token on the first seed
    prompts = source.prompts[:DEMO_SAMPLES]
    samples = {"unsteered": generate(lm, prompts, max_new_tokens=DEMO_SAMPLE_TOKENS)[0]}
    report = {**protocol_report(result), "sanity": sanity}
    for method, steerer in result.steerers.items():
        alpha = report["chosen_alpha"][method]
        samples[f"{method} alpha={alpha:g}"] = generate(
            lm, prompts, steerer=steerer, alpha=alpha, max_new_tokens=DEMO_SAMPLE_TOKENS
        )[0]
    report["samples"] = samples
    print()
    for i, prompt in enumerate(prompts):
        print(f">>> {prompt}")
        for label, texts in samples.items():
            print(f"[{label}] {texts[i].strip()}")
        print()
    _judged(report, result, judge, args, source, lm, every_alpha=False)
    if "judged" in report:
        from ..eval.judge import judged_table

        print("Judged replies (each method at its alpha; the judge's p(yes), 95% intervals over prompts):\n")
        print(judged_table(report) + "\n")
    else:
        print(f"(judged columns: --judge MODEL, or install the default judge: {JUDGE_HINT})\n")
    _report(report, args, "innsteer " + " ".join(sys.argv[1:]))
    print(f"demo finished in {time.perf_counter() - start:.0f} s")
    return 0
