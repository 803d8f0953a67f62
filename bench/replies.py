"""Add the fluency replies (their texts and repetition) to result files measured before the protocol
recorded them, so their curves can be summarized with the repetition gate (innsteer.eval.tradeoff).

Every run is refitted exactly as the protocol fitted it (same spec, split, seed and code path,
``innsteer.eval.protocol.fit_spec``) and its greedy replies regenerated at each recorded alpha; the
replies' NLL must equal the recorded NLL (same token counts, NLL within 1e-4 relative), else the
file is left unchanged and the mismatch named. The A/B scores are not recomputed.

    python bench/replies.py results/SmolLM2-135M-Instruct.Q4_1-refusal-L22-s012-transport_weight1.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "python"), str(ROOT)]
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from bench.quality import DTYPES, code_version  # noqa: E402
from innsteer.datasets.ab import train_val_split  # noqa: E402
from innsteer.datasets.caa import load_ab, load_open_ended  # noqa: E402
from innsteer.datasets.files import NEUTRAL_PROMPTS  # noqa: E402
from innsteer.eval.batched import BatchedFluency  # noqa: E402
from innsteer.eval.protocol import MethodSpec, fit_spec, reply_record  # noqa: E402
from innsteer.hf.models import load_model  # noqa: E402


class Mismatch(Exception):
    """The regenerated replies are not the recorded ones."""


def check_same(what: str, nll: torch.Tensor, tokens: torch.Tensor, recorded_nll, recorded_tokens) -> None:
    if tokens.tolist() != [float(t) for t in recorded_tokens]:
        raise Mismatch(f"{what}: reply lengths {tokens.tolist()} differ from the recorded {recorded_tokens}")
    if not torch.allclose(nll, torch.tensor(recorded_nll, dtype=nll.dtype), rtol=1e-4, atol=1e-4):
        raise Mismatch(f"{what}: reply NLL {nll.tolist()} differs from the recorded {recorded_nll}")


def backfill(lm, result: dict) -> dict:
    """The result with every run's (and its unsteered point's) reply texts and repetition added."""
    behavior = result["behavior"]
    if result.get("evaluated_on") == "validation":
        prompts = list(NEUTRAL_PROMPTS)
    else:
        prompts = load_open_ended(behavior, limit=result["n_prompts"])
    if len(prompts) != result["n_prompts"]:
        raise Mismatch(f"{len(prompts)} fluency prompts, the file has {result['n_prompts']}")
    fluency = BatchedFluency(lm, prompts, result["max_new_tokens"])
    base_nll, base_tokens, base_replies = fluency()
    base_repetition, base_texts = reply_record(fluency, base_replies)
    items = load_ab(behavior, "generate")
    for name, runs in result["runs"].items():
        spec = MethodSpec(**result["specs"][name])
        for run in runs:
            what = f"{name} seed {run['seed']}"
            check_same(f"{what} unsteered", base_nll, base_tokens, run["base_nll"], run["base_tokens"])
            train, _ = train_val_split(items, seed=run["seed"])
            steerer = fit_spec(lm, spec, train, layer=result["layer"], seed=run["seed"], behavior=behavior)
            run["repetition"], run["replies"] = [], []
            for k, alpha in enumerate(run["alphas"]):
                nll, tokens, replies = fluency(steerer, alpha)
                check_same(f"{what} alpha {alpha:g}", nll, tokens, run["nll"][k], run["tokens"][k])
                repeats, texts = reply_record(fluency, replies)
                run["repetition"].append(repeats)
                run["replies"].append(texts)
            run["base_repetition"], run["base_replies"] = base_repetition, base_texts
            print(f"  {behavior} {what}: {len(run['alphas'])} points", flush=True)
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--model", default=None, help="the files' model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python bench/replies.py " + " ".join(sys.argv[1:])
    version = code_version()
    models = {}
    for file in args.files:
        path = Path(file)
        result = json.loads(path.read_text())
        dtype = result.get("dtype", "float32")
        if dtype not in models:
            models[dtype] = load_model(args.model, dtype=DTYPES[dtype])
        lm = models[dtype]
        if lm.model_id != result["model_id"]:
            raise SystemExit(f"{path} was measured on {result['model_id']}, not {lm.model_id}: pass its --model")
        start = time.time()
        try:
            result = backfill(lm, result)
        except Mismatch as error:
            print(f"{path}: left unchanged, the replies could not be reproduced: {error}", file=sys.stderr)
            return 1
        result["replies_added"] = {"command": command, "code_version": version, "seconds": round(time.time() - start)}
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(result, indent=1))
        os.replace(tmp, path)  # atomic: the file is never half written
        print(f"{path}: replies added in {round(time.time() - start)} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
