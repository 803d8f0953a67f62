"""The quality comparison of docs/RESULTS.md: CAA vs INNSteer (and optionally other methods) under
the protocol of innsteer.eval.protocol, per behavior, written to results/<model>-<behavior>.json
with the command and the code version, and a Markdown table on stdout.

    python bench/quality.py --behaviors corrigible-neutral-HHH,coordinate-other-ais --seeds 0,1,2
    python bench/quality.py --model qwen2.5-coder-1.5b --layer 14 --behaviors refusal --seeds 0

Settings (layer, INNSteer's token choice and training options) come from the validation study
recorded in docs/RESULTS.md; test items decide nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT)]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from innsteer.datasets.caa import BEHAVIORS, load_ab, load_open_ended  # noqa: E402
from innsteer.eval.protocol import (  # noqa: E402
    MethodSpec,
    comparison_table,
    default_specs,
    run_protocol,
)
from innsteer.eval.tradeoff import has_replies, paired_bootstrap  # noqa: E402
from innsteer.eval.tuned import choice  # noqa: E402
from innsteer.hf.models import load_model  # noqa: E402


def code_version() -> str:
    try:
        head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "python"], cwd=ROOT, capture_output=True, text=True)
        return head.stdout.strip() + ("+local changes" if dirty.stdout.strip() else "")
    except OSError:
        return "unknown"


# --dtype: the model's weights and activations. bfloat16 is for the larger model on CPUs with AMX or
# AVX-512 BF16, where its matmuls run several times faster; the steerers' math stays float32.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def dtype_tag(dtype: str) -> str:
    """File-name tag of a run's dtype: none for float32, so earlier files keep their names."""
    return "" if dtype == "float32" else f"-{dtype}"


def combine(paths: list[str], out: str) -> int:
    """Merge per-seed result files of one behavior and method set; recompute the comparison."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    first = parts[0]
    for part in parts[1:]:
        same = ("behavior", "model_id", "layer", "n_test", "n_prompts", "specs", "metrics")
        if any(part[key] != first[key] for key in same):
            raise SystemExit(f"cannot combine: the files differ in one of {same}")
    runs = {name: [run for part in parts for run in part["runs"][name]] for name in first["runs"]}
    seeds = [run["seed"] for run in runs[first["compare"][0]]]
    comparison = {
        f"{metric}/{side}": paired_bootstrap(
            runs[first["compare"][0]], runs[first["compare"][1]], sign=sign, metric=metric
        )
        for metric in first["metrics"]
        for side, sign in (("toward", 1), ("away", -1))
    }
    result = {
        **first,
        "seeds": seeds,
        "runs": runs,
        "comparison": comparison,
        "command": " ; ".join(part["command"] for part in parts)
        + " ; python bench/quality.py --combine "
        + " ".join(paths),
        "code_version": sorted({part["code_version"] for part in parts}),
    }
    path = result_path(Path(out), result)
    path.write_text(json.dumps(result, indent=1))
    print(f"wrote {path} (seeds {seeds})")
    for metric in first["metrics"]:
        print(f"\n## {metric} metric, steering toward the behavior\n")
        print(comparison_table([result], metric))
    return 0


def option_text(value) -> str:
    """An INNSteer option's value as file names and tables show it (1.0 -> '1')."""
    return f"{value:g}" if isinstance(value, float) else str(value)


def result_path(out: Path, result: dict) -> Path:
    """<model>-<behavior>-L<layer>-s<seeds>[-<INNSteer options>][-caaL<layer>][-<dtype>].json: INNSteer
    options other than TrainConfig's defaults are in the name, so runs of both can sit side by side."""
    options, caa_layer = result["specs"]["innsteer"]["options"], result["specs"]["caa"]["layer"]
    tag = "".join(f"-{key}{option_text(value)}" for key, value in options.items())
    tag += ("" if caa_layer is None else f"-caaL{caa_layer}") + dtype_tag(result.get("dtype", "float32"))
    seeds = "".join(str(seed) for seed in result["seeds"])
    return out / f"{result['model_id']}-{result['behavior']}-L{result['layer']}-s{seeds}{tag}.json"


SAME_SETTINGS = ("behavior", "model_id", "layer", "seeds", "n_test", "n_prompts", "max_new_tokens", "metrics")


def same_settings(earlier: dict, result: dict, keys: tuple[str, ...] = SAME_SETTINGS) -> bool:
    """Whether two result files were measured alike (files from before --dtype are float32)."""
    dtypes = (earlier.get("dtype", "float32"), result.get("dtype", "float32"))
    return dtypes[0] == dtypes[1] and all(earlier[key] == result[key] for key in keys)


def reuse_runs(paths: list[str], result: dict, specs: dict) -> dict:
    """Runs of methods this call did not measure, from an earlier file of the same behavior and
    settings whose method specs are the same (CAA's curves do not change when INNSteer's do)."""
    for path in paths:
        earlier = json.loads(Path(path).read_text())
        if earlier["behavior"] != result["behavior"]:
            continue
        if not same_settings(earlier, result):
            raise SystemExit(f"{path} was measured with other settings (one of {SAME_SETTINGS}, dtype)")
        taken = {}
        for name, spec in specs.items():
            if earlier["specs"].get(name) != spec.record():
                raise SystemExit(f"{path} has no runs of {name} as specified here ({spec.record()})")
            taken[name] = earlier["runs"][name]
        where = Path(path).resolve()
        file = str(where.relative_to(ROOT)) if where.is_relative_to(ROOT) else str(where)
        return {"runs": taken, "file": file, "command": earlier["command"]}
    raise SystemExit(f"no file of {result['behavior']} among --reuse {' '.join(paths)}")


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
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES), help="the model's dtype")
    args = parser.parse_args()

    if args.combine:
        return combine(args.combine, args.out)
    for path in args.reuse or ():  # before hours of measuring: the comparison gates on the replies
        if not has_replies([run for runs in json.loads(Path(path).read_text())["runs"].values() for run in runs]):
            raise SystemExit(f"{path} did not record its replies; add them first: python bench/replies.py {path}")
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=DTYPES[args.dtype])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/quality.py " + " ".join(sys.argv[1:])
    version = code_version()  # at the start: the code that runs, whatever is committed meanwhile
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
        result["dtype"] = args.dtype
        if reused_specs:
            reused = reuse_runs(args.reuse, result, reused_specs)
            result["runs"] = {**reused["runs"], **result["runs"]}
            result["specs"] = {**{n: s.record() for n, s in reused_specs.items()}, **result["specs"]}
            result["reused"] = {"methods": list(reused_specs), "file": reused["file"], "command": reused["command"]}
            result["compare"] = ["innsteer", "caa"]
            result["comparison"] = {
                f"{metric}/{side}": paired_bootstrap(
                    result["runs"]["innsteer"], result["runs"]["caa"], sign=sign, metric=metric
                )
                for metric in result["metrics"]
                for side, sign in (("toward", 1), ("away", -1))
            }
        result.update(command=command, code_version=version, seconds=round(time.time() - start))
        path = result_path(out, result)
        path.write_text(json.dumps(result, indent=1))
        results.append(result)
        print(f"{behavior}: {result['seconds']} s, wrote {path}", flush=True)
        print(comparison_table([result]), flush=True)
    for metric in results[0]["metrics"]:
        print(f"\n## {metric} metric, steering toward the behavior\n")
        print(comparison_table(results, metric))
    return 0


if __name__ == "__main__":
    sys.exit(main())
