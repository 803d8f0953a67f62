"""``innsteer tune``: the validation study as one command, on any contrastive data and model.

The items are split, seeded, into a training pool and test items (unless test items are given).
On validation data only (each validation seed's held-out part of the pool, ``run_protocol`` in its
validation mode), each method is tuned separately — CAA gets its layer chosen exactly as INNSteer
does, so the baseline is tuned as hard as the method:

1. the layer, from a grid relative to the model's depth (``TuneBudget.layer_fractions``), by the
   validation area under the behaviour-vs-fluency curve up to 1 nat/token toward the behavior,
   with the repetition gate (``innsteer.eval.tradeoff``), by one metric (``metric``: the fork
   metric unless told otherwise, ``RANKED_BY``);
2. for INNSteer, its training options at its best layer (``TuneBudget.variants``), measured in
   both directions, chosen for each sign apart: the variant with the largest area toward the
   behavior steers at alpha > 0, the one with the largest area away at alpha < 0. Where they
   differ the steerer is two maps (``SignedSteerer``; options ``{..., "away": {...}}``): a map
   trained for alpha = +1 alone can fail to steer away, and one trained for both signs gives up
   part of the gain toward the behavior.

Then the chosen configurations are fitted on the pool for each test seed and compared on the
test items in both directions, with paired bootstrap intervals (``run_protocol`` in its test
mode). Everything is written under ``out``: ``tune.json`` (the choices with their validation
scores, the test comparison), the chosen steerers as steer files, ``tune.md``, and each finished
stage in ``stages/`` (the test's curves and fits one by one in ``stages/test/``), so a run that
was interrupted resumes where it stopped.
"""

from __future__ import annotations

import json
import os
import time
import warnings
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from ..core.errors import ConfigError
from ..core.files import write_atomically
from ..core.hooks import decoder_layers
from ..core.methods import innsteer_config
from ..datasets.ab import METRICS, RANKED_BY, ABItem, hold_out, train_val_split
from ..datasets.files import NEUTRAL_PROMPTS
from ..hf.collect import contrastive_activations
from ..hf.fit import as_loaded_model, pairs_to_items
from .protocol import ALPHA_LADDER, MethodSpec, Unsteered, run_protocol
from .provenance import provenance
from .report import pyplot
from .results import Curve, Run, interval_cell
from .stages import Stages, digest
from .tradeoff import REPETITION_GATE, curve_summary

SCHEMA_VERSION = 2  # 2: validation stages keep every metric's areas; the record names its ranking metric
TOKENS = "all"  # both methods fit every answer token's row (docs/RESULTS.md: both steered best so)
TEST_FRACTION = 0.2  # of the items, held out for the test comparison when no test items are given (as --data)
MIN_POOL, MIN_TEST = 8, 2  # the fewest items a tuning run can split and compare on


@dataclass(frozen=True)
class TuneBudget:
    """How much a tuning run measures. ``variants``: INNSteer's option sets tried at its best layer
    (name -> TrainConfig fields; the first is the defaults)."""

    layer_fractions: tuple[float, ...]
    variants: dict[str, dict]
    validation_seeds: tuple[int, ...]
    test_seeds: tuple[int, ...]
    n_prompts: int
    max_new_tokens: int
    validation_ladder: tuple[float, ...] = ALPHA_LADDER  # the alphas of the validation curves
    ladder: tuple[float, ...] = ALPHA_LADDER  # of the test curves
    # at most this many pool / test items (a seeded sample of larger data; None: all): what keeps
    # a run's time bounded whatever the data's size
    max_pool: Optional[int] = None
    max_test: Optional[int] = None


