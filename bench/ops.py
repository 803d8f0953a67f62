"""Microbenchmark of the steer op: compiled kernel vs eager pure-PyTorch reference vs
torch.compile of the reference, side by side in one run. On CPU every round times each column
once, in random order, and the table gives medians with quartiles and per-round ratios, so
load from other processes (printed before and after) shifts all columns alike.

    python bench/ops.py                      # CPU table, K=4, H=512
    python bench/ops.py --dims 576 --tokens 1 8 --rounds 200
    python bench/ops.py --device cuda        # GPU table: bf16 activations and weights, CUDA events

Also prints the weight-read floor (weight bytes read per call / measured memory bandwidth)
for each row, with float32 and bfloat16 weights.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

import torch

sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "python"), os.path.join(os.path.dirname(__file__), "..")]

import innsteer  # noqa: E402
from innsteer.eval.provenance import cpu  # noqa: E402
from innsteer_ext import reference  # noqa: E402


def median_ms(fn, repeats: int, warmup: int = 5, min_seconds: float = 0.2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    start = time.perf_counter()
    while len(times) < repeats or (time.perf_counter() - start < min_seconds and len(times) < 50 * repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def interleaved_ms(fns: dict, rounds: int, max_seconds: float, warmup: int = 2) -> dict:
    """Times every candidate once per round, in a fresh random order each round, so load from other
    processes hits all of them alike. Returns per-candidate lists of wall and process-CPU ms (all
    threads), one entry per round."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    order = list(fns)
    times = {name: [] for name in fns}
    cpu_times = {name: [] for name in fns}
    rng = random.Random(0)
    start = time.perf_counter()
    while len(times[order[0]]) < rounds and (len(times[order[0]]) < 5 or time.perf_counter() - start < max_seconds):
        rng.shuffle(order)
        for name in order:
            t0, c0 = time.perf_counter(), time.process_time()
            fns[name]()
            times[name].append((time.perf_counter() - t0) * 1e3)
            cpu_times[name].append((time.process_time() - c0) * 1e3)
    return times, cpu_times


def quartiles(values) -> tuple[float, float, float]:
    q1, q2, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return q1, q2, q3


def memory_bandwidth_gbs(n_bytes: int = 512 << 20, repeats: int = 10) -> float:
    """Read bandwidth of a large float32 reduction (all threads)."""
    data = torch.ones(n_bytes // 4)
    ms = median_ms(lambda: data.sum(), repeats, warmup=2, min_seconds=0)
    return n_bytes / (ms * 1e-3) / 1e9


def machine_line() -> str:
    """CPU model, the SIMD extensions the kernels and MKL can use, threads and load."""
    info = cpu()
    load = "load average " + ", ".join(f"{x:.2f}" for x in os.getloadavg()) if hasattr(os, "getloadavg") else ""
    return (
        f"# machine: {info['model']}, {info['cpus']} logical CPUs, SIMD {' '.join(info['simd']) or 'below AVX2'}; "
        f"torch {torch.__version__} ({torch.backends.cpu.get_cpu_capability()} kernels), {torch.get_num_threads()} "
        f"threads; {load}"
    )


def bench_row(dim, tokens, hidden, couplings, rounds, max_seconds, with_compile):
    torch.manual_seed(0)
    inn = innsteer.INN(dim, num_couplings=couplings, mlp_hidden=hidden)
    with torch.no_grad():
        for w2 in inn.w2:
            w2.normal_(std=0.02)
    direction = torch.randn(dim)
    h = torch.randn(tokens, dim)
    flow32 = inn.flow_args()
    flow16 = inn.flow_args(weight_dtype=torch.bfloat16)
    op = torch.ops.innsteer.steer
    fns = {
        "op_f32": lambda: op(h, None, direction, 1.0, *flow32),
        "op_bf16w": lambda: op(h, None, direction, 1.0, *flow16),
        "eager": lambda: reference.steer(h, None, direction, 1.0, *flow32),
    }
    if with_compile:
        torch._dynamo.reset()  # a fresh cache per shape: past the recompile limit it would silently run eager
        compiled = torch.compile(reference.steer, dynamic=False)
        fns["compiled"] = lambda: compiled(h, None, direction, 1.0, *flow32)
    with torch.no_grad():
        times, cpu_times = interleaved_ms(fns, rounds, max_seconds)
    weights = sum(w.numel() for w in list(inn.w1) + list(inn.w2))
    times["weight_bytes_f32"] = 2 * 4 * weights  # forward and inverse each read every weight once
    times["cpu"] = cpu_times
    return times


def cuda_median_ms(fn, repeats: int, warmup: int = 5) -> float:
    """Median of per-call CUDA-event times (what the call occupies on the stream, launch gaps included)."""
    for _ in range(warmup):
        fn()
    pairs = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)]
    for start, end in pairs:
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in pairs)


