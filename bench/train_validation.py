"""What INNSteer's per-epoch validation costs on real per-token rows, with the parts training does not
change computed once (``_transport_constants``, ``transport_references``: what ``train_innsteer``
does) and recomputed every epoch (as it did before 2026-12-07). Both give the same numbers, bit for
bit; the two ways alternate and the medians are printed, then one whole fit is timed.

    OMP_NUM_THREADS=1 python bench/train_validation.py [--behavior B] [--layer L] [--repeats R] [--epochs E]

The rows are those of a behavior's training split (seed 0) on the default model, ``tokens="all"``,
split as ``train_innsteer`` splits them (20 % validation).
"""

import argparse
import os
import statistics
import sys
import time

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "python"), os.path.join(os.path.dirname(__file__), "..")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--behavior", default="hallucination")
    parser.add_argument("--layer", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=3, help="epochs of the whole fit timed at the end")
    args = parser.parse_args()

    import torch

    from innsteer.core import train
    from innsteer.core.flow import INN
    from innsteer.datasets.ab import train_val_split
    from innsteer.datasets.caa import load_ab
    from innsteer.hf.collect import contrastive_activations
    from innsteer.hf.models import load_model

    lm = load_model()
    items = train_val_split(load_ab(args.behavior, "generate"), seed=0)[0]
    pos, neg = contrastive_activations(lm, items, args.layer, tokens="all", behavior=args.behavior, split="train-s0")[
        args.layer
    ]
    pos, neg = pos.float(), neg.float()
    config = train.TrainConfig()
    n_val = max(2, round(len(pos) * config.val_fraction))
    order = torch.randperm(len(pos), generator=torch.Generator().manual_seed(0))
    val, fit = order[:n_val], order[n_val:]
    inn = INN.from_config(pos.shape[1], config.flow)
    inn.fit_standardization(torch.cat([pos[fit], neg[fit]]))
    with torch.no_grad():  # couplings away from the identity, as after an epoch of training
        for w in inn.w2:
            w.normal_(0, 0.01)
    class_means = torch.zeros(2, pos.shape[1])
    mean_difference = pos[fit].mean(0) - neg[fit].mean(0)
    direction = train.latent_direction(inn, pos[fit], neg[fit])

    def measure(constants, references):
        with torch.no_grad():
            loss = float(train._loss_terms(inn, pos[val], neg[val], config, class_means, constants)["loss"])
        return loss, train.transport_ratio(inn, direction, pos[val], neg[val], mean_difference, "toward", references)

    constants = train._transport_constants(inn, pos[val], neg[val], "toward")
    references = train.transport_references(pos[val], neg[val], mean_difference)
    seconds: dict[str, list[float]] = {"recomputed": [], "computed once": []}
    values = {}
    for _ in range(args.repeats):
        for way, given in (("recomputed", (None, None)), ("computed once", (constants, references))):
            start = time.perf_counter()
            values[way] = measure(*given)
            seconds[way].append(time.perf_counter() - start)
    assert values["recomputed"] == values["computed once"], values
    medians = {way: statistics.median(s) for way, s in seconds.items()}
    print(
        f"{args.behavior} layer {args.layer}: {len(pos)} rows per class, {n_val} held out; threads "
        f"{torch.get_num_threads()}; medians of {args.repeats}"
    )
    for way, median in medians.items():
        print(f"  validation measures, {way:>13}: {median:6.2f} s per epoch")
    print(f"  ratio {medians['recomputed'] / medians['computed once']:.2f}x; values equal: {values['computed once']}")
    start = time.perf_counter()
    result = train.train_innsteer(
        pos,
        neg,
        layer=args.layer,
        config=train.TrainConfig(max_epochs=args.epochs, patience=args.epochs),
        progress=False,
    )
    epochs = len(result.history["train_loss"])
    print(f"  train_innsteer, {epochs} epochs: {(time.perf_counter() - start) / epochs:.1f} s per epoch")


if __name__ == "__main__":
    main()