# The options the ablation found to matter (docs/RESULTS.md): the transport term (on by default),
# the sides it trains for (both: the steer also carries positives onto negatives at alpha = -1; on
# myopic-reward's validation items at layer 16 it raised the area away from 0.011 to 0.077, CAA
# 0.056, and lowered the area toward from 0.280 to 0.223, CAA 0.007), and the number of couplings.
_VARIANTS = {
    "defaults": {},
    "both-sides": {"transport_sides": "both"},
    "no-transport": {"transport_weight": 0.0},
    "8-couplings": {"num_couplings": 8},
    "8-couplings-both-sides": {"num_couplings": 8, "transport_sides": "both"},
    # a map trained for alpha = -1 alone: a candidate for the away side of a signed steerer (on
    # hallucination no map above steered away at all on validation; it did, and was chosen there
    # and on myopic-reward: docs/RESULTS.md)
    "away-only": {"transport_sides": "away"},
    # alpha lengthening the map's step at alpha = +-1 rather than translating further in phi-space
    # (INNSteerer scaling): on validation items it raised the defaults' area toward and the away-only
    # map's area away on refusal (SmolLM2 0.246 -> 0.282, 0.169 -> 0.235; Qwen2.5-Coder 0.229 ->
    # 0.317, 0.077 -> 0.142) and SmolLM2's myopic-reward (0.284 -> 0.373, 0.081 -> 0.129), and
    # lowered both on Qwen2.5-Coder's coordinate-other-ais (0.450 -> 0.403, 0.168 -> 0.130) and
    # corrigible-neutral-HHH (0.273 -> 0.251, 0.236 -> 0.197) (docs/RESULTS.md): a choice per run.
    # Judged as text its A/B lead did not carry over (SmolLM2 refusal, hallucination: level with CAA)
    "displacement": {"scaling": "displacement"},
    "away-only-displacement": {"transport_sides": "away", "scaling": "displacement"},
}
TUNE_BUDGETS = {
    "quick": TuneBudget(
        layer_fractions=(0.35, 0.55, 0.75),
        variants={
            name: _VARIANTS[name]
            for name in (
                "defaults",
                "both-sides",
                "no-transport",
                "away-only",
                "displacement",
                "away-only-displacement",
            )
        },
        validation_seeds=(0,),
        test_seeds=(0, 1),
        n_prompts=6,
        max_new_tokens=24,
        validation_ladder=(1.0, 2.0, 4.0, 8.0, 12.0),
        max_pool=200,
        max_test=50,
    ),
    "full": TuneBudget(
        layer_fractions=(0.25, 0.35, 0.45, 0.55, 0.65, 0.75, 0.85),
        variants=_VARIANTS,
        validation_seeds=(0, 1),
        test_seeds=(0, 1, 2),
        n_prompts=10,
        max_new_tokens=32,
    ),
}
COMPARED = ("innsteer", "caa")


def candidate_layers(n_layers: int, fractions: Sequence[float]) -> list[int]:
    """The grid's layers for a model with ``n_layers`` decoder layers (the last one excluded: its
    output feeds only the head)."""
    if n_layers < 2:
        raise ConfigError(f"tuning needs a model with at least 2 decoder layers, got {n_layers}")
    return sorted({min(n_layers - 2, max(0, round(f * (n_layers - 1)))) for f in fractions})


def validation_area(curve: Curve, sign: int, metric: str) -> float:
    """A validation curve's area to 1 nat/token toward the behavior (``sign`` -1: away from it) by
    ``metric``, with the repetition gate."""
    items = np.arange(len(curve.base_scores["answer"]))
    prompts = np.arange(len(curve.base_nll))
    return curve_summary(curve, items, prompts, sign, metric, REPETITION_GATE)["auc"]


def check_metric(metric: str, items: Sequence[ABItem]) -> None:
    """``metric`` must be one the items can be scored by (the letter metric: lettered items)."""
    if metric not in METRICS:
        raise ConfigError(f"unknown metric '{metric}'; choose one of: {', '.join(METRICS)}")
    if metric == "letter" and not all(item.lettered for item in items):
        raise ConfigError("the letter metric needs A/B items with lettered options; these are plain answers")


def choose_variants(by_options: dict[str, dict[str, float]]) -> tuple[str, str]:
    """(the option set with the largest validation area toward the behavior, the one with the
    largest area away from it); ties go to the earlier set (the defaults first)."""
    return tuple(max(by_options, key=lambda name: by_options[name][side]) for side in ("toward", "away"))


def signed_options(variants: dict[str, dict], toward: str, away: str) -> dict:
    """The innsteer options of the chosen sets: one map's, or two maps' (``away``: the second
    map's, for alpha < 0) where the signs chose differently."""
    return dict(variants[toward]) if toward == away else {**variants[toward], "away": dict(variants[away])}


