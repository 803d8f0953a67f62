"""Add the fluency replies (their texts and repetition) to result files measured before the protocol
recorded them (``innsteer.eval.backfill``), so their curves can be summarized with the repetition
gate. A file whose replies cannot be reproduced is left unchanged and the mismatch named.

    python bench/replies.py results/SmolLM2-135M-Instruct.Q4_1-refusal-L22-s012-transport_weight1.json
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "python"))

import torch  # noqa: E402

from innsteer.eval.backfill import Mismatch, backfill  # noqa: E402
from innsteer.eval.provenance import git_commit  # noqa: E402
from innsteer.eval.results import load, save  # noqa: E402
from innsteer.hf.models import load_model  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("files", nargs="+")
    parser.add_argument("--model", default=None, help="the files' model (default: the embedded SmolLM2-135M-Instruct)")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    command = "python bench/replies.py " + " ".join(sys.argv[1:])
    models = {}
    for file in args.files:
        run = load(file)
        dtype = run.extra.get("dtype", "float32")
        if dtype not in models:
            models[dtype] = load_model(args.model, dtype=getattr(torch, dtype))
        lm = models[dtype]
        if lm.model_id != run.model_id:
            raise SystemExit(f"{file} was measured on {run.model_id}, not {lm.model_id}: pass its --model")
        start = time.time()
        try:
            run = backfill(lm, run)
        except Mismatch as error:
            print(f"{file}: left unchanged, the replies could not be reproduced: {error}", file=sys.stderr)
            return 1
        added = {"command": command, "code_version": git_commit(), "seconds": round(time.time() - start)}
        save(replace(run, extra={**run.extra, "replies_added": added}), file)
        print(f"{file}: replies added in {round(time.time() - start)} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
