"""The batched A/B scorer's memory and speed against its version at a git revision, in one run.

    python bench/scorer.py [--ref REV] [--behaviors hallucination,refusal] [--items 50] [--repeats 5]

Both scorers are built on the same test items of the default model (float32); reported per behavior:
the bytes of tensors each keeps (the prefix KV caches, almost all of it), the seconds to build it,
and the median seconds of ``scores(caa, 2.0)`` (the replayed path every curve point takes) over
``--repeats`` calls made alternately, so machine noise hits both alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import time
from pathlib import Path

import torch

from innsteer.eval.provenance import machine_line

ROOT = Path(__file__).resolve().parents[1]


def module_at(rev: str):
    """``innsteer.eval.batched`` as it was at ``rev`` (its relative imports resolve to today's package)."""
    source = subprocess.check_output(["git", "show", f"{rev}:python/innsteer/eval/batched.py"], cwd=ROOT, text=True)
    spec = importlib.util.spec_from_loader("innsteer.eval._batched_ref", loader=None)
    module = importlib.util.module_from_spec(spec)
    module.__package__ = "innsteer.eval"
    exec(compile(source, f"{rev}:batched.py", "exec"), module.__dict__)
    return module


def held_bytes(value, seen: set) -> int:
    """Bytes of the tensors reachable from ``value`` through dicts, lists and tuples (each storage once)."""
    if isinstance(value, torch.Tensor):
        key = value.untyped_storage().data_ptr()
        if key in seen:
            return 0
        seen.add(key)
        return value.untyped_storage().nbytes()
    if isinstance(value, dict):
        return sum(held_bytes(v, seen) for v in value.values())
    if isinstance(value, (list, tuple)):
        return sum(held_bytes(v, seen) for v in value)
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ref", default="HEAD~1", help="the git revision to compare against")
    parser.add_argument("--behaviors", default="hallucination,refusal")
    parser.add_argument("--items", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from innsteer.core.methods import fit_caa
    from innsteer.datasets.caa import load_ab
    from innsteer.eval import batched
    from innsteer.hf.collect import contrastive_activations
    from innsteer.hf.models import load_model

    versions = {args.ref: module_at(args.ref).BatchedScorer, "this tree": batched.BatchedScorer}
    lm = load_model()
    print(f"# {machine_line()}; {args.threads} torch thread(s), {args.items} test items, medians of {args.repeats}")
    print("| behavior | scorer | tensors held (MB) | build (s) | scores(caa, 2) (s) |")
    print("|---|---|---|---|---|")
    for behavior in args.behaviors.split(","):
        pos, neg = contrastive_activations(lm, load_ab(behavior, "generate", limit=32), 10, progress=False)[10]
        caa = fit_caa(pos, neg, layer=10)
        items = load_ab(behavior, "test_ab", limit=args.items)
        scorers, built, times = {}, {}, {name: [] for name in versions}
        for name, cls in versions.items():
            start = time.perf_counter()
            scorers[name] = cls(lm, items)
            built[name] = time.perf_counter() - start
            scorers[name].scores(caa, 2.0)  # records the layer's outputs: not timed
        for _ in range(args.repeats):
            for name, scorer in scorers.items():
                start = time.perf_counter()
                scorer.scores(caa, 2.0)
                times[name].append(time.perf_counter() - start)
        for name, scorer in scorers.items():
            held = held_bytes(vars(scorer), set()) / 1e6
            print(f"| {behavior} | {name} | {held:.0f} | {built[name]:.1f} | {statistics.median(times[name]):.2f} |")
        del scorers


if __name__ == "__main__":
    main()