def check_variants(variants: Optional[dict], plan: TuneBudget) -> dict[str, dict]:
    """``tune``'s extra option sets, checked before any work: a dict of new names to TrainConfig
    and FlowConfig fields that make a valid configuration (one map each: the per-sign choice pairs
    them)."""
    if variants is None:
        return {}
    if not isinstance(variants, dict):
        raise ConfigError(f"variants must map names to option dicts, got {type(variants).__name__}")
    for name, options in variants.items():
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a variant's name must be a non-empty string, got {name!r}")
        if name in plan.variants and options != plan.variants[name]:
            raise ConfigError(
                f"variant '{name}' is already among the budget's, as {plan.variants[name]}: "
                f"name the new option set otherwise (the budget's: {', '.join(plan.variants)})"
            )
        if not isinstance(options, dict):
            raise ConfigError(f"variant '{name}' must be a dict of training options, got {options!r}")
        for key, why in (("away", "tune chooses each sign's variant"), ("seed", "tune sets it per seed")):
            if key in options:
                raise ConfigError(f"variant '{name}': '{key}' is not an option here ({why})")
        try:
            innsteer_config(**options).check()
        except (TypeError, ValueError) as error:
            raise ConfigError(f"variant '{name}': {error}") from error
    # one the budget already has, options and all (a command from before the budget gained it), is
    # measured as the budget's
    return {name: dict(options) for name, options in variants.items() if name not in plan.variants}


def split_items(items: Sequence[ABItem], test_items: Optional[Sequence[ABItem]], seed: int):
    """(training pool, test items): ``test_items`` as given, else a seeded TEST_FRACTION of ``items``.
    The pool is split again into training and validation parts for each fit, so it needs several items.
    Repeated items are left out, with a warning: one on both sides would be tested on what was trained."""
    pool, test, left_out = hold_out(items, test_items, fraction=TEST_FRACTION, seed=seed)
    if sum(left_out.values()):
        warnings.warn(
            f"{sum(left_out.values())} repeated item(s) left out (training and test items must differ)", stacklevel=2
        )
    if len(pool) < MIN_POOL or len(test) < MIN_TEST:
        raise ConfigError(
            f"tuning needs at least {MIN_POOL} training items and {MIN_TEST} test items, got {len(pool)} and "
            f"{len(test)}: give more items (a fifth of them is held out for the test unless test items are given)"
        )
    return pool, test


def _sample(items: list, limit: Optional[int], seed: int) -> list:
    """At most ``limit`` of ``items``: a seeded sample in their order (all of them if fewer)."""
    if limit is None or len(items) <= limit:
        return items
    keep = sorted(np.random.default_rng(seed).choice(len(items), limit, replace=False))
    return [items[i] for i in keep]


