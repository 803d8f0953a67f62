"""What ``tune``'s validation calls cost with the unsteered measurements built once for all of them
(``protocol.Unsteered``, as ``tune`` passes it) and built by each call (as before 2026-12-08): one
sequence is a CAA validation curve at each of the quick budget's layers, as ``tune`` measures them
(its validation items, prompts, alphas and reply length). The two ways alternate; the medians and
their ratio are printed, and each sequence's runs are checked to be equal.

    OMP_NUM_THREADS=1 python bench/unsteered_reuse.py [--behavior B] [--repeats R]
"""

import argparse
import json
import os
import re
import statistics
import sys
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "python"), os.path.join(os.path.dirname(__file__), "..")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--behavior", default="refusal")
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    from innsteer.core.hooks import decoder_layers
    from innsteer.datasets.caa import load_ab
    from innsteer.datasets.files import NEUTRAL_PROMPTS
    from innsteer.eval.protocol import MethodSpec, Unsteered, run_protocol
    from innsteer.eval.provenance import machine_line
    from innsteer.eval.tune import TUNE_BUDGETS, candidate_layers
    from innsteer.hf.models import load_model

    plan = TUNE_BUDGETS["quick"]
    lm = load_model()
    pool = load_ab(args.behavior, "generate")[: plan.max_pool]
    prompts = list(NEUTRAL_PROMPTS)[: plan.n_prompts]
    layers = candidate_layers(len(decoder_layers(lm.model)), plan.layer_fractions)
    specs = {"caa": MethodSpec("caa", "all")}

    def sequence(unsteered) -> str:
        """The CAA validation curve at every layer, with ``unsteered`` (None: each call builds its own)."""
        runs = [
            run_protocol(
                lm,
                pool,
                None,
                prompts,
                layer=layer,
                specs=specs,
                seeds=plan.validation_seeds,
                compare=(),
                signs=(1,),
                ladder=plan.validation_ladder,
                max_new_tokens=plan.max_new_tokens,
                progress=False,
                unsteered=unsteered,
            )
            for layer in layers
        ]
        return re.sub(r'"seconds": [0-9.e-]+', "", json.dumps([r.to_dict() for r in runs], default=str))

    sequence(None)  # the activations collected and cached, as a tune run's first step does
    times = {"each call": [], "shared": []}
    results = {}
    for _ in range(args.repeats):
        for way in times:
            start = time.perf_counter()
            results[way] = sequence(None if way == "each call" else Unsteered(lm))
            times[way].append(time.perf_counter() - start)
    assert results["each call"] == results["shared"], "the shared measurements changed a run"
    import torch

    print(f"# machine: {machine_line()}; torch {torch.__version__}, {torch.get_num_threads()} threads")
    print(f"# {args.behavior}: {len(layers)} CAA validation curves (layers {layers}), {len(pool)} pool items")
    medians = {way: statistics.median(t) for way, t in times.items()}
    for way, t in times.items():
        print(f"unsteered built {way:>9}: median {medians[way]:6.1f} s  ({', '.join(f'{x:.1f}' for x in t)})")
    print(f"shared / each call: {medians['shared'] / medians['each call']:.2f} (runs identical)")


if __name__ == "__main__":
    main()
