"""Finished stages of a long measurement, kept on disk so that a rerun resumes where it stopped.

``innsteer tune`` keeps each validation and test stage; ``innsteer eval`` each method's curve per
seed, and each fitted steerer. A stage is a JSON file ``<dir>/<name>.json`` holding its result and
the fingerprint of what it depends on (model, data, settings); a rerun reads it only where the
fingerprint is the same, so other settings measure again. A steerer is a steer file whose name
carries its fingerprint's digest. Written atomically: an interrupted write leaves no stage.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

from ..core.errors import SteerFileError
from ..core.files import write_atomically
from ..core.steerers import SteererBase, load_steerer


def digest(values: Sequence) -> str:
    """A short stable digest of ``values`` (their repr: items, prompts, option sets)."""
    return hashlib.sha256(repr(list(values)).encode()).hexdigest()[:16]


class Stages:
    """The stages under ``directory`` (None: nothing kept, every stage measured)."""

    def __init__(self, directory: Optional[Path], fingerprint: dict):
        self.dir = None if directory is None else Path(directory)
        self.fingerprint = json.loads(json.dumps(fingerprint))  # as it reads back (tuples become lists)

    def run(self, name: str, measure: Callable[[], dict]) -> dict:
        """The stage's stored result where it matches, else ``measure()``'s, stored."""
        path = None if self.dir is None else self.dir / f"{name}.json"
        if path is not None and path.is_file():
            try:
                stored = json.loads(path.read_text())
            except (ValueError, UnicodeDecodeError):  # not a stage this code wrote: measured again
                stored = None
            if isinstance(stored, dict) and stored.get("fingerprint") == self.fingerprint and "result" in stored:
                return stored["result"]
        result = measure()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_atomically(path, json.dumps({"fingerprint": self.fingerprint, "result": result}))
        return result

    def steerer(self, name: str, fit: Callable[[], SteererBase]) -> SteererBase:
        """The steerer kept as ``<dir>/<name>-<fingerprint digest>.safetensors`` where one is, else
        ``fit()``'s, kept: a rerun that measures a curve again need not train its steerer again."""
        if self.dir is None:
            return fit()
        path = self.dir / f"{name}-{digest([self.fingerprint])}.safetensors"
        if path.is_file():
            try:
                return load_steerer(path)
            except SteerFileError:  # not a file this code wrote: fitted again, replaced
                pass
        steerer = fit()
        path.parent.mkdir(parents=True, exist_ok=True)
        steerer.save(path)
        return steerer
