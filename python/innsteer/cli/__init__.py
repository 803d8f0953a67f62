"""The ``innsteer`` command line (the top layer: it may use every other)."""

from .main import main

__all__ = ["main"]
