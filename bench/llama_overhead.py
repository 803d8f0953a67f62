"""Decode speed in llama.cpp with no hook, with innsteer's INN hook, and with a stock control vector.

    python bench/llama_overhead.py [--tokens 64] [--repeats 7] [--threads 2] [--layer 12]

Every configuration decodes the same fixed token sequence after the same prompt (one token per
llama_decode, as in generation); configurations run in a fresh random order within each repeat so
machine noise hits them alike. Reported: the median over repeats, and the minimum (the least
disturbed run: on a shared CPU the better estimate of the intrinsic cost). The INN steers are random flows of
the real shape (d = 576 for the default model); speed does not depend on the trained values.
With --threads above 1, the H = 512 steers also run with one token's flow split over the threads
(``set_split_tile``; the hook's default runs it on one thread). Also reports the time spent inside the
hook's l_out rewrite per decoded token (read, flow, write;
measured in C, so machine noise in the rest of the step does not blur it) and the flow alone on one
row (SteerGGUF.apply, through ctypes). The hook's remaining cost, its per-node name filter, is in
the end-to-end overheads.
"""

from __future__ import annotations

import argparse
import os
import platform
import random
import statistics
import tempfile
import time

import numpy as np
import torch

from innsteer import INN, INNSteerer
from innsteer.hf.models import default_gguf_path
from innsteer.llama.export import export_steer_gguf

PROMPT = "Write a short story about a lighthouse keeper who finds a message in a bottle."


def random_steerer(dim: int, hidden: int, couplings: int, layer: int, scaling: str = "latent") -> INNSteerer:
    gen = torch.Generator().manual_seed(0)
    inn = INN(dim, num_couplings=couplings, mlp_hidden=hidden)
    with torch.no_grad():
        for p in list(inn.w2) + list(inn.b2):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    return INNSteerer(inn, torch.randn(dim, generator=gen), layer, alpha=1.0, scaling=scaling)


def decode_seconds_per_token(llm, prompt_tokens, decode_tokens) -> tuple[float, float]:
    """(wall seconds per decoded token, of which seconds inside the hook's l_out rewrite)."""
    steering = getattr(llm, "steering", None)
    llm.reset()
    llm.eval(prompt_tokens)
    in_hook = steering.apply_seconds if steering is not None else 0.0
    start = time.perf_counter()
    for token in decode_tokens:
        llm.eval([token])
    elapsed = time.perf_counter() - start
    in_hook = (steering.apply_seconds - in_hook) if steering is not None else 0.0
    return elapsed / len(decode_tokens), in_hook / len(decode_tokens)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=32, help="decoded tokens per measurement")
    parser.add_argument("--repeats", type=int, default=25)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--layer", type=int, default=12)
    args = parser.parse_args()

    import llama_cpp

    from innsteer.llama.bindings import SteerGGUF
    from innsteer.llama.loading import load_llama
    from innsteer.llama.steering import SteeredLlama

    model = str(default_gguf_path())
    common = dict(n_ctx=512, n_threads=args.threads, n_threads_batch=args.threads, verbose=False)
    tmp = tempfile.mkdtemp(prefix="innsteer-bench-")
    # (MLP width, weight dtype, scaling): displacement scaling also keeps and re-reads the rows
    inn_configs = [
        (512, "float32", "latent"),
        (512, "bfloat16", "latent"),
        (256, "float32", "latent"),
        (256, "bfloat16", "latent"),
        (256, "float32", "displacement"),
    ]
    llms = {"no hook": load_llama(model, **common)}
    flow_ms = {}
    for hidden, dtype, scaling in inn_configs:
        path = os.path.join(tmp, f"inn-{hidden}-{dtype}-{scaling}.gguf")
        export_steer_gguf(random_steerer(576, hidden, 4, args.layer, scaling), path, weight_dtype=dtype)
        name = f"INN hook K=4 H={hidden} {dtype}" + (f", {scaling} scaling" if scaling != "latent" else "")
        llms[name] = SteeredLlama(model, steer=path, **common)
        if hidden == 512 and args.threads > 1:  # the one-token flow on one thread (default) or split
            llms[f"{name}, split over the threads"] = SteeredLlama(model, steer=path, **common)
            llms[f"{name}, split over the threads"].steering.set_split_tile(True)
        steer, row = SteerGGUF.load(path), np.random.default_rng(0).standard_normal((1, 576)).astype(np.float32)
        times = []
        for _ in range(200):
            t = time.perf_counter()
            steer.apply(row)
            times.append(time.perf_counter() - t)
        flow_ms[name] = 1e3 * statistics.median(times)
    cv = SteeredLlama(model, **common)
    cv.steering.set_control_vector({args.layer: np.random.default_rng(0).standard_normal(576).astype(np.float32)})
    llms["control vector"] = cv

    prompt_tokens = llms["no hook"].tokenize(PROMPT.encode())
    decode_tokens = (
        llms["no hook"].tokenize(
            b" the old man walked slowly along the shore and watched the waves roll in under a grey sky"
        )
        * 8
    )[: args.tokens]
    for llm in llms.values():  # warm-up: graph allocation, page faults
        decode_seconds_per_token(llm, prompt_tokens, decode_tokens[:8])
    samples = {name: [] for name in llms}
    hook_time = {name: [] for name in llms}
    order = list(llms)
    shuffle = random.Random(0).shuffle
    for _ in range(args.repeats):
        shuffle(order)
        for name in order:
            wall, in_hook = decode_seconds_per_token(llms[name], prompt_tokens, decode_tokens)
            samples[name].append(wall)
            hook_time[name].append(in_hook)

    base_median, base_min = statistics.median(samples["no hook"]), min(samples["no hook"])
    print(
        f"model {os.path.basename(model)}, layer {args.layer}, {args.tokens} decoded tokens x {args.repeats} "
        f"repeats, {args.threads} threads, {platform.processor() or platform.machine()}, "
        f"{os.cpu_count()} CPUs, llama-cpp-python {llama_cpp.__version__}"
    )
    print(
        "| configuration | ms/token median | tokens/s median | overhead (median) | ms/token min | overhead (min) "
        "| in hook, ms/token | in hook / no-hook min | flow alone, 1 row (ms) |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for name, values in samples.items():
        median, best = statistics.median(values), min(values)
        over_median = "" if name == "no hook" else f"{100 * (median / base_median - 1):+.1f}%"
        over_min = "" if name == "no hook" else f"{100 * (best / base_min - 1):+.1f}%"
        flow = f"{flow_ms[name]:.3f}" if name in flow_ms else ""
        hooked = getattr(llms[name], "steering", None) is not None and name != "control vector"
        hook_ms = 1e3 * statistics.median(hook_time[name]) if hooked else None
        hook = f"{hook_ms:.3f} | {100 * hook_ms / (1e3 * base_min):.1f}%" if hook_ms is not None else " | "
        print(
            f"| {name} | {1e3 * median:.2f} | {1 / median:.1f} | {over_median} | {1e3 * best:.2f} | {over_min} "
            f"| {hook} | {flow} |"
        )


if __name__ == "__main__":
    main()
