"""labkit: reference attentions, Trax layers, graders, benchmarks and release tooling for the labs.

Importing labkit first silences the start-up noise of TensorFlow, absl and gym (which Trax imports),
so a learner's first cell stays clean.
"""

from labkit import _quiet

_quiet.install()

from labkit.grading import check, exercises, hint, use  # noqa: E402 - after silencing, on purpose

__version__ = "0.1.0"
__all__ = ["check", "exercises", "hint", "use", "__version__"]
