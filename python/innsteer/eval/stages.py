"""Finished stages of a long measurement, kept on disk so that a rerun resumes where it stopped.

``innsteer tune`` keeps each validation and test stage; ``innsteer eval`` each method's curve per
seed, and each fitted steerer. A stage is a JSON file ``<dir>/<name>.json`` holding its result and
the fingerprint of what it depends on (model, data, settings); a rerun reads it only where the
fingerprint is the same, so other settings measure again. A steerer is a steer file whose name
carries its fingerprint's digest. Written atomically: an interrupted write leaves no stage.

A stage also records the code that measured it (the checkout's commit, else the installed
version; a kept fit in its metadata 'extra', taken out again when it is read). The fingerprint
holds inputs only, so a rerun after the code changed still reads it (resuming an hours-long run
across a commit that changed no number is the common case); the first time a directory yields a
stage of other code, one line on stderr says so and how to measure afresh.
"""

from __future__ import annotations

import copy
import functools
import hashlib
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Optional

from ..core.errors import SteerFileError
from ..core.files import write_atomically
from ..core.steerers import SteererBase, load_steerer
from .provenance import git_commit

_FIT_CODE = "stage_code"  # the key of a kept fit's metadata 'extra' that holds the code that fitted it
_NOTED: set[Path] = set()  # the directories whose stages of other code were already reported


@functools.cache
def code_version() -> str:
    """What measures a stage now: the checkout's commit (with +dirty), else the installed version."""
    from .. import __version__

    return git_commit() or f"innsteer {__version__}"


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
                self._note_code(stored.get("code"))
                return stored["result"]
        result = measure()
        if path is not None:
            path.parent.mkdir(parents=True, exist_ok=True)
            stage = {"fingerprint": self.fingerprint, "code": code_version(), "result": result}
            write_atomically(path, json.dumps(stage))
        return result

    def _note_code(self, code: Optional[str]) -> None:
        if code == code_version() or self.dir in _NOTED:
            return
        _NOTED.add(self.dir)
        written = f"code {code}" if code else "code that did not record itself"
        print(
            f"innsteer: reusing stages in {self.dir} measured by {written} (this is {code_version()}); "
            f"delete {self.dir} to measure them again with this code",
            file=sys.stderr,
        )

    def steerer(self, name: str, fit: Callable[[], SteererBase]) -> SteererBase:
        """The steerer kept as ``<dir>/<name>-<fingerprint digest>.safetensors`` where one is, else
        ``fit()``'s, kept: a rerun that measures a curve again need not train its steerer again."""
        if self.dir is None:
            return fit()
        path = self.dir / f"{name}-{digest([self.fingerprint])}.safetensors"
        if path.is_file():
            try:
                steerer = load_steerer(path)
            except SteerFileError:  # not a file this code wrote: fitted again, replaced
                pass
            else:
                self._note_code(steerer.extra.pop(_FIT_CODE, None))
                return steerer
        steerer = fit()
        path.parent.mkdir(parents=True, exist_ok=True)
        kept = copy.copy(steerer)  # the code goes in the kept file only, not in the steerer returned
        kept.extra = {**steerer.extra, _FIT_CODE: code_version()}
        kept.save(path)
        return steerer
