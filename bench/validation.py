"""The validation study of docs/RESULTS.md: which INNSteer settings (and which layer) steer best,
chosen on validation items only.

Each seed splits the behavior's CAA ``generate`` set (``train_val_split(seed)``); every variant is
fitted on the training part and its behaviour-vs-fluency curve measured on the validation part,
fluency on the built-in neutral prompts (not the behavior's open-ended test prompts). Every variant
is compared with CAA on the same rows by the paired bootstrap of innsteer.eval.tradeoff. Test
items are never read. Results: results/validation/<model>-<behavior>-L<layer>.json, merged
with earlier runs of other variants at the same settings.

    python bench/validation.py --behaviors corrigible-neutral-HHH --variants caa-token,inn-token --seeds 0,1,2
    python bench/validation.py --list
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

from innsteer.datasets.caa import load_ab  # noqa: E402
from innsteer.datasets.files import NEUTRAL_PROMPTS  # noqa: E402
from innsteer.eval.ablation import VARIANTS  # noqa: E402
from innsteer.eval.protocol import run_protocol  # noqa: E402
from innsteer.eval.provenance import git_commit  # noqa: E402
from innsteer.eval.results import Run, load, same_settings, save  # noqa: E402
from innsteer.eval.summaries import Summaries  # noqa: E402
from innsteer.hf.models import load_model  # noqa: E402


def merge(path: Path, run: Run) -> Run:
    """Add ``run``'s variants to the file's earlier ones measured at the same settings."""
    if not path.is_file():
        return run
    earlier = load(path)
    if not same_settings(earlier, run):
        raise SystemExit(
            f"{path} was measured with other settings (its items, prompts, seeds or dtype); use another --out"
        )
    extra = {
        **earlier.extra,
        "commands": earlier.extra.get("commands", []) + run.extra["commands"],
        "code_versions": sorted(set(earlier.extra.get("code_versions", [])) | set(run.extra["code_versions"])),
    }
    return replace(earlier, curves={**earlier.curves, **run.curves}, specs={**earlier.specs, **run.specs}, extra=extra)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--behaviors", default="corrigible-neutral-HHH")
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--variants", default="caa-token,inn-token")
    parser.add_argument("--options", default="{}", help="JSON: TrainConfig fields added to every INNSteer variant")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--ladder", default="0.5,1,2,3,4,6,8,12", help="alpha magnitudes, both signs")
    parser.add_argument("--reference", default="caa-token")
    parser.add_argument("--out", default=str(ROOT / "results" / "validation"))
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"), help="the model's dtype")
    parser.add_argument("--list", action="store_true", help="print the variants and exit")
    args = parser.parse_args()
    if args.list:
        for name, spec in VARIANTS.items():
            print(f"{name}: {spec}")
        return 0
    names = args.variants.split(",")
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variants {unknown}; --list shows them")
    common = json.loads(args.options)
    specs = {}
    for name in names:
        spec = VARIANTS[name]
        if spec.method == "innsteer" and common:
            spec = replace(spec, options={**common, **spec.options})
        specs[name] = spec
    torch.set_num_threads(args.threads)
    lm = load_model(args.model, dtype=getattr(torch, args.dtype))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    command = "python bench/validation.py " + " ".join(sys.argv[1:])
    version = git_commit()  # at the start: the code that runs, whatever is committed meanwhile
    for behavior in args.behaviors.split(","):
        start = time.time()
        result = run_protocol(
            lm,
            load_ab(behavior, "generate"),
            None,
            list(NEUTRAL_PROMPTS),
            layer=args.layer,
            specs=specs,
            seeds=[int(s) for s in args.seeds.split(",")],
            behavior=behavior,
            max_new_tokens=args.max_new_tokens,
            ladder=[float(a) for a in args.ladder.split(",")],
            compare=(),
        )
        result.extra.update(
            commands=[command], code_versions=[version], seconds=round(time.time() - start), dtype=args.dtype
        )
        tag = "" if args.dtype == "float32" else f"-{args.dtype}"
        path = out / f"{lm.model_id}-{behavior}-L{args.layer}{tag}.json"
        result = merge(path, result)
        save(result, path)
        print(f"{behavior}: {round(time.time() - start)} s, wrote {path}", flush=True)
        if args.reference in result.curves:
            for metric in result.metrics:
                print(f"\n### {behavior}, layer {args.layer}, {metric} metric (validation)\n")
                print(Summaries().variants(result, args.reference, metric), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
