"""Load on ``innsteer serve``: N concurrent clients send a fixed number of chat completions on loopback.

    python bench/serve_load.py [--clients 4] [--requests 24] [--max-tokens 16] [--parallel 1] [--threads 2]

Starts ``innsteer serve smollm2`` (the real command, in a subprocess, on 127.0.0.1 at a free port)
with a random INN steer of the real shape (d = 576, K = 4 couplings, H = 256, layer 12) and a random
control vector at layer 12, then runs one phase per steering: none, the INN steer, the control
vector, and "mixed" (each request picks one of the three in turn, so consecutive requests on a
context differ and its KV cache is dropped each time). Every phase sends the same prompts, greedy,
with ``--max-tokens`` replies (min_tokens = max_tokens, so every reply has the same length).
Reported per phase: requests/s and generated tokens/s over the phase's wall time, p50/p99 latency
of a request (sent to last byte), and errors (any non-200 answer, 503s from a full queue included).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
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


def start_server(args, inn_path: str, cv_path: str) -> tuple[subprocess.Popen, str]:
    command = [
        sys.executable, "-m", "innsteer.cli", "serve", "smollm2", "--steer", f"inn={inn_path}",
        "--steer", f"cv={cv_path}", "--port", "0", "--parallel", str(args.parallel), "--queue", str(args.queue),
        "--ctx-size", "512", "--threads", str(args.threads),
    ] + (["--steer-prompt"] if args.steer_prompt else [])  # fmt: skip
    server = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)  # no access log
    for line in server.stderr:  # the command names its address once the model is loaded
        found = re.search(r"on http://([\d.]+):(\d+)/v1", line)
        if found:
            threading.Thread(target=server.stderr.read, daemon=True).start()  # keep the pipe drained
            return server, f"{found.group(1)}:{found.group(2)}"
        print(line, end="", file=sys.stderr)
    raise RuntimeError(f"innsteer serve exited with status {server.wait()} before serving")


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
    latencies = sorted(seconds for seconds, _, ok in results if ok)
    tokens = sum(n for _, n, _ in results)
    return {
        "requests/s": len(latencies) / wall,
        "tokens/s": tokens / wall,
        "p50 ms": 1000 * statistics.median(latencies) if latencies else float("nan"),
        "p99 ms": 1000 * float(np.percentile(latencies, 99)) if latencies else float("nan"),
        "errors": sum(not ok for _, _, ok in results),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="concurrent clients")
    parser.add_argument("--requests", type=int, default=24, help="requests per phase")
    parser.add_argument("--max-tokens", type=int, default=16, help="tokens generated per request")
    parser.add_argument("--parallel", type=int, default=1, help="the server's --parallel (contexts)")
    parser.add_argument("--queue", type=int, default=64, help="the server's --queue")
    parser.add_argument("--threads", type=int, default=1, help="llama.cpp threads per context")
    parser.add_argument("--layer", type=int, default=12)
    parser.add_argument("--steer-prompt", action="store_true", help="the server's --steer-prompt")
    args = parser.parse_args()

    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="innsteer-serve-bench-") as tmp:
        server, address = start_server(args, *write_steers(tmp, args.layer))
        try:
            one_request(address, {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})  # warm-up
            cycle = list(STEERINGS.values())
            phases = {name: (lambda i, s=steering: s) for name, steering in STEERINGS.items()}
            phases["mixed"] = lambda i: cycle[i % len(cycle)]
            rows = {name: run_phase(address, args, steering_of) for name, steering_of in phases.items()}
        finally:
            server.terminate()
            server.wait(timeout=60)

    print(f"# {machine_line()}; load average (1 min) before/after: {load_before:.1f} / {os.getloadavg()[0]:.1f}")
    print(
        f"# clients={args.clients} requests={args.requests} max_tokens={args.max_tokens} "
        f"parallel={args.parallel} threads={args.threads} steer_prompt={args.steer_prompt}"
    )
    columns = ["requests/s", "tokens/s", "p50 ms", "p99 ms", "errors"]
    print("| steering | " + " | ".join(columns) + " |")
    print("|---" * (len(columns) + 1) + "|")
    for name, row in rows.items():
        cells = [f"{row[c]:.2f}" if c.endswith("/s") else f"{row[c]:.0f}" for c in columns]
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
