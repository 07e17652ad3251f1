"""`python -m labkit doctor`: is this environment ready for the labs?

Prints the versions of Python and the pinned stack, the JAX backend and its devices, then runs a tiny
`trax.layers.SelfAttention` forward pass and the same pass through `labkit.layers.DotProductSelfAttention`
with the same weights. Exits 0 when everything works, 1 with a one-line message naming what failed.
"""

from __future__ import annotations

import argparse
import importlib
import platform
import sys
from collections.abc import Callable
from importlib import metadata
from typing import TypeVar

import labkit  # noqa: F401 - first: importing labkit silences TensorFlow / gym start-up noise

PACKAGES = ("numpy", "jax", "jaxlib", "tensorflow", "trax")
TOLERANCE = 1e-5
T = TypeVar("T")


class DoctorFailure(Exception):
    """A check failed; the message is the one line the user sees."""


def _attempt(what: str, action: Callable[[], T]) -> T:
    """Run `action`; turn any exception into a DoctorFailure whose message starts with `what`."""
    try:
        return action()
    except Exception as error:  # the doctor reports every kind of breakage the same way
        first_line = (str(error).strip().splitlines() or [""])[0]
        raise DoctorFailure(f"{what}: {type(error).__name__}: {first_line}") from error


def package_version(name: str) -> str:
    """Import package `name` and return its version (its `__version__`, else the installed distribution's)."""
    module = _attempt(f"cannot import {name}", lambda: importlib.import_module(name))
    return getattr(module, "__version__", None) or metadata.version(name)


def attention_difference() -> float:
    """Max |difference| between `tl.SelfAttention` and labkit's `DotProductSelfAttention` on a tiny input."""
    import jax
    import jax.numpy as jnp
    import trax.shapes
    from trax import layers as tl

    x = jax.random.normal(jax.random.PRNGKey(0), (1, 8, 16))

    def trax_forward():
        layer = tl.SelfAttention(n_heads=2, d_qk=4, d_v=4, mode="eval")
        layer.init(trax.shapes.signature(x), rng=jax.random.PRNGKey(1))
        return layer, layer(x)

    reference, expected = _attempt("trax SelfAttention forward pass failed", trax_forward)

    def labkit_forward():
        from labkit.layers import DotProductSelfAttention

        layer = DotProductSelfAttention(n_heads=2, d_qk=4, d_v=4, mode="eval")
        layer.init(trax.shapes.signature(x), rng=jax.random.PRNGKey(2))
        layer.weights = reference.weights
        return layer(x)

    got = _attempt("labkit DotProductSelfAttention forward pass failed", labkit_forward)
    return float(jnp.max(jnp.abs(got - expected)))


def run_checks(report: Callable[[str], None] = print) -> None:
    """Report versions, backend and the attention comparison; raise DoctorFailure on the first problem."""
    report(f"python {platform.python_version()} ({sys.executable})")
    for name in PACKAGES:
        report(f"{name} {package_version(name)}")
    import jax

    devices = _attempt("JAX has no usable backend", jax.devices)
    report(f"jax backend {jax.default_backend()}: {', '.join(map(str, devices))}")
    difference = attention_difference()
    report(f"SelfAttention forward: trax vs labkit max |difference| = {difference:.2e}")
    if not difference <= TOLERANCE:  # also catches NaN
        raise DoctorFailure(
            f"labkit DotProductSelfAttention differs from trax SelfAttention by {difference:.2e} > {TOLERANCE:g}")


def main(argv: list[str] | None = None) -> int:
    """Run the checks; exit 0 if all pass, 1 with a one-line message on stderr naming what failed."""
    argparse.ArgumentParser(prog="python -m labkit doctor", description=__doc__.splitlines()[0]).parse_args(argv)
    try:
        run_checks()
    except DoctorFailure as failure:
        print(f"doctor: FAILED: {failure}", file=sys.stderr)
        return 1
    print("doctor: all checks passed")
    return 0