def tune(
    model,
    tokenizer=None,
    items: Sequence = (),
    *,
    test_items: Optional[Sequence] = None,
    prompts: Optional[Sequence[str]] = None,
    behavior: str = "custom",
    budget: str = "quick",
    metric: str = RANKED_BY,
    variants: Optional[dict[str, dict]] = None,
    out: Optional[str | os.PathLike] = None,
    seed: int = 0,
    plots: bool = True,
    progress: bool = True,
    command: Optional[list[str]] = None,
) -> dict:
    """Tune CAA and INNSteer on ``items`` for ``model`` (see the module docstring) and return the
    record ``tune.json`` holds; with ``out``, also write it, the steer files and the report there.

    ``model``, ``tokenizer``: a Hugging Face causal LM and its tokenizer, or an innsteer
    ``LoadedModel`` (tokenizer None). ``items`` and ``test_items``: contrastive pairs as
    ``innsteer.fit`` takes them (``(positive, negative)`` texts, ``(prompt, positive, negative)``)
    or A/B items. ``prompts``: open-ended prompts for the fluency measure (default: a neutral set).
    ``metric``: what the choices are ranked by and the test comparison leads with (``METRICS``;
    every metric the items have is measured and reported either way).
    ``variants``: more INNSteer option sets tried beside the budget's (name -> TrainConfig and
    FlowConfig fields, e.g. ``{"away-only": {"transport_sides": "away"}}``); each is measured in
    its own stage, so adding one to a finished run measures only it and the test stage.
    ``plots``: with ``out``, also ``tune.png`` (needs matplotlib, checked before any work).
    ``command``: the command line recorded in the record's provenance (default: this process's).
    """
    if budget not in TUNE_BUDGETS:
        raise ConfigError(f"unknown budget '{budget}'; choose one of: {', '.join(TUNE_BUDGETS)}")
    plan = TUNE_BUDGETS[budget]
    extra = check_variants(variants, plan)
    if plots and out is not None:
        pyplot()  # now, not after the measurements
    lm = as_loaded_model(model, tokenizer, "tune")
    items = pairs_to_items(items)
    test_items = None if test_items is None else pairs_to_items(test_items)
    start, where = time.perf_counter(), provenance(command)  # the code and machine at the start: what ran
    out_dir = None if out is None else Path(out)
    pool, test = split_items(items, test_items, seed)
    check_metric(metric, [*pool, *test])
    available = {"pool": len(pool), "test": len(test)}
    pool, test = _sample(pool, plan.max_pool, seed), _sample(test, plan.max_test, seed)
    prompts = list(prompts or NEUTRAL_PROMPTS)[: plan.n_prompts]
    layers = candidate_layers(len(decoder_layers(lm.model)), plan.layer_fractions)
    variants = {**plan.variants, **extra}
    default_variant = next(iter(variants))
    # The budget's other option sets are not in the fingerprint: each is measured in a stage of its
    # own, named by its name and options, so a budget that gains one keeps every stage it had.
    budget_settings = {key: value for key, value in asdict(plan).items() if key != "variants"}
    stages = Stages(
        None if out_dir is None else out_dir / "stages",
        {
            "schema": SCHEMA_VERSION,
            "model_id": lm.model_id,
            "dtype": lm.dtype,
            "behavior": behavior,
            "budget": budget_settings,
            "first_variant": [default_variant, variants[default_variant]],
            "seed": seed,
            "items": digest([*pool, None, *test]),
            "prompts": digest(prompts),
        },
    )
    common = {"behavior": behavior, "max_new_tokens": plan.max_new_tokens, "progress": progress}
    unsteered = Unsteered(lm)  # every validation stage scores the same items: their caches are built once

    def validate(layer: int, specs: dict[str, MethodSpec], signs: tuple[int, ...] = (1,)) -> dict:
        """{name: {metric: {"toward"/"away": the seed-mean validation area}}} for every metric the
        items have and the measured sides (all kept: ranking by another metric reads them back)."""
        result = run_protocol(
            lm, pool, None, prompts, layer=layer, specs=specs, seeds=plan.validation_seeds, compare=(), signs=signs,
            ladder=plan.validation_ladder, unsteered=unsteered, **common,
        )  # fmt: skip
        sides = {1: "toward", -1: "away"}
        return {
            name: {
                m: {sides[sign]: float(np.mean([validation_area(c, sign, m) for c in curves])) for sign in signs}
                for m in result.metrics
            }
            for name, curves in result.curves.items()
        }

    # one forward pass per validation seed collects every candidate layer (then cached on disk)
    for s in plan.validation_seeds:
        contrastive_activations(
            lm, train_val_split(pool, seed=s)[0], layers, tokens=TOKENS, behavior=behavior, split=f"train-s{s}",
            seed=s, progress=progress,
        )  # fmt: skip

    def specs_default(layer: Optional[int] = None) -> MethodSpec:
        return MethodSpec("innsteer", TOKENS, variants[default_variant], layer=layer)

    by_layer: dict[str, dict[int, float]] = {"caa": {}, "innsteer": {}}
    for layer in layers:
        specs = {"caa": MethodSpec("caa", TOKENS), "innsteer": specs_default()}
        areas = stages.run(f"layer{layer}", lambda layer=layer, specs=specs: validate(layer, specs))
        for name in by_layer:
            by_layer[name][layer] = areas[name][metric]["toward"]
        _say(progress, f"layer {layer}: validation area CAA {by_layer['caa'][layer]:.3f}, "
             f"INNSteer {by_layer['innsteer'][layer]:.3f}")  # fmt: skip
    chosen_layer = {name: max(scores, key=scores.get) for name, scores in by_layer.items()}

    # INNSteer's options at its layer, both ways (the first variant was measured toward already), and
    # CAA away at its layer: the bar a variant's area away must reach
    inn_layer, caa_layer = chosen_layer["innsteer"], chosen_layer["caa"]
    by_options = {}
    for name, options in list(variants.items())[1:]:  # a stage each, named by what it measures
        spec = {name: MethodSpec("innsteer", TOKENS, options)}
        areas = stages.run(
            f"options-layer{inn_layer}-{digest([name, sorted(options.items())])}",
            lambda spec=spec: validate(inn_layer, spec, (1, -1)),
        )
        by_options[name] = areas[name][metric]
    away = stages.run(
        f"away-layers{caa_layer}-{inn_layer}",
        lambda: validate(
            inn_layer,
            {"caa": MethodSpec("caa", TOKENS, layer=caa_layer), default_variant: specs_default(inn_layer)},
            (-1,),
        ),
    )
    by_options = {
        default_variant: {"toward": by_layer["innsteer"][inn_layer], **away[default_variant][metric]},
        **by_options,
    }
    caa_away = away["caa"][metric]["away"]
    toward_variant, away_variant = choose_variants(by_options)
    _say(progress, f"INNSteer options (toward / away; CAA away {caa_away:.3f}): "
         + ", ".join(f"{n} {a['toward']:.3f} / {a['away']:.3f}" for n, a in by_options.items()))  # fmt: skip

    chosen = {
        "caa": {
            "layer": chosen_layer["caa"],
            "options": {},
            "validation": {
                "auc": by_layer["caa"][caa_layer],
                "away_auc": caa_away,
                "by_layer": _keys(by_layer["caa"]),
            },
        },
        "innsteer": {
            "layer": inn_layer,
            "options": signed_options(variants, toward_variant, away_variant),
            "variant": toward_variant,
            "away_variant": away_variant,
            "validation": {
                "auc": by_options[toward_variant]["toward"],
                "away_auc": by_options[away_variant]["away"],
                "by_layer": _keys(by_layer["innsteer"]),
                "by_options": by_options,
            },
        },
    }
    final = {
        name: MethodSpec(name, TOKENS, choice["options"], layer=choice["layer"]) for name, choice in chosen.items()
    }

    unsteered.clear()  # the test stage scores other items

    def test_stage() -> dict:
        result = run_protocol(
            lm, pool, test, prompts, layer=final["caa"].layer, specs=final, seeds=plan.test_seeds,
            compare=COMPARED, return_steerers=True, ladder=plan.ladder, **common,
            stages=None if out_dir is None else out_dir / "stages" / "test",  # each curve as it finishes
        )  # fmt: skip
        if out_dir is not None:  # written with the stage, so a resumed run has them too
            out_dir.mkdir(parents=True, exist_ok=True)
            for name, steerer in result.steerers.items():  # the first test seed's
                steerer.save(out_dir / f"{name}.safetensors")
        return result.to_dict()

    # named by the configurations it measures: a rerun that chooses differently (new code, a new
    # rule) measures them instead of reading the other choice's test
    configurations = sorted((n, c["layer"], sorted(c["options"].items())) for n, c in chosen.items())
    result = stages.run(f"test-{digest([configurations, METRICS])}", test_stage)  # a new metric: measured again
    comparison = Run.from_dict(result, "the tune's test stage").comparison.sides_dict()
    test_record: dict[str, Any] = dict(comparison[f"{metric}/toward"])
    test_record["away"] = comparison[f"{metric}/away"]
    for other in METRICS:  # the other metrics the items have, beside the ranking one
        if other != metric and f"{other}/toward" in comparison:
            test_record[other] = {"toward": comparison[f"{other}/toward"], "away": comparison[f"{other}/away"]}
    record = {
        "schema": SCHEMA_VERSION,
        "metric": metric,
        "model_id": lm.model_id,
        "behavior": behavior,
        "budget": budget,
        "seed": seed,
        "n_layers": len(decoder_layers(lm.model)),
        "layers": layers,
        "n_items": {"pool": len(pool), "test": len(test), "prompts": len(prompts), "available": available},
        "validation_seeds": list(plan.validation_seeds),
        "test_seeds": list(plan.test_seeds),
        **({"variants": extra} if extra else {}),
        "chosen": chosen,
        "compare": list(COMPARED),
        "test": test_record,
        "steer_files": {name: f"{name}.safetensors" for name in final},
        "minutes": round((time.perf_counter() - start) / 60, 2),
        "provenance": where,
    }
    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomically(out_dir / "tune.json", json.dumps(record, indent=1))
        write_atomically(out_dir / "tune.md", tune_markdown(record))
        if plots:
            plot_tune(record, out_dir / "tune.png")
    return record


