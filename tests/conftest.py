import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Tests import innsteer from the checkout (works with or without `pip install -e .`).
for path in (os.path.join(ROOT, "python"), ROOT, os.path.join(ROOT, "tests")):
    if path not in sys.path:
        sys.path.insert(0, path)
