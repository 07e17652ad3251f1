"""labkit: reference attentions, Trax layers, graders, benchmarks and release tooling for the labs.

Importing labkit first silences the start-up noise of TensorFlow, absl and gym (which Trax imports),
so a learner's first cell stays clean. It imports nothing heavy itself: `check`, `exercises`, `hint` and
`use` load the graders (and JAX) on first use, so `python -m labkit release` needs no ML stack.
"""

from labkit import _quiet

_quiet.install()

__version__ = "0.1.0"
__all__ = ["check", "exercises", "hint", "use", "__version__"]
_GRADING = {"check", "exercises", "hint", "use"}


def __getattr__(name: str):
    """`labkit.check` and friends, imported from `labkit.grading` when first asked for."""
    if name in _GRADING:
        from labkit import grading

        return getattr(grading, name)
    raise AttributeError(f"module 'labkit' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | _GRADING)
