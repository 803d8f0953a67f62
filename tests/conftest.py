import os
import sys

# Idle OpenMP threads sleep instead of spinning: on a shared 2-core CPU spinning made every forward
# pass ~10x slower (libgomp reads this when torch loads, so it must be set before the import).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests import innsteer from the checkout (works with or without `pip install -e .`).
for path in (os.path.join(ROOT, "python"), ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)


import pytest  # noqa: E402  (after the sys.path setup above)


@pytest.fixture(scope="session")
def default_lm():
    """The real default model (SmolLM2-135M-Instruct), loaded once per session (~1 s from the cache)."""
    from innsteer.hf.models import load_model

    return load_model()
