"""What every command of the CLI shares: the user-error type, checks of the files and directories a
command reads or writes (made before any work), and argument types. Imports no torch."""

from __future__ import annotations

import argparse
import os
import tempfile
from pathlib import Path
from typing import Optional

from ..core.errors import InnsteerError, MissingFileError


class CLIError(InnsteerError):
    """A user error: printed as 'innsteer: error: ...' with exit status 2."""


def check_input_file(path: str, option: str) -> None:
    if os.path.isdir(path):
        raise CLIError(f"{option} {path} is a directory, not a file")
    if not os.path.isfile(path):
        raise MissingFileError(f"{option}: no file at {path}")


def _check_writable(directory: Path, option: str, path: str) -> None:
    try:
        with tempfile.TemporaryFile(dir=directory):
            pass
    except OSError as error:
        raise CLIError(f"{option} {path}: cannot write in {directory} ({error.strerror})") from None


def check_output_file(path: str, option: str) -> None:
    """Before any work: a file can be written (created or replaced) at ``path``."""
    if os.path.isdir(path):
        raise CLIError(f"{option} {path} is a directory; name the file to write")
    directory = Path(path).absolute().parent
    if not directory.is_dir():
        raise CLIError(f"{option} {path}: directory {directory} does not exist")
    _check_writable(directory, option, path)


def check_output_dir(path: str, option: str) -> None:
    """Before any work: ``path`` is, or can be made, a writable directory."""
    existing = Path(path).absolute()
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise CLIError(f"{option} {path}: {existing} exists and is not a directory")
    _check_writable(existing, option, path)


def count(low: int, high: Optional[int] = None):
    """An argument type: a whole number in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a whole number, got '{text}'") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        if high is not None and value > high:
            raise argparse.ArgumentTypeError(f"must be at most {high}, got {value}")
        return value

    return parse
