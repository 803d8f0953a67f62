"""Does training find a better transport than a translation? INNSteer's selection criterion across
behaviors and training settings, without the (slow) behaviour–fluency curves.

For each behavior and seed, the INNSteer variants of the ablation (``innsteer.eval.ablation``) are
fitted on the training part of ``train_val_split(seed)`` (per-token rows, as the protocol fits
them) and each fit records its held-out transport ratio: the energy distance of the steered
held-out negatives to the held-out positives relative to CAA's translation
(``innsteer.core.train.transport_ratio``; 1 = no better than CAA, which is where selection falls
back to epoch 0). Only training rows are read: no validation or test items are scored. Results:
results/transport/<model>-L<layer>.json and a Markdown table.

    python bench/transport.py --behaviors myopic-reward,refusal --variants inn-token-class-transport,default-h512
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from innsteer.core.methods import METHODS  # noqa: E402
from innsteer.datasets.caa import BEHAVIORS, load_ab  # noqa: E402
from innsteer.eval.ablation import VARIANTS  # noqa: E402
from innsteer.eval.protocol import train_val_split  # noqa: E402
from innsteer.eval.provenance import git_commit  # noqa: E402
from innsteer.hf.collect import contrastive_activations  # noqa: E402
from innsteer.hf.models import load_model  # noqa: E402


def fit_record(pos, neg, *, layer: int, model_id: str, behavior: str, seed: int, options: dict) -> dict:
    steerer = METHODS["innsteer"](
        pos, neg, layer=layer, model_id=model_id, behavior=behavior, **{"seed": seed, **options}
    )
    history = steerer.extra["history"].get("val_transport", [])
    return {
        "best_epoch": steerer.extra["best_epoch"],
        "val_transport": steerer.extra.get("val_transport"),
        "history": history,
        "seconds": steerer.extra["seconds"],
    }


def table(result: dict) -> str:
    behaviors = list(result["runs"])
    variants = list(next(iter(result["runs"].values())))
    lines = [
        "| variant | " + " | ".join(behaviors) + " |",
        "|---|" + "---|" * len(behaviors),
    ]
    for variant in variants:
        cells = []
        for behavior in behaviors:
            fits = result["runs"][behavior][variant]
            ratios = [fit["val_transport"] for fit in fits]
            trained = [min(fit["history"]) for fit in fits]  # the best epoch >= 1, kept or not
            epochs = ",".join(str(fit["best_epoch"]) for fit in fits)
            cells.append(
                f"{sum(ratios) / len(ratios):.3f} (best trained {sum(trained) / len(trained):.3f}; epochs {epochs})"
            )
        lines.append(f"| {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=None, help="default: the embedded SmolLM2-135M-Instruct")
    parser.add_argument("--behaviors", default=",".join(BEHAVIORS))
    parser.add_argument("--layer", type=int, default=10)
    parser.add_argument("--variants", default="inn-token-class-transport")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--out", default=str(ROOT / "results" / "transport"))
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    variants = args.variants.split(",")
    for name in variants:
        spec = VARIANTS.get(name)
        if spec is None or spec.method != "innsteer" or spec.tokens != "all":
            raise SystemExit(f"{name} is not a per-token INNSteer variant (bench/validation.py --list shows them)")
        if "select" in spec.options and spec.options["select"] != "transport":
            raise SystemExit(f"{name} does not select by transport, so it records no transport ratio")
    torch.set_num_threads(args.threads)
    version = git_commit()
    lm = load_model(args.model)
    seeds = [int(s) for s in args.seeds.split(",")]
    start = time.time()
    runs: dict[str, dict[str, list]] = {}
    for behavior in args.behaviors.split(","):
        runs[behavior] = {name: [] for name in variants}
        for seed in seeds:
            train, _ = train_val_split(load_ab(behavior, "generate"), seed=seed)
            pos, neg = contrastive_activations(
                lm,
                train,
                args.layer,
                tokens="all",
                behavior=behavior,
                split=f"train-s{seed}",
                seed=seed,
                progress=False,
            )[args.layer]
            for name in variants:
                fit = fit_record(
                    pos,
                    neg,
                    layer=args.layer,
                    model_id=lm.model_id,
                    behavior=behavior,
                    seed=seed,
                    options=VARIANTS[name].options,
                )
                runs[behavior][name].append({"seed": seed, **fit})
                print(
                    f"{behavior} seed {seed} {name}: epoch {fit['best_epoch']}, ratio {fit['val_transport']:.4f}",
                    flush=True,
                )
    result = {
        "model_id": lm.model_id,
        "layer": args.layer,
        "seeds": seeds,
        "specs": {name: VARIANTS[name].options for name in variants},
        "command": "python bench/transport.py " + " ".join(sys.argv[1:]),
        "code_version": version,
        "seconds": round(time.time() - start),
        "runs": runs,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{lm.model_id}-L{args.layer}-s{''.join(map(str, seeds))}.json"
    path.write_text(json.dumps(result, indent=1))
    print(
        f"wrote {path}\n\nHeld-out transport ratio of the kept epoch, seed mean (1 = CAA's); in brackets the "
        "best ratio any trained epoch reached:\n"
    )
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
