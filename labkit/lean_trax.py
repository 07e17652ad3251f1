"""`import trax` without loading all of Trax: its submodules load when first used.

Trax 1.4.1's `trax/__init__.py` imports `trax.data`, `trax.models` and `trax.supervised` (and through them
TensorFlow Datasets, gym and every research model) before a lab can touch `trax.layers`: about half of
Trax's import time, in every kernel, test process and graded submission. labkit's import hook
(`labkit._quiet`) loads the `trax` package with `load_package` instead of that file: the package and its
submodules are Trax's own, unchanged; only the eager imports are deferred. Every name the original file
defines is still there (`trax.data`, `trax.lr`, `trax.AsKeras`, ...), imported on first access.
"""

from __future__ import annotations

import importlib
import types

# The names trax/__init__.py binds: attribute -> (module, attribute in it, or None for the module itself).
TOP_LEVEL = {
    "data": ("trax.data", None),
    "fastmath": ("trax.fastmath", None),
    "layers": ("trax.layers", None),
    "models": ("trax.models", None),
    "optimizers": ("trax.optimizers", None),
    "shapes": ("trax.shapes", None),
    "supervised": ("trax.supervised", None),
    "lr": ("trax.supervised.lr_schedules", None),
    "AsKeras": ("trax.trax2keras", "AsKeras"),
}


def _getattr(name: str):
    """Module `__getattr__` for the lean package: import what trax/__init__.py would have bound."""
    if name not in TOP_LEVEL:
        raise AttributeError(f"module 'trax' has no attribute {name!r}")
    module_name, attribute = TOP_LEVEL[name]
    value = importlib.import_module(module_name)
    return getattr(value, attribute) if attribute else value


def load_package(module: types.ModuleType) -> None:
    """Fill the freshly created `trax` package module: lazy names instead of trax/__init__.py's imports."""
    module.__doc__ = "Trax top level import (labkit: submodules load on first use)."
    module.__getattr__ = _getattr
    module.__dir__ = lambda: sorted(set(module.__dict__) | set(TOP_LEVEL))


class LeanLoader:
    """Loader for the `trax` package that runs `load_package` instead of trax/__init__.py."""

    def __init__(self, inner):
        self._inner = inner

    def create_module(self, spec):
        return self._inner.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        load_package(module)
