"""Load on ``innsteer serve`` beside ``python -m llama_cpp.server``: N concurrent clients send a fixed
number of chat completions on loopback.

    python bench/serve_load.py [--clients 4] [--requests 24] [--max-tokens 24] [--parallel 1,4]
                               [--threads 2] [--rounds 2] [--no-llama-cpp-server]

Starts ``innsteer serve smollm2`` once per ``--parallel`` value (the real command, in a subprocess,
on 127.0.0.1 at a free port) with a random INN steer of the real shape (d = 576, K = 4 couplings,
H = 256, layer 12) and a random control vector at layer 12, and llama-cpp-python's own server on the
same model file (``pip install 'innsteer[bench]'``) with the same context size and threads. Each
round runs every server's phases in turn (A B A B over the rounds): for innsteer, one phase per
steering (none, the INN steer, the control vector) and "mixed" (each request picks one of none /
INN alpha 1 / control vector / INN alpha 2 in turn, so no two requests in a row share a steering);
llama-cpp-python's server, which cannot steer, runs "none". Every phase sends the same prompts,
greedy, ``--max-tokens`` tokens per reply (min_tokens = max_tokens: the end of text is suppressed, so
every reply has the same length). Reported per server and phase: the median over rounds of
requests/s and generated tokens/s over the phase's wall time, p50/p99 latency of a request (sent to
last byte, pooled over rounds), errors (any non-200 answer), then the ratios issue 30 targets.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch

from innsteer import INN, INNSteerer
from innsteer.core.steerers.linear import LinearSteerer
from innsteer.eval.provenance import machine_line
from innsteer.hf.models import default_gguf_path, model_id_for
from innsteer.llama.export import export_control_vector, export_steer_gguf

PROMPTS = [
    "Write one sentence about the sea.",
    "Name three animals that live in the desert.",
    "What is a good name for a cat?",
    "Describe the color blue to someone who cannot see.",
]
STEERINGS = {
    "none": None,
    "INN steer": {"steer": "inn", "alpha": 2.0},
    "control vector": {"steer": "cv", "alpha": 2.0},
}
MIXED = [None, {"steer": "inn", "alpha": 1.0}, {"steer": "cv", "alpha": 2.0}, {"steer": "inn", "alpha": 2.0}]
LLAMA_CPP_SERVER = "llama_cpp.server"
CTX_SIZE = 512


def write_steers(directory: str, layer: int) -> tuple[str, str]:
    model_id = model_id_for(default_gguf_path())
    gen = torch.Generator().manual_seed(0)
    inn = INN(576, num_couplings=4, mlp_hidden=256)
    with torch.no_grad():
        for p in list(inn.w2) + list(inn.b2):
            p.copy_(torch.randn(p.shape, generator=gen) * 0.01)
    inn_path, cv_path = os.path.join(directory, "inn.gguf"), os.path.join(directory, "cv.gguf")
    export_steer_gguf(INNSteerer(inn, torch.randn(576, generator=gen), layer, alpha=1.0, model_id=model_id), inn_path)
    vector = torch.randn(576, generator=gen)
    export_control_vector(LinearSteerer(vector, layer, model_id=model_id), cv_path, model_hint="llama")
    return inn_path, cv_path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_innsteer(args, parallel: int, inn_path: str, cv_path: str) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable, "-m", "innsteer.cli", "serve", "smollm2", "--steer", f"inn={inn_path}",
        "--steer", f"cv={cv_path}", "--port", "0", "--parallel", str(parallel), "--queue", str(args.queue),
        "--ctx-size", str(CTX_SIZE), "--threads", str(args.threads),
    ] + (["--steer-prompt"] if args.steer_prompt else [])  # fmt: skip
    return _started(command, r"on http://([\d.]+):(\d+)/v1")


def start_llama_cpp_server(args) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf_path()), "--n_ctx", str(CTX_SIZE),
        "--n_threads", str(args.threads), "--n_threads_batch", str(args.threads), "--host", "127.0.0.1",
        "--port", str(free_port()), "--verbose", "False",
    ]  # fmt: skip
    return _started(command, r"Uvicorn running on http://([\d.]+):(\d+)")


def _started(command: list[str], address_pattern: str) -> tuple[subprocess.Popen, str]:
    """Start a server; returns it and its address once its log names the address."""
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # no access log
    for line in server.stderr:
        found = re.search(address_pattern, line)
        if found:
            threading.Thread(target=server.stderr.read, daemon=True).start()  # keep the pipe drained
            return server, f"{found.group(1)}:{found.group(2)}"
        print(line, end="", file=sys.stderr)
    raise RuntimeError(f"{command[2]} exited with status {server.wait()} before serving")


def one_request(address: str, body: dict) -> tuple[float, int, bool]:
    """(seconds, generated tokens, ok) of one chat completion."""
    host, port = address.split(":")
    start = time.perf_counter()
    connection = http.client.HTTPConnection(host, int(port), timeout=600)
    try:
        connection.request("POST", "/v1/chat/completions", json.dumps(body), {"Content-Type": "application/json"})
        response = connection.getresponse()
        payload = json.loads(response.read())
        ok = response.status == 200
    except (OSError, ValueError):
        payload, ok = {}, False
    finally:
        connection.close()
    elapsed = time.perf_counter() - start
    return elapsed, payload.get("usage", {}).get("completion_tokens", 0) if ok else 0, ok


def run_phase(address: str, args, steering_of) -> dict:
    """One phase: its throughputs and the latencies of its successful requests."""
    bodies = []
    for i in range(args.requests):
        body = {
            "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
            "max_tokens": args.max_tokens,
            "min_tokens": args.max_tokens,
            "temperature": 0,
        }
        steering = steering_of(i)
        if steering is not None:
            body["steering"] = steering
        bodies.append(body)
    start = time.perf_counter()
    with ThreadPoolExecutor(args.clients) as pool:
        results = list(pool.map(lambda body: one_request(address, body), bodies))
    wall = time.perf_counter() - start
    latencies = [seconds for seconds, _, ok in results if ok]
    return {
        "requests/s": len(latencies) / wall,
        "tokens/s": sum(n for _, n, _ in results) / wall,
        "latencies": latencies,
        "errors": sum(not ok for _, _, ok in results),
    }


def summary(runs: list[dict]) -> dict:
    """Rounds of one phase: median throughputs, pooled latency percentiles, total errors."""
    latencies = sorted(x for run in runs for x in run["latencies"])
    return {
        "requests/s": statistics.median(run["requests/s"] for run in runs),
        "tokens/s": statistics.median(run["tokens/s"] for run in runs),
        "p50 ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99 ms": 1000 * float(np.percentile(latencies, 99)) if latencies else float("nan"),
        "errors": sum(run["errors"] for run in runs),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=24, help="requests per phase")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens generated per request")
    parser.add_argument(
        "--parallel", default="1,4", help="innsteer serve --parallel values (sequences), comma-separated"
    )
    parser.add_argument("--queue", type=int, default=64, help="the server's --queue")
    parser.add_argument("--threads", type=int, default=2, help="llama.cpp threads (both servers)")
    parser.add_argument("--rounds", type=int, default=2, help="rounds of every server's phases (A B A B)")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--steer-prompt", action="store_true", help="the server's --steer-prompt")
    parser.add_argument("--no-llama-cpp-server", action="store_true", help="leave out llama-cpp-python's server")
    args = parser.parse_args()
    if os.environ.get("OMP_WAIT_POLICY", "").upper() == "PASSIVE":
        print("# warning: OMP_WAIT_POLICY=PASSIVE slows llama.cpp's decode ~3x; unset it", file=sys.stderr)

    load_before = os.getloadavg()[0]
    phases = {name: (lambda i, s=steering: s) for name, steering in STEERINGS.items()}
    phases["mixed"] = lambda i: MIXED[i % len(MIXED)]
    servers: dict[str, tuple[subprocess.Popen, str]] = {}
    runs: dict[tuple[str, str], list[dict]] = {}
    with tempfile.TemporaryDirectory(prefix="innsteer-serve-bench-") as tmp:
        steers = write_steers(tmp, args.layer)
        try:
            if not args.no_llama_cpp_server:
                servers[LLAMA_CPP_SERVER] = start_llama_cpp_server(args)
            for parallel in [int(p) for p in args.parallel.split(",")]:
                servers[f"innsteer --parallel {parallel}"] = start_innsteer(args, parallel, *steers)
            for _, address in servers.values():  # warm-up
                one_request(address, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
            for _ in range(args.rounds):
                for name, (_, address) in servers.items():
                    for phase, steering_of in phases.items():
                        if name == LLAMA_CPP_SERVER and phase != "none":
                            continue
                        runs.setdefault((name, phase), []).append(run_phase(address, args, steering_of))
        finally:
            for server, _ in servers.values():
                server.terminate()
                server.wait(timeout=60)

    rows = {key: summary(value) for key, value in runs.items()}
    print(f"# {machine_line()}; load average (1 min) before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
    print(
        f"# clients={args.clients} requests={args.requests} max_tokens={args.max_tokens} threads={args.threads} "
        f"rounds={args.rounds} steer_prompt={args.steer_prompt}; medians over rounds"
    )
    columns = ["requests/s", "tokens/s", "p50 ms", "p99 ms", "errors"]
    print("| server | steering | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 2) + "|")
    for (name, phase), row in rows.items():
        cells = [f"{row[c]:.2f}" if c.endswith("/s") else f"{row[c]:.0f}" for c in columns]
        print(f"| {name} | {phase} | " + " | ".join(cells) + " |")

    def tokens(name: str, phase: str = "none") -> float:
        return rows[(name, phase)]["tokens/s"] if (name, phase) in rows else float("nan")

    innsteer = [name for name in servers if name != LLAMA_CPP_SERVER]
    print()
    for name in innsteer:
        print(f"- {name}: mixed / none {tokens(name, 'mixed') / tokens(name):.2f}x", end="")
        if LLAMA_CPP_SERVER in servers:
            print(f"; none / {LLAMA_CPP_SERVER} {tokens(name) / tokens(LLAMA_CPP_SERVER):.2f}x", end="")
        print()
    if len(innsteer) > 1:
        print(f"- {innsteer[-1]} / {innsteer[0]}, none: {tokens(innsteer[-1]) / tokens(innsteer[0]):.2f}x")


if __name__ == "__main__":
    main()
