"""What steering one layer adds to `generate`: a randomly initialised Llama-3-8B-shaped model
(bf16 on the GPU; no download), or the embedded default model on the CPU, 128 new tokens greedy
with the KV cache, with and without an INN steerer (K=4, bf16 weights) at one layer, through
innsteer.core.hooks.steering.

    python bench/decode_overhead.py                 # GPU, Llama-3-8B shape (~16 GB of bf16 weights)
    python bench/decode_overhead.py --default-model --inn-hidden 256   # CPU, SmolLM2-135M (real weights)
    python bench/decode_overhead.py --tiny          # CPU smoke test with a tiny config
    python bench/decode_overhead.py --compile       # also with a static cache and torch.compile(reduce-overhead)

Plain and steered calls alternate, one of each per round, so drifting load hits both alike.
Prints medians over --repeats rounds: ms per generated token without / with steering, the median
of the per-round ratios and its quartiles.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time

import torch

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "python"), os.path.join(os.path.dirname(__file__), "..")]

import innsteer  # noqa: E402
from innsteer.core.hooks import steering  # noqa: E402

LLAMA3_8B = dict(
    hidden_size=4096,
    intermediate_size=14336,
    num_hidden_layers=32,
    num_attention_heads=32,
    num_key_value_heads=8,
    vocab_size=128256,
    max_position_embeddings=8192,
    rope_theta=500000.0,
)
TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    vocab_size=1000,
    max_position_embeddings=512,
)


def build_model(shape: dict, device: str, dtype: torch.dtype):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**shape)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # initialise directly in the target dtype and device: no fp32 copy
    try:
        with torch.device(device):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    return model.eval()


def build_steerer(dim: int, layer: int, device: str, hidden: int, couplings: int) -> innsteer.INNSteerer:
    inn = innsteer.INN(dim, num_couplings=couplings, mlp_hidden=hidden)
    with torch.no_grad():
        for w2 in inn.w2:  # a non-trivial flow (the default init is the identity)
            w2.normal_(std=0.02)
    steerer = innsteer.INNSteerer(inn, torch.randn(dim), layer, alpha=1.0, weight_dtype=torch.bfloat16)
    return steerer.to(device)


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def time_generate_pair(model, steerer, prompt, new_tokens: int, repeats: int, device: str) -> dict:
    """Seconds of one plain and one steered generate call per round (after a warm-up of each),
    and the generated ids of the last round."""
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=0)

    def run(steered: bool) -> tuple[float, torch.Tensor]:
        with steering(model, steerer, alpha=1.0, positions="all") if steered else contextlib.nullcontext():
            sync(device)
            start = time.perf_counter()
            out = model.generate(prompt, **kwargs)
            sync(device)
        assert out.shape[1] == prompt.shape[1] + new_tokens, out.shape
        return time.perf_counter() - start, out

    run(False), run(True)
    times, last_ids = {False: [], True: []}, {}
    for _ in range(repeats):
        for steered in (False, True):
            seconds, last_ids[steered] = run(steered)
            times[steered].append(seconds)
    ratios = [s / p for p, s in zip(times[False], times[True])]
    return {
        "plain": statistics.median(times[False]),
        "steered": statistics.median(times[True]),
        "ratio": statistics.median(ratios),
        "quartiles": statistics.quantiles(ratios, n=4)[::2] if len(ratios) > 1 else [ratios[0]] * 2,
        "changed": not torch.equal(last_ids[False], last_ids[True]),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tiny", action="store_true", help="tiny config on the CPU in float32 (smoke test)")
    parser.add_argument(
        "--default-model", action="store_true", help="the embedded SmolLM2-135M-Instruct on the CPU (float32)"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch threads on the CPU (default: torch's)")
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--layer", type=int, default=None, help="steered layer (default: the middle one)")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--inn-hidden", type=int, default=512)
    parser.add_argument("--couplings", type=int, default=4)
    parser.add_argument(
        "--compile",
        action="store_true",
        help="also measure with a static KV cache and torch.compile(mode='reduce-overhead')",
    )
    args = parser.parse_args()

    device = "cpu" if args.tiny or args.default_model else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("no CUDA GPU: run with --tiny or --default-model on the CPU")
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.default_model:
        model = innsteer.load_model().model
        shape = {k: getattr(model.config, k) for k in ("hidden_size", "num_hidden_layers", "vocab_size")}
        what, dtype = "SmolLM2-135M-Instruct (the embedded default model, real weights)", torch.float32
    else:
        shape, dtype = (TINY, torch.float32) if args.tiny else (LLAMA3_8B, torch.bfloat16)
        model = build_model(shape, device, dtype)
        what = f"Llama {'tiny' if args.tiny else '3-8B'} shape, random weights"
    layer = shape["num_hidden_layers"] // 2 if args.layer is None else args.layer
    steerer = build_steerer(shape["hidden_size"], layer, device, args.inn_hidden, args.couplings)
    prompt = torch.randint(1, shape["vocab_size"], (1, args.prompt_tokens), device=device)
    name = torch.cuda.get_device_name() if device == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    print(
        f"# {name}, torch {torch.__version__}; {what}, {dtype}; prompt {args.prompt_tokens} tokens, "
        f"{args.new_tokens} new tokens greedy, {args.repeats} interleaved rounds; steering layer {layer} with "
        f"INN K={args.couplings}, H={args.inn_hidden}, bf16 weights"
    )
    print("| setting | ms/token plain | ms/token steered | overhead (median of rounds) | quartiles |")
    print("|---|---|---|---|---|")

    settings = ["eager, dynamic cache"] + (["static cache + torch.compile(reduce-overhead)"] if args.compile else [])
    with torch.no_grad():
        for label in settings:
            if label.startswith("static"):
                model.generation_config.cache_implementation = "static"
                model.forward = torch.compile(model.forward, mode="reduce-overhead", fullgraph=True)
            t = time_generate_pair(model, steerer, prompt, args.new_tokens, args.repeats, device)
            # The steerer really ran: a non-trivial flow at alpha=1 changes the greedy continuation
            # (reported, not asserted: a random model may still agree).
            low, high = (100 * (q - 1) for q in t["quartiles"])
            print(
                f"| {label} | {t['plain'] / args.new_tokens * 1e3:.3f} | {t['steered'] / args.new_tokens * 1e3:.3f} | "
                f"{100 * (t['ratio'] - 1):+.2f}% {'(output changed)' if t['changed'] else '(output unchanged)'} | "
                f"{low:+.2f}% .. {high:+.2f}% |",
                flush=True,
            )


if __name__ == "__main__":
    main()
