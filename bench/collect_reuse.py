"""Collecting the contrastive activations of three seeds' training splits of one behavior, as
`innsteer eval --seeds 0,1,2` does: with one cache, a text another split already holds is read back
(each text runs through the model once); with a cache per split, every split runs whole (as before
the cache kept texts apart).

    OMP_NUM_THREADS=2 python bench/collect_reuse.py [--behavior B] [--layer L] [--limit N] [--repeats R]

Each repeat starts from empty caches; the two ways alternate, and the medians are printed.
"""

import argparse
import os
import statistics
import sys
import tempfile
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "python"), os.path.join(os.path.dirname(__file__), "..")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--behavior", default="corrigible-neutral-HHH")
    parser.add_argument("--layer", type=int, default=22)
    parser.add_argument("--limit", type=int, default=200, help="items of the behavior's generate set")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()

    from innsteer.datasets.ab import train_val_split
    from innsteer.datasets.caa import load_ab
    from innsteer.hf import collect
    from innsteer.hf.models import load_model

    lm = load_model()
    items = load_ab(args.behavior, "generate", limit=args.limit)
    splits = [train_val_split(items, seed=seed)[0] for seed in (0, 1, 2)]
    forwarded = []
    span_activations = collect.span_activations

    def counting(model, tokenizer, texts, *rest, **kwargs):
        forwarded.append(len(texts))
        return span_activations(model, tokenizer, texts, *rest, **kwargs)

    collect.span_activations = counting
    seconds: dict[str, list[float]] = {"one cache": [], "a cache per split": []}
    texts: dict[str, int] = {}
    for _ in range(args.repeats):
        for way in seconds:
            with tempfile.TemporaryDirectory() as root:
                forwarded.clear()
                start = time.perf_counter()
                for seed, split in enumerate(splits):
                    os.environ["INNSTEER_CACHE"] = root if way == "one cache" else os.path.join(root, str(seed))
                    collect.contrastive_activations(
                        lm, split, args.layer, tokens="all", behavior=args.behavior, split=f"train-s{seed}",
                        progress=False,
                    )  # fmt: skip
                seconds[way].append(time.perf_counter() - start)
                texts[way] = sum(forwarded)
    print(
        f"{lm.model_id}, {args.behavior}, layer {args.layer}, {len(items)} items, three seeds' training splits "
        f"({', '.join(str(len(s)) for s in splits)} items), torch threads {os.environ.get('OMP_NUM_THREADS', 'all')}"
    )
    base = statistics.median(seconds["a cache per split"])
    for way, times in seconds.items():
        print(
            f"{way}: {texts[way]} texts through the model, median {statistics.median(times):.1f} s "
            f"({', '.join(f'{t:.1f}' for t in times)}), {statistics.median(times) / base:.2f}x"
        )


if __name__ == "__main__":
    main()
