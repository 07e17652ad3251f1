"""Say in the learner's terms what a raw JAX or Trax error means, and check what a layer method returned.

Errors raised deep inside `vmap`, `jit` or a Trax layer describe JAX's internals ("out_axes specification
must be a tree prefix"); the learner needs to hear what their own code did. `explain` maps the common
ones to a sentence; the raw message stays available, folded, under it.
"""

from __future__ import annotations

import re
from typing import Any

# (pattern in the raw message, what it means for the learner's code). First match wins.
_EXPLANATIONS: tuple[tuple[str, str], ...] = (
    (r"out_axes specification must be a tree prefix|too many values to unpack|not enough values to unpack"
     r"|cannot unpack non-iterable",
     "forward_unbatched must return a pair (output, state): the head's output [seq, d_model] and the state "
     "it was given"),
    (r"Abstract tracer value encountered where concrete value is expected|TracerBoolConversionError"
     r"|ConcretizationTypeError|TracerIntegerConversionError",
     "your code uses an array's value in Python control flow (an `if`, `while`, `int(...)` or `range(...)` "
     "on an array) inside a traced function; use the array's shape, or jnp.where / lax.cond"),
    (r"NonConcreteBooleanIndexError|Array boolean indices must be concrete",
     "boolean indexing (x[mask]) makes an array whose size depends on the data, which jit and vmap cannot "
     "trace; keep the shape and use jnp.where(mask, x, other)"),
    (r"dot_general requires contracting dimensions to have the same shape|matmul.*(size|shape)"
     r"|Incompatible shapes for broadcasting|incompatible shapes|shapes .* are not compatible",
     "two arrays' shapes do not fit together in a product or an elementwise operation: print the shapes "
     "of your intermediate arrays and check which axis each one sums over (is a transpose missing?)"),
    (r"UnexpectedTracerError",
     "a traced value escaped its function (stored in a global or on self and used later); pass values "
     "through arguments and return values instead"),
)


def explain(error: BaseException) -> str:
    """A sentence saying what `error` means for the learner's code, or "" when the raw message is clearest."""
    if isinstance(error, ReturnShapeError):
        return ""  # already in the learner's terms
    message = f"{type(error).__name__}: {error}"
    for pattern, meaning in _EXPLANATIONS:
        if re.search(pattern, message):
            return meaning
    return ""


def describe(value: Any) -> str:
    """A short description of a returned value: "one array of shape (4, 8)", "a tuple of 3 items", ..."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"one array of shape {tuple(value.shape)}"
    if isinstance(value, (tuple, list)):
        items = ", ".join(describe(item) for item in value[:3]) + (", ..." if len(value) > 3 else "")
        return f"a {type(value).__name__} of {len(value)} items ({items})"
    return f"a {type(value).__name__}"


class ReturnShapeError(TypeError):
    """A learner's layer method returned something of the wrong structure."""


def guard_forward_unbatched(layer: Any) -> Any:
    """Wrap `layer.forward_unbatched` so a wrong return structure fails with a plain-words error; return layer."""
    original = layer.forward_unbatched

    def checked(*args, **kwargs):
        out = original(*args, **kwargs)
        if not (isinstance(out, tuple) and len(out) == 2 and hasattr(out[0], "shape")):
            raise ReturnShapeError(f"forward_unbatched must return a pair (output, state); it returned "
                                   f"{describe(out)}")
        return out

    object.__setattr__(layer, "forward_unbatched", checked)  # Trax's own __setattr__ refuses public names
    return layer