def _say(progress: bool, text: str) -> None:
    if progress:
        print(f"tune: {text}", flush=True)


def _keys(scores: dict[int, float]) -> dict[str, float]:
    return {str(layer): score for layer, score in sorted(scores.items())}


def _sampled(n_items: dict) -> str:
    """ " (seeded samples of N pool / M test items)" where the budget sampled the data down."""
    available = n_items.get("available", {})
    if available.get("pool", 0) <= n_items["pool"] and available.get("test", 0) <= n_items["test"]:
        return ""
    return f" (seeded samples of {available['pool']} pool / {available['test']} test items)"


def ranked_by(record: dict) -> str:
    """The metric a record's choices were ranked by (records before schema 2: the answer metric)."""
    return record.get("metric", "answer")


def comparison_rows(record: dict, metric: str) -> Optional[dict]:
    """{"toward": summaries, "away": summaries}: INNSteer - CAA on the test items by ``metric``
    (None where the record did not measure it)."""
    test = record["test"]
    if metric == ranked_by(record):
        return {"toward": {k: v for k, v in test.items() if k.startswith(("at", "auc"))}, "away": test["away"]}
    return test.get(metric)


def tune_markdown(record: dict) -> str:
    """The tuning report: each method's choice with its validation scores, then the test comparison."""
    chosen, metric = record["chosen"], ranked_by(record)
    lines = [
        f"# innsteer tune: {record['behavior']} on {record['model_id']} ({record['budget']} budget)",
        "",
        f"{record['n_items']['pool']} training-pool items, {record['n_items']['test']} test items"
        f"{_sampled(record['n_items'])}, "
        f"{record['n_items']['prompts']} fluency prompts; validation seeds {record['validation_seeds']}, "
        f"test seeds {record['test_seeds']}; {record['minutes']:.1f} minutes.",
    ]
    if "provenance" in record:
        where = record["provenance"]
        lines.append(
            f"`{where['command']}` ({where['date']}, innsteer {where['commit'] or where['innsteer']}, torch "
            f"{where['torch']} with {where['torch_threads']} threads, {where['cpu']['model']} "
            f"({', '.join(where['cpu']['simd'])}))."
        )
    lines += [
        "",
        f"## Chosen on validation data ({metric} metric: area to 1 nat/token toward the behavior, repetition gate)",
        "",
        "| layer | " + " | ".join(chosen) + " |",
        "|---|" + "---|" * len(chosen),
    ]
    for layer in record["layers"]:
        cells = []
        for choice in chosen.values():
            value = choice["validation"]["by_layer"][str(layer)]
            cells.append(f"**{value:.3f}**" if layer == choice["layer"] else f"{value:.3f}")
        lines.append(f"| {layer} | " + " | ".join(cells) + " |")
    options = chosen["innsteer"]["validation"]["by_options"]
    caa_away = chosen["caa"]["validation"]["away_auc"]
    lines += [
        "",
        f"INNSteer's options at layer {chosen['innsteer']['layer']}, area toward / away (chosen for each sign: "
        f"the largest toward steers at alpha > 0, the largest away at alpha < 0; CAA's "
        f"{chosen['caa']['validation']['auc']:.3f} / {caa_away:.3f} at its layer {chosen['caa']['layer']}):",
        "",
    ]
    lines += [f"- {name}: {areas['toward']:.3f} / {areas['away']:.3f}{_chosen_mark(chosen['innsteer'], name)}"
              for name, areas in options.items()]  # fmt: skip
    lines += [
        "",
        "## Test comparison (INNSteer - CAA, each at its chosen configuration; paired bootstrap 95 % interval)",
        "",
        "| direction | summary | INNSteer | CAA | difference [95 % CI] |",
        "|---|---|---|---|---|",
    ]
    for direction, rows in comparison_rows(record, metric).items():
        for key, row in rows.items():
            lines.append(f"| {direction} | {key} ({metric}) | {row['a']:+.3f} | {row['b']:+.3f} | {_cell(row)} |")
    for other in (m for m in METRICS if m != metric):
        for direction, rows in (comparison_rows(record, other) or {}).items():
            row = rows["auc"]
            lines.append(f"| {direction} | auc ({other}) | {row['a']:+.3f} | {row['b']:+.3f} | {_cell(row)} |")
    lines += [
        "",
        "Shifts are p(matching answer) minus the unsteered model's, at a fluency cost (NLL/token of greedy "
        "replies under the unsteered model) within the budget; `auc` is the area for budgets 0 to 1 nat/token. "
        "✓: INNSteer above CAA (interval above 0); ✗: below. The answer metric scores each answer's whole "
        "text, the fork metric only the first token where the two answers differ (the model's choice: a steer "
        "cannot raise it by disrupting the non-matching text), the letter metric the answer's letter.",
    ]
    return "\n".join(lines) + "\n"


