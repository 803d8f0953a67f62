"""What batching can give on this machine: llama.cpp's decode step with 1, 2, 4 ... sequences.

    python bench/batch_width.py [--widths 1,2,4] [--threads 2] [--steps 40] [--repeats 2]

One context of the default model with a KV stream per sequence (as ``innsteer serve`` decodes),
every sequence after the same prompt; each step decodes one token of every sequence. Reported: the
median step time per width (over steps, then the best of the repeats) and tokens/s, and each width's
tokens/s over one sequence's: the ceiling of ``--parallel N`` against ``--parallel 1`` before any
server overhead (prompts, HTTP, sampling).
"""

from __future__ import annotations

import argparse
import statistics
import time

from innsteer.eval.provenance import machine_line
from innsteer.hf.models import default_gguf_path

PROMPT = b"Once upon a time there was a small village by the sea"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--widths", default="1,2,4", help="sequences per step, comma-separated")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    widths = [int(w) for w in args.widths.split(",")]

    import llama_cpp

    from innsteer.llama.loading import load_llama

    host = load_llama(str(default_gguf_path()), n_ctx=512, n_threads=args.threads, verbose=False)
    params = llama_cpp.llama_context_default_params()
    params.n_ctx, params.n_seq_max, params.kv_unified = 512 * max(widths), max(widths), False
    params.n_batch = params.n_ubatch = 512
    params.n_threads = params.n_threads_batch = args.threads
    ctx = llama_cpp.llama_init_from_model(host.model, params)
    memory, batch = llama_cpp.llama_get_memory(ctx), llama_cpp.llama_batch_init(512, 0, 1)
    prompt = host.tokenize(PROMPT)

    def decode(rows) -> None:
        for i, (token, position, seq) in enumerate(rows):
            batch.token[i], batch.pos[i], batch.n_seq_id[i], batch.logits[i] = token, position, 1, 1
            batch.seq_id[i][0] = seq
        batch.n_tokens = len(rows)
        if llama_cpp.llama_decode(ctx, batch):
            raise RuntimeError("llama_decode failed")

    best: dict[int, float] = {}
    for _ in range(args.repeats):
        for width in widths:
            llama_cpp.llama_memory_clear(memory, True)
            for seq in range(width):
                decode([(token, i, seq) for i, token in enumerate(prompt)])
            times = []
            for step in range(args.steps):
                start = time.perf_counter()
                decode([(500 + step, len(prompt) + step, seq) for seq in range(width)])
                times.append(time.perf_counter() - start)
            best[width] = min(best.get(width, float("inf")), statistics.median(times))
    llama_cpp.llama_batch_free(batch)
    llama_cpp.llama_free(ctx)
    host.close()

    print(f"# {machine_line()}; {args.threads} llama.cpp threads, {args.steps} steps x {args.repeats} repeats")
    print("| sequences per step | ms/step | tokens/s | tokens/s over 1 sequence |")
    print("|---|---|---|---|")
    for width in widths:
        rate = width / best[width]
        print(f"| {width} | {1e3 * best[width]:.2f} | {rate:.1f} | {rate * best[widths[0]] / widths[0]:.2f}x |")


if __name__ == "__main__":
    main()
