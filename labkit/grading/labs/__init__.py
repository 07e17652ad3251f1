"""One module per lab (`lab01.py`, `lab02.py`, ...), each registering its exercises on import."""

from __future__ import annotations

import importlib
import pkgutil


def load_all() -> None:
    """Import every `labNN` module in this package so its exercises are registered."""
    for info in pkgutil.iter_modules(__path__):
        if info.name.startswith("lab"):
            importlib.import_module(f"{__name__}.{info.name}")