def tune_table(records: Sequence[dict], metrics: Sequence[str] = ("fork", "answer")) -> str:
    """Markdown: one row per tune record — the metric it ranked by, each method's choice, and
    INNSteer - CAA on the test items in both directions (area to 1 nat/token, paired bootstrap 95 %
    interval) by each of ``metrics`` ("–" where a record did not measure one)."""
    columns = [f"{side} ({metric})" for metric in metrics for side in ("toward", "away")]
    lines = [
        "| data | model | ranked by | CAA layer | INNSteer layer, options | " + " | ".join(columns) + " | minutes |",
        "|---|---|---|---|---|" + "---|" * len(columns) + "---|",
    ]
    for r in records:
        inn = r["chosen"]["innsteer"]
        cells = []
        for metric in metrics:
            rows = comparison_rows(r, metric)
            cells += [_cell(rows[side]["auc"]) if rows else "–" for side in ("toward", "away")]
        lines.append(
            f"| {r['behavior']} | {r['model_id']} | {ranked_by(r)} | {r['chosen']['caa']['layer']} | {inn['layer']}, "
            f"{_variant_text(inn)} | " + " | ".join(cells) + f" | {r['minutes']:.0f} |"
        )
    return "\n".join(lines)


def _sides(choice: dict) -> tuple[str, str]:
    """INNSteer's chosen option sets (toward, away); records from before the per-sign choice used
    their one variant both ways."""
    return choice["variant"], choice.get("away_variant", choice["variant"])


