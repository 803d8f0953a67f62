"""Add the fluency replies (their texts and repetition) to protocol runs measured before the
protocol recorded them, so their curves can be summarized with the repetition gate
(``innsteer.eval.tradeoff``).

Every curve is refitted exactly as the protocol fitted it (same spec, split, seed and code path,
``innsteer.eval.protocol.fit_spec``) and its greedy replies regenerated at each recorded alpha; the
replies' NLL must equal the recorded NLL (same token counts, NLL within 1e-4 relative), else
``Mismatch`` names the first that differs. The A/B scores are not recomputed.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..datasets.ab import train_val_split
from ..datasets.caa import load_ab, load_open_ended
from ..datasets.files import NEUTRAL_PROMPTS
from ..hf.models import LoadedModel
from .batched import BatchedFluency
from .protocol import MethodSpec, fit_spec, reply_record
from .results import Run


class Mismatch(Exception):
    """The regenerated replies are not the recorded ones."""


def _check_same(what: str, nll: torch.Tensor, tokens: torch.Tensor, recorded_nll, recorded_tokens) -> None:
    if tokens.tolist() != [float(t) for t in recorded_tokens]:
        raise Mismatch(f"{what}: reply lengths {tokens.tolist()} differ from the recorded {recorded_tokens}")
    if not torch.allclose(nll, torch.tensor(recorded_nll, dtype=nll.dtype), rtol=1e-4, atol=1e-4):
        raise Mismatch(f"{what}: reply NLL {nll.tolist()} differs from the recorded {recorded_nll}")


def backfill(lm: LoadedModel, run: Run, *, progress: bool = True) -> Run:
    """``run`` (of a shipped behavior) with every curve's and its unsteered point's reply texts and
    repetition added; ``run`` itself is left as it was."""
    behavior = run.behavior
    if run.evaluated_on == "validation":
        prompts = list(NEUTRAL_PROMPTS)
    else:
        prompts = load_open_ended(behavior, limit=run.n_prompts)
    if len(prompts) != run.n_prompts:
        raise Mismatch(f"{len(prompts)} fluency prompts, the run has {run.n_prompts}")
    fluency = BatchedFluency(lm, prompts, run.max_new_tokens)
    base_nll, base_tokens, base_replies = fluency()
    base_repetition, base_texts = reply_record(fluency, base_replies)
    items = load_ab(behavior, "generate")
    curves = {}
    for name, measured in run.curves.items():
        spec = MethodSpec(**run.specs[name])
        curves[name] = []
        for curve in measured:
            what = f"{name} seed {curve.seed}"
            _check_same(f"{what} unsteered", base_nll, base_tokens, curve.base_nll, curve.base_tokens)
            train, _ = train_val_split(items, seed=curve.seed)
            steerer = fit_spec(lm, spec, train, layer=run.layer, seed=curve.seed, behavior=behavior)
            repetition, texts = [], []
            for k, alpha in enumerate(curve.alphas):
                nll, tokens, replies = fluency(steerer, alpha)
                _check_same(f"{what} alpha {alpha:g}", nll, tokens, curve.nll[k], curve.tokens[k])
                repeats, replied = reply_record(fluency, replies)
                repetition.append(repeats)
                texts.append(replied)
            curves[name].append(
                replace(
                    curve,
                    repetition=repetition,
                    replies=texts,
                    base_repetition=base_repetition,
                    base_replies=base_texts,
                )  # fmt: skip
            )
            if progress:
                print(f"  {behavior} {what}: {len(curve.alphas)} points", flush=True)
    return replace(run, curves=curves)
