"""Where a measurement came from: the machine, the software and the command, recorded with every
result file and benchmark line (numbers differ between AVX2, AVX-512 and AMX hosts)."""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Optional

# The SIMD extensions that change speed (and, for bfloat16 kernels, numerics) of torch and ggml.
SIMD_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def cpu() -> dict:
    """{"model", "simd": [flags], "cpus"} from /proc/cpuinfo (the platform's name elsewhere)."""
    model, flags = platform.processor() or platform.machine(), set()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    return {"model": model, "simd": [f for f in SIMD_FLAGS if f in flags], "cpus": os.cpu_count()}


def machine_line() -> str:
    """The CPU in one line, for benchmark output."""
    info = cpu()
    return f"{info['model']} ({', '.join(info['simd']) or 'no AVX2'}), {info['cpus']} CPUs"


def git_commit() -> Optional[str]:
    """The source checkout's commit (with "+dirty" for uncommitted changes), None outside a checkout."""
    root = Path(__file__).resolve().parents[3]
    if not (root / ".git").exists():
        return None
    try:
        commit = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True, text=True, timeout=10, check=True,
        ).stdout.strip()  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+dirty" if dirty else "")


def provenance(command: Optional[list[str]] = None) -> dict:
    """The date, command (default: this process's argv), software versions and machine of a run, as
    stored in result files."""
    import torch

    from .. import __version__

    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": shlex.join(sys.argv if command is None else command),
        "innsteer": __version__,
        "commit": git_commit(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "cpu": cpu(),
    }
