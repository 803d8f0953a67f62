"""The quality comparison of docs/RESULTS.md: CAA vs INNSteer (and optionally other methods) under
the protocol of innsteer.eval.protocol, per behavior, written to results/<model>-<behavior>.json
with the command and the code version, and a Markdown table on stdout.

    python bench/quality.py --behaviors corrigible-neutral-HHH,coordinate-other-ais --seeds 0,1,2
    python bench/quality.py --model qwen2.5-coder-1.5b --layer 14 --behaviors refusal --seeds 0

Settings (each method's layer, INNSteer's training options) come from `innsteer tune`'s shipped
records (innsteer.eval.tuned), chosen on validation data; test items decide nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from innsteer.datasets.caa import BEHAVIORS, load_ab, load_open_ended  # noqa: E402
from innsteer.eval.protocol import MethodSpec, compare_methods, comparison_table, default_specs, run_protocol  # noqa: E402
from innsteer.eval.provenance import git_commit  # noqa: E402
from innsteer.eval.results import SAME_SETTINGS, load, result_path, same_settings, save  # noqa: E402
from innsteer.eval.tradeoff import has_replies  # noqa: E402
from innsteer.eval.tuned import choice  # noqa: E402
from innsteer.hf.models import load_model  # noqa: E402

COMPARED = ("innsteer", "caa")


def combine(paths: list[str], out: str) -> int:
    """Merge per-seed result files of one behavior and method set; recompute the comparison."""
    parts = [load(p) for p in paths]
    first = parts[0]
    for part in parts[1:]:
        if not same_settings(first, part, ("behavior", "model_id", "layer", "n_test", "n_prompts", "metrics", "specs")):
            raise SystemExit("cannot combine: the files differ in their behavior, model, layer, items or specs")
    curves = {name: [curve for part in parts for curve in part.curves[name]] for name in first.curves}
    extra = {
        **first.extra,
        "command": " ; ".join(part.extra["command"] for part in parts)
        + " ; python bench/quality.py --combine "
        + " ".join(paths),
        "code_version": sorted({str(part.extra["code_version"]) for part in parts}),
    }
    run = replace(
        first,
        seeds=[curve.seed for curve in curves[COMPARED[0]]],
        curves=curves,
        comparison=compare_methods(curves, *COMPARED, first.metrics),
        extra=extra,
    )
    path = save(run, result_path(Path(out), run))
    print(f"wrote {path} (seeds {run.seeds})")
    for metric in run.metrics:
        print(f"\n## {metric} metric, steering toward the behavior\n")
        print(comparison_table([run], metric))
    return 0


def reuse_runs(paths: list[str], run, specs: dict) -> dict:
    """Curves of methods this call did not measure, from an earlier file of the same behavior and
    settings whose method specs are the same (CAA's curves do not change when INNSteer's do)."""
    for path in paths:
        earlier = load(path)
        if earlier.behavior != run.behavior:
            continue
        if not same_settings(earlier, run):
            raise SystemExit(f"{path} was measured with other settings (one of {SAME_SETTINGS}, dtype)")
        taken = {}
        for name, spec in specs.items():
            if earlier.specs.get(name) != spec.record():
                raise SystemExit(f"{path} has no runs of {name} as specified here ({spec.record()})")
            taken[name] = earlier.curves[name]
        where = Path(path).resolve()
        file = str(where.relative_to(ROOT)) if where.is_relative_to(ROOT) else str(where)
        return {"curves": taken, "file": file, "command": earlier.extra["command"]}
    raise SystemExit(f"no file of {run.behavior} among --reuse {' '.join(paths)}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--behaviors", default=",".join(BEHAVIORS))
    parser.add_argument(
        "--layer",
        type=int,
        default=None,
        help="default: INNSteer's layer in `innsteer tune`'s shipped record for each behavior on the model "
        "(innsteer.eval.tuned), else the records' usual depth",
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n-prompts", type=int, default=10)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--tokens", default="all", choices=("mean", "last", "all"), help="activation rows of both")
    parser.add_argument(
        "--innsteer-options",
        default=None,
        help="JSON: INNSteer training options (default: the shipped tune record's choice at its layer, "
        "else TrainConfig's defaults)",
    )
    parser.add_argument(
        "--caa-layer",
        type=int,
        default=None,
        help="CAA at this layer (default: its layer in the shipped tune record, else --layer)",
    )
    parser.add_argument("--extra-methods", default="", help="comma-separated METHODS, fitted on the same rows")
    parser.add_argument("--ladder", default="0.5,1,2,3,4,6,8,12", help="alpha magnitudes, both signs")
    parser.add_argument(
        "--combine",
        nargs="+",
        default=None,
        metavar="JSON",
        help="instead of measuring: merge runs of other seeds written by earlier calls and compare them",
    )
    parser.add_argument(
        "--reuse",
        nargs="+",
        default=None,
        metavar="JSON",
        help="take CAA's runs from these earlier result files (same behavior, settings and CAA spec) "
        "instead of measuring them again",
    )
    parser.add_argument("--out", default=str(ROOT / "results"))
    parser.add_argument("--threads", type=int, default=1, help="torch threads (run behaviors in parallel)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the model's dtype")
    args = parser.parse_args()

    if args.combine:
        return combine(args.combine, args.out)
    for path in args.reuse or ():  # before hours of measuring: the comparison gates on the replies
        if not has_replies([curve for curves in load(path).curves.values() for curve in curves]):
            raise SystemExit(f"{path} did not record its replies; add them first: python bench/replies.py {path}")
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=getattr(torch, args.dtype))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    version = git_commit()  # at the start: the code that runs, whatever is committed meanwhile
    results = []
    for behavior in args.behaviors.split(","):
        start = time.time()
        inn, caa = (choice(lm.model_id, behavior, method, lm.num_layers) for method in ("innsteer", "caa"))
        layer = inn.layer if args.layer is None else args.layer
        if args.innsteer_options is None:
            options = inn.options if layer == inn.layer else {}
        else:
            options = json.loads(args.innsteer_options)
        specs = default_specs(options, args.tokens)
        caa_layer = args.caa_layer if args.caa_layer is not None else (caa.layer if args.layer is None else layer)
        if caa_layer != layer:
            specs["caa"] = replace(specs["caa"], layer=caa_layer)
        for name in filter(None, args.extra_methods.split(",")):
            specs[name] = MethodSpec(name, args.tokens)
        reused_specs = {"caa": specs.pop("caa")} if args.reuse else {}
        result = run_protocol(
            lm,
            load_ab(behavior, "generate"),
            load_ab(behavior, "test_ab"),
            load_open_ended(behavior, limit=args.n_prompts),
            layer=layer,
            specs=specs,
            seeds=[int(s) for s in args.seeds.split(",")],
            behavior=behavior,
            max_new_tokens=args.max_new_tokens,
            ladder=[float(a) for a in args.ladder.split(",")],
        )
        result.extra["dtype"] = args.dtype
        if reused_specs:
            reused = reuse_runs(args.reuse, result, reused_specs)
            curves = {**reused["curves"], **result.curves}
            result = replace(
                result,
                curves=curves,
                specs={**{n: s.record() for n, s in reused_specs.items()}, **result.specs},
                comparison=compare_methods(curves, *COMPARED, result.metrics),
            )
            result.extra["reused"] = {
                "methods": list(reused_specs),
                "file": reused["file"],
                "command": reused["command"],
            }
        result.extra.update(command=command, code_version=version, seconds=round(time.time() - start))
        path = save(result, result_path(out, result))
        results.append(result)
        print(f"{behavior}: {result.extra['seconds']} s, wrote {path}", flush=True)
        print(comparison_table([result]), flush=True)
    for metric in results[0].metrics:
        print(f"\n## {metric} metric, steering toward the behavior\n")
        print(comparison_table(results, metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