def _chosen_mark(choice: dict, name: str) -> str:
    sides = [side for side, chosen in zip(("toward", "away"), _sides(choice)) if chosen == name]
    return "" if not sides else " (chosen both ways)" if len(sides) == 2 else f" (chosen {sides[0]})"


def _variant_text(choice: dict) -> str:
    if "variant" not in choice:
        return str(choice["options"] or "defaults")
    toward, away = _sides(choice)
    return toward if toward == away else f"{toward} / {away} away"


def _cell(row: dict) -> str:
    return interval_cell(row["diff"], row["low"], row["high"])


def plot_tune(record: dict, path: Path) -> None:
    """Left: each method's validation area toward the behavior by layer (its choice marked); right:
    INNSteer's options at its layer, toward and away (★ chosen toward, ☆ away), against CAA's area away."""
    plt = pyplot()
    chosen = record["chosen"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4))
    for name, choice in chosen.items():
        layers = [int(layer) for layer in choice["validation"]["by_layer"]]
        areas = list(choice["validation"]["by_layer"].values())
        (line,) = left.plot(layers, areas, "o-", label=name)
        left.plot([choice["layer"]], [choice["validation"]["auc"]], "*", ms=16, color=line.get_color())
    metric = ranked_by(record)
    left.set(xlabel="layer", ylabel=f"validation area to 1 nat/token (toward, {metric})", title="layer (★ chosen)")
    left.legend()
    options = chosen["innsteer"]["validation"]["by_options"]
    names = list(options)
    x = np.arange(len(names))
    right.bar(x - 0.2, [options[n]["toward"] for n in names], 0.4, label="toward")
    right.bar(x + 0.2, [options[n]["away"] for n in names], 0.4, label="away")
    right.axhline(chosen["caa"]["validation"]["away_auc"], color="gray", ls=":", label="CAA away")
    toward, away = _sides(chosen["innsteer"])
    marks = {toward: " ★", away: " ☆"} if toward != away else {toward: " ★☆"}
    right.set_xticks(x, [n + marks.get(n, "") for n in names], fontsize=8)
    right.set(
        ylabel=f"validation area to 1 nat/token ({metric})",
        title=f"INNSteer's options at layer {chosen['innsteer']['layer']}",
    )
    right.legend(fontsize=8)
    fig.suptitle(f"innsteer tune: {record['behavior']} on {record['model_id']}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
