"""Writing a file whole or not at all: every file innsteer writes for a user or a later run (steer
files, stage results, reports, tune records) goes through :func:`write_atomically`, so a kill or a
full disk mid-write never leaves a half file under the real name for the next run to read."""

from __future__ import annotations

import contextlib
import os


def write_atomically(path: str | os.PathLike, data: bytes | str) -> None:
    """Write data (str: UTF-8) to path through ``.<name>.partial`` beside it, fsynced, then renamed
    over path: a kill mid-write leaves the old file intact and at most one orphan, which the next
    save of that path replaces. The file is created afresh, so it gets the usual 0666 & ~umask
    permissions. One writer per path: concurrent writers of one path need names of their own."""
    if isinstance(data, str):
        data = data.encode()
    directory, name = os.path.split(os.path.abspath(path))
    partial = os.path.join(directory, f".{name}.partial")
    with contextlib.suppress(FileNotFoundError):
        os.unlink(partial)  # an orphan of a killed save (a fresh file, never an old one's mode or link)
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(partial, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(partial)
        raise
