"""Why does INNSteer's lead on the A/B answer metric not reach judged text? Two measurements.

1. Where each steer moves the hidden state, on the answers it was trained on and on free text.

For a shipped behavior, CAA and INNSteer are fitted as the judged runs fit them (the generate
split, seed 0, each at its shipped tune record's layer and options; ``--variants`` adds INNSteer
option sets of ``tune``'s grid at INNSteer's layer). Each steer's displacement d = steer(h, alpha) - h
is split into its part along CAA's direction u (the unit mean difference of the training answer
rows at that layer: what CAA adds) and the rest, on three sets of rows at that layer: the test
items' matching answers, their non-matching answers (what the answer metric scores), and the
unsteered greedy replies to the behavior's open-ended prompts (what the judge reads; the prompt's
last token and the reply, the rows generation steers).

2. What the answer metric's shift is made of. The metric steers each continuation's own tokens
(teacher-forced), so a steer that tells the non-matching answer's states apart can lower that
text's likelihood without making the model choose the matching one. Per steer and alpha: the
change in mean per-token log-probability of the matching and of the non-matching answers (test
items), and p_match; beside them p_fork, p_match by the fork metric (``innsteer.eval.metrics``):
the matching answer's first token that differs from the non-matching one's, against that token,
after the tokens the two share (every state the steer sees there is the same for both answers, so
it cannot tell them apart: the model's choice, as generation would make it).

Nothing is generated steered, no judge.
Results: results/answer-vs-text/<model>-<behavior>.json and a Markdown table.

    python bench/answer_vs_text.py --behavior refusal [--model qwen2.5-coder-1.5b --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import torch  # noqa: E402

from innsteer.core.hooks import decoder_layers  # noqa: E402
from innsteer.datasets.source import shipped  # noqa: E402
from innsteer.eval.batched import BatchedScorer  # noqa: E402
from innsteer.eval.provenance import provenance  # noqa: E402
from innsteer.eval.tune import _VARIANTS  # noqa: E402
from innsteer.eval.tuned import choice  # noqa: E402
from innsteer.hf.collect import contrastive_activations  # noqa: E402
from innsteer.hf.fit import fit_method  # noqa: E402
from innsteer.hf.generation import generate  # noqa: E402
from innsteer.hf.models import load_model  # noqa: E402
from innsteer.hf.prompts import format_prompt, uses_chat_template  # noqa: E402

ALPHAS = (1.0, 2.0)


def reply_rows(lm, prompts, replies, layer: int) -> torch.Tensor:
    """The rows generation steers (the prompt's last token, then the reply), unsteered, at ``layer``."""
    rows = []
    tok = lm.tokenizer
    for prompt, reply in zip(prompts, replies):
        ids = tok(format_prompt(tok, prompt), return_tensors="pt", add_special_tokens=not uses_chat_template(tok))
        full = torch.cat([ids.input_ids, reply.view(1, -1)], 1)
        with torch.no_grad():
            hidden = lm.model(full, output_hidden_states=True).hidden_states[layer + 1][0]
        rows.append(hidden[ids.input_ids.shape[1] - 1 :].float())
    return torch.cat(rows)


def split(steerer, rows: torch.Tensor, u: torch.Tensor, alpha: float) -> dict:
    d = (steerer(rows, alpha) - rows).double()
    along = d @ u
    rest = (d - along[:, None] * u).norm(dim=1)
    return {
        "norm": float(d.norm(dim=1).mean()),
        "along": float(along.mean()),
        "along_sd": float(along.std()),
        "rest": float(rest.mean()),
    }


def answer_parts(scorer: BatchedScorer, base: torch.Tensor, steerer, alpha: float) -> dict:
    total, count = scorer.log_likelihoods(steerer, alpha)
    mean = total / count  # per item: answer matching, non-matching, then the fork's two
    shift = (mean - base).mean(0)
    return {
        "matching": float(shift[0]),
        "not_matching": float(shift[1]),
        "p_match": float(torch.sigmoid(mean[:, 0] - mean[:, 1]).mean()),
        "p_fork": float(torch.sigmoid(mean[:, 2] - mean[:, 3]).mean()),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--behavior", required=True)
    parser.add_argument("--model", default=None)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument("--variants", default="", help="comma-separated names of tune's INNSteer option sets")
    parser.add_argument("--n-open", type=int, default=10)
    parser.add_argument("--out", default=str(ROOT / "results" / "answer-vs-text"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    start, where = time.perf_counter(), provenance(["python", *sys.argv])
    lm = load_model(args.model, dtype=getattr(torch, args.dtype))
    n_layers = len(decoder_layers(lm.model))
    source = shipped(args.behavior)
    prompts = source.prompts[: args.n_open]
    _, _, replies = generate(lm, prompts, max_new_tokens=32)
    scorer = BatchedScorer(lm, source.test, ("answer", "fork"))
    total, count = scorer.log_likelihoods()
    base = total / count
    steers = {}
    for method in ("caa", "innsteer"):
        chosen = choice(lm.model_id, args.behavior, method, n_layers)
        steers[method] = (chosen.layer, chosen.options)
    for name in filter(None, args.variants.split(",")):
        steers[f"innsteer:{name}"] = (steers["innsteer"][0], _VARIANTS[name])
    fit = {"behavior": args.behavior, "split": "train-s0", "seed": 0}
    result, rows_at = {}, {}
    for name, (layer, options) in steers.items():
        if layer not in rows_at:
            pos, neg = contrastive_activations(
                lm, source.test, layer, tokens="all", behavior=args.behavior, split="test_ab", progress=False
            )[layer]
            caa = fit_method(lm, "caa", source.train, layer, **fit)
            u = caa(torch.zeros(1, pos.shape[1]), 1.0)[0].double()
            rows_at[layer] = (
                u / u.norm(),
                {
                    "matching": pos.float(),
                    "not matching": neg.float(),
                    "free text": reply_rows(lm, prompts, replies, layer),
                },
            )
        u, rows = rows_at[layer]
        steerer = fit_method(lm, name.split(":")[0], source.train, layer, options=options, **fit)
        result[name] = {
            "layer": layer,
            "options": options,
            "rows": {k: {str(a): split(steerer, r, u, a) for a in ALPHAS} for k, r in rows.items()},
            "answer": {str(a): answer_parts(scorer, base, steerer, a) for a in ALPHAS},
        }
    unsteered = float(torch.sigmoid(base[:, 0] - base[:, 1]).mean())
    record = {
        "model_id": lm.model_id,
        "behavior": args.behavior,
        "alphas": list(ALPHAS),
        "steers": result,
        "unsteered_p_match": unsteered,
        "unsteered_p_fork": float(torch.sigmoid(base[:, 2] - base[:, 3]).mean()),
        "minutes": round((time.perf_counter() - start) / 60, 2),
        "provenance": where,
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{lm.model_id}-{args.behavior}.json").write_text(json.dumps(record, indent=1))
    print("| steer | layer | rows | |d| at alpha 1 | along CAA's direction | rest |")
    print("|---|---|---|---|---|---|")
    for name, entry in result.items():
        for rows, by_alpha in entry["rows"].items():
            s = by_alpha["1.0"]
            print(f"| {name} | {entry['layer']} | {rows} | {s['norm']:.1f} | {s['along']:+.1f} | {s['rest']:.1f} |")
    print(f"\nunsteered p_match {unsteered:.3f}, p_fork {record['unsteered_p_fork']:.3f}\n")
    print("| steer | alpha | log p matching | log p not matching | p_match | p_fork |")
    print("|---|---|---|---|---|---|")
    for name, entry in result.items():
        for alpha, s in entry["answer"].items():
            print(
                f"| {name} | {alpha} | {s['matching']:+.3f} | {s['not_matching']:+.3f} | {s['p_match']:.3f} "
                f"| {s['p_fork']:.3f} |"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
