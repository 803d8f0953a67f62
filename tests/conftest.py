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


# --- test tiers -------------------------------------------------------------------------------------
# The fast tier (the default) runs every unit on tiny random models and small tensors. The slow tier
# is what needs the real default model (the `default_lm` fixture), llama.cpp running it, or a
# compiler build (nvcc, AddressSanitizer): `--runslow` runs both tiers, `-m slow` the slow one alone.
SLOW_FIXTURES = {"default_lm"}


def pytest_addoption(parser):
    parser.addoption(
        "--runslow",
        action="store_true",
        default=False,
        help="also run the slow tier (the real default model, llama.cpp on it, nvcc and AddressSanitizer builds)",
    )


def pytest_collection_modifyitems(config, items):
    for item in items:
        if SLOW_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
    if config.getoption("--runslow") or config.getoption("markexpr"):
        return  # both tiers, or a marker expression that decides itself
    skip = pytest.mark.skip(reason="slow tier: run with --runslow (both tiers) or -m slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)