def cuda_graph_median_ms(fn, repeats: int) -> float:
    """The same call captured once in a CUDA graph and replayed (no CPU launch cost)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return cuda_median_ms(graph.replay, repeats)


def cuda_bandwidth_gbs(n_bytes: int = 2 << 30) -> float:
    """HBM bandwidth of a large device-to-device copy (read + write bytes)."""
    src = torch.empty(n_bytes // 2, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    ms = cuda_median_ms(lambda: dst.copy_(src), 20)
    return 2 * src.numel() / (ms * 1e-3) / 1e9


def cuda_tensor_tflops(n: int = 8192) -> float:
    """Dense bf16 tensor-core rate of a large cuBLAS matmul."""
    a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
    ms = cuda_median_ms(lambda: a @ b, 20)
    return 2 * n**3 / (ms * 1e-3) / 1e12


def bench_row_cuda(dim, tokens, hidden, couplings, repeats, compile_mode):
    torch.manual_seed(0)
    inn = innsteer.INN(dim, num_couplings=couplings, mlp_hidden=hidden).cuda()
    with torch.no_grad():
        for w2 in inn.w2:
            w2.normal_(std=0.02)
    direction = torch.randn(dim, device="cuda")
    h = torch.randn(tokens, dim, device="cuda", dtype=torch.bfloat16)
    residual = torch.randn_like(h)
    flow16 = inn.flow_args(weight_dtype=torch.bfloat16)
    flow32 = inn.flow_args()
    op = torch.ops.innsteer.steer
    row = {}
    with torch.no_grad():
        row["op"] = cuda_median_ms(lambda: op(h, residual, direction, 1.0, *flow16), repeats)
        row["op_graph"] = cuda_graph_median_ms(lambda: op(h, residual, direction, 1.0, *flow16), repeats)
        row["op_f32w"] = cuda_median_ms(lambda: op(h, residual, direction, 1.0, *flow32), repeats)
        row["eager"] = cuda_median_ms(
            lambda: reference.steer(h, residual, direction, 1.0, *flow16), max(5, repeats // 4)
        )
        if compile_mode:
            torch._dynamo.reset()
            compiled = torch.compile(reference.steer, mode=compile_mode, dynamic=False)
            row["compiled"] = cuda_median_ms(
                lambda: compiled(h, residual, direction, 1.0, *flow16), max(5, repeats // 4)
            )
    weights = sum(w.numel() for w in list(inn.w1) + list(inn.w2))
    row["weight_bytes"] = 2 * 2 * weights  # bf16, forward and inverse each read every weight once
    row["flops"] = 2 * 2 * weights * tokens  # a multiply-add per weight per token, both directions
    return row


def main_cuda(args):
    bandwidth = cuda_bandwidth_gbs()
    tflops = cuda_tensor_tflops()
    print(
        f"# device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}; "
        f"measured HBM {bandwidth:.0f} GB/s (copy), bf16 tensor cores {tflops:.0f} TFLOP/s (cuBLAS {8192}^3)"
    )
    print(
        f"# K={args.couplings}; medians in ms per steer call (phi, + alpha v, phi^-1, fused residual add), "
        f"bf16 activations; 'op' = fused op with bf16 weights, 'graph' = the same replayed from a CUDA graph, "
        f"compiled = torch.compile(mode={args.compile_mode!r}) of the reference; floor = max(weight bytes / HBM, "
        "FLOPs / tensor-core rate); share = floor / op"
    )
    header = (
        "| d | H | tokens | op | op graph | op f32 w | eager ref | compiled ref | eager/op | compiled/op "
        "| floor | floor/op graph |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    for dim in args.dims:
        for hidden in args.hidden_sizes or ([512, 1024] if dim == 8192 else [512]):
            for tokens in args.tokens:
                row = bench_row_cuda(
                    dim, tokens, hidden, args.couplings, args.repeats, None if args.no_compile else args.compile_mode
                )
                floor = max(row["weight_bytes"] / (bandwidth * 1e9), row["flops"] / (tflops * 1e12)) * 1e3
                compiled = row.get("compiled", float("nan"))
                print(
                    f"| {dim} | {hidden} | {tokens} | {row['op']:.4f} | {row['op_graph']:.4f} | "
                    f"{row['op_f32w']:.4f} | {row['eager']:.4f} | {compiled:.4f} | {row['eager'] / row['op']:.1f}x | "
                    f"{compiled / row['op']:.1f}x | {floor:.4f} | {floor / row['op_graph']:.2f} |",
                    flush=True,
                )
                torch.cuda.empty_cache()


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dims", type=int, nargs="+", default=[576, 2048, 4096])
    parser.add_argument("--tokens", type=int, nargs="+", default=[1, 8, 64, 512])
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--couplings", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=50, help="cuda: timed calls per column")
    parser.add_argument("--rounds", type=int, default=30, help="cpu: interleaved rounds per row (at least 5)")
    parser.add_argument("--max-seconds", type=float, default=20.0, help="cpu: stop adding rounds after this long")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile of the reference")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--hidden-sizes", type=int, nargs="+", help="cuda: coupling widths (default 512, plus 1024 at d=8192)"
    )
    parser.add_argument("--compile-mode", default="max-autotune", help="cuda: torch.compile mode of the reference")
    args = parser.parse_args()
    if args.device == "cuda":
        if "--dims" not in sys.argv:
            args.dims = [576, 2048, 4096, 8192]
        if "--tokens" not in sys.argv:
            args.tokens = [1, 8, 64, 512, 4096]
        return main_cuda(args)

    bandwidth = memory_bandwidth_gbs()
    print(machine_line())
    print(
        f"# K={args.couplings}, H={args.hidden}, float32 activations; ms per steer call (phi, + alpha v, phi^-1): "
        "median [quartiles] over rounds that time every column once in random order; eager/op and "
        "compiled/op are medians [quartiles] of the per-round ratios (op = the weight dtype with the lower "
        "median), 'by CPU' the same ratio of process CPU time (all threads; preemption does not count); "
        f"read bandwidth {bandwidth:.1f} GB/s (float32 sum, all threads); "
        "floor = weight bytes read per call / that bandwidth"
    )
    header = (
        "| d | tokens | rounds | op f32 w | op bf16 w | eager ref | compiled ref | eager/op | eager/op by CPU "
        "| compiled/op | floor f32 w | floor bf16 w | op bf16 w / floor |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")

    def ratio(values, op_times):
        if not values:
            return "n/a"
        q1, q2, q3 = quartiles([x / op for x, op in zip(values, op_times)])
        return f"{q2:.2f}x [{q1:.2f}-{q3:.2f}]"

    def cell(values):
        if not values:
            return "n/a"
        q1, q2, q3 = quartiles(values)
        return f"{q2:.3f} [{q1:.3f}-{q3:.3f}]"

    for dim in args.dims:
        for tokens in args.tokens:
            t = bench_row(dim, tokens, args.hidden, args.couplings, args.rounds, args.max_seconds, not args.no_compile)
            floor32 = t["weight_bytes_f32"] / (bandwidth * 1e9) * 1e3
            floor16 = floor32 / 2
            best_name = min(("op_f32", "op_bf16w"), key=lambda name: statistics.median(t[name]))
            best = t[best_name]

            print(
                f"| {dim} | {tokens} | {len(best)} | {cell(t['op_f32'])} | {cell(t['op_bf16w'])} | "
                f"{cell(t['eager'])} | {cell(t.get('compiled', []))} | {ratio(t['eager'], best)} | "
                f"{ratio(t['cpu']['eager'], t['cpu'][best_name])} | "
                f"{ratio(t.get('compiled', []), best)} | "
                f"{floor32:.3f} | {floor16:.3f} | {statistics.median(t['op_bf16w']) / floor16:.2f} |",
                flush=True,
            )
    print(machine_line().replace("# machine:", "# after the run:"))


if __name__ == "__main__":
    main()
