"""``innsteer serve``: the OpenAI-compatible server (registered by ``innsteer.cli.main``).

innsteer serve MODEL.gguf --steer NAME=FILE ... [--default-steer NAME[:ALPHA]] [--host 127.0.0.1]
               [--port 8000] [--parallel N] [--queue N] [--api-key KEY] [--max-body-bytes N]
               (MODEL 'smollm2': the embedded default)
"""

from __future__ import annotations

import argparse
import os
import socket
import sys

from ._args import CLIError, count


def _steer(text: str) -> tuple[str, str]:
    name, sep, path = text.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"expected NAME=FILE, got '{text}'")
    return name, path


def _default_steer(text: str) -> dict:
    name, sep, alpha = text.partition(":")
    if not name:
        raise argparse.ArgumentTypeError(f"expected NAME or NAME:ALPHA, got '{text}'")
    if not sep:
        return {"steer": name}
    try:
        return {"steer": name, "alpha": float(alpha)}
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected NAME:ALPHA with a number as ALPHA, got '{text}'") from None


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "serve",
        help="an OpenAI-compatible server with per-request steering (llama.cpp)",
        description="Serve POST /v1/chat/completions and /v1/completions (OpenAI schemas, streaming included) "
        "and GET /v1/models for a GGUF model in llama.cpp. A request picks its steering in the body: "
        '"steering": {"steer": NAME, "alpha": 1.5}, a list of those, or null for none. '
        "Needs llama-cpp-python, fastapi and uvicorn (pip install 'innsteer[llama,serve]').",
    )
    p.add_argument("model", help="GGUF model to serve ('smollm2': the embedded default model)")
    p.add_argument(
        "--steer",
        type=_steer,
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="offer a steer under NAME: a steer GGUF, a llama.cpp control vector GGUF, or a .safetensors steer "
        "file from `innsteer train` (repeatable)",
    )
    p.add_argument(
        "--default-steer",
        type=_default_steer,
        action="append",
        default=None,
        metavar="NAME[:ALPHA]",
        help="steering for requests that do not name any (repeatable; default: none; alpha: the file's)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    p.add_argument("--port", type=count(0, 65535), default=8000, help="(default: %(default)s; 0 picks a free port)")
    p.add_argument(
        "--parallel",
        type=count(1),
        default=4,
        help="requests decoded together, one sequence each in one llama.cpp context (default: %(default)s)",
    )
    p.add_argument(
        "--queue",
        type=count(0),
        default=16,
        help="requests that may wait for a context; more get 503 (default: %(default)s)",
    )
    p.add_argument("--ctx-size", type=count(1), default=2048, help="context per slot, tokens (default: %(default)s)")
    p.add_argument("--threads", type=count(1), default=None, help="llama.cpp threads per context")
    p.add_argument(
        "--api-key",
        action="append",
        default=[],
        metavar="KEY",
        help="require 'Authorization: Bearer KEY' on every route but /health (repeatable; also read from "
        "INNSTEER_API_KEY, comma-separated, which keeps keys out of the process list)",
    )
    p.add_argument(
        "--max-body-bytes",
        type=count(1),
        default=None,
        help="larger request bodies get 413 (default: 4 MiB)",
    )
    p.add_argument(
        "--steer-prompt",
        action="store_true",
        help="INN steers also steer the prompt (default: from the last prompt token on; control vectors always "
        "steer every position)",
    )
    p.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    from ..hf.models import model_id_for, resolve_model_path

    model = resolve_model_path(args.model)
    if model.suffix != ".gguf":
        raise CLIError(f"innsteer serve needs a .gguf model, got {model}")
    try:
        from ..serve.app import DEFAULT_MAX_BODY_BYTES, http_server, load_server
        from ..serve.auth import ENV_VAR, api_keys, is_loopback
    except ImportError as error:
        raise CLIError(f"innsteer serve needs fastapi and uvicorn ({error}): pip install 'innsteer[serve]'") from None
    keys = api_keys(args.api_key, os.environ.get(ENV_VAR))
    try:
        sock = socket.create_server((args.host, args.port))
    except OSError as error:
        raise CLIError(f"cannot listen on {args.host}:{args.port}: {error.strerror or error}") from None
    with sock:
        server = load_server(
            str(model),
            args.steer,
            model_id=model_id_for(model),
            default_steering=args.default_steer,
            parallel=args.parallel,
            max_queue=args.queue,
            n_ctx=args.ctx_size,
            n_threads=args.threads,
            steer_prompt=args.steer_prompt,
        )
        host, port = sock.getsockname()[:2]
        if not keys and not is_loopback(host):
            print(
                f"innsteer: warning: serving on {host}, reachable from other machines, without an API key: anyone "
                f"who can reach it can use it (set {ENV_VAR} or --api-key)",
                file=sys.stderr,
            )
        steers = ", ".join(server.catalog.steers) or "none"
        print(
            f"innsteer: serving {server.model_id} (steers: {steers}) on http://{host}:{port}/v1 "
            f"with {args.parallel} sequence(s), queue {args.queue}",
            file=sys.stderr,
        )
        try:
            limit = args.max_body_bytes or DEFAULT_MAX_BODY_BYTES
            http_server(server, api_keys=keys, max_body_bytes=limit).run(sockets=[sock])
        finally:
            server.close()
    return 0
