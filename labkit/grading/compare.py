"""Compare a learner's output with the expected one: type, then shape and dtype, then values."""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import numpy as np

_ROW_SHOWN = 8


@dataclasses.dataclass
class Mismatch:
    """Why an output is wrong: `kind` is type, structure, shape, dtype, nan or values."""

    kind: str
    lines: list[str]


def _is_array(x: Any) -> bool:
    return isinstance(x, (np.ndarray, np.generic, jax.Array))


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.generic)) and not isinstance(x, bool)


def _leaves(x: Any) -> list[tuple[str, Any]]:
    """Flatten tuples/lists of arrays into `(label, leaf)` pairs: "output", "output[0]", ..."""
    if isinstance(x, (tuple, list)) and not _is_array(x):
        return [(f"output[{i}]{label[6:]}", leaf) for i, item in enumerate(x) for label, leaf in _leaves(item)]
    return [("output", x)]


def _fmt_row(row: np.ndarray) -> str:
    shown = np.array2string(np.asarray(row[:_ROW_SHOWN]), precision=3, suppress_small=True, max_line_width=200)
    return shown[:-1] + " ...]" if row.shape[0] > _ROW_SHOWN else shown


def _type_problem(label: str, expected: np.ndarray, got: Any) -> Mismatch | None:
    if got is None:
        return Mismatch("type", [f"{label}: got None; expected an array of shape {expected.shape}",
                                 "did the function forget to `return` its result?"])
    if expected.ndim == 0 and not (_is_array(got) or _is_number(got)):
        return Mismatch("type", [f"{label}: got a {type(got).__name__}; expected a number"])
    if expected.ndim == 0 and np.issubdtype(expected.dtype, np.integer):
        return _whole_number_problem(label, got)
    if expected.ndim > 0 and not _is_array(got):
        return Mismatch("type", [f"{label}: got a {type(got).__name__}; expected an array of shape {expected.shape}",
                                 "wrap the result with jnp.asarray(...)"])
    got = np.asarray(got)
    if got.shape != expected.shape:
        return Mismatch("shape", [f"{label}: shape {got.shape}, expected {expected.shape}"])
    if got.dtype != expected.dtype:
        return Mismatch("dtype", [f"{label}: {_kind(got.dtype)}, expected {_kind(expected.dtype)}"])
    return None


def _kind(dtype: np.dtype) -> str:
    """A dtype in words: "a boolean array (True = keep)" or "dtype float64"."""
    if dtype == bool:
        return "a boolean array (True = keep)"
    return f"dtype {dtype}"


def _whole_number_problem(label: str, got: Any) -> Mismatch | None:
    """An answer that should be a whole number: any integer type will do; a float or array will not."""
    value = np.asarray(got)
    if value.ndim != 0:
        return Mismatch("shape", [f"{label}: got an array of shape {value.shape}; expected one whole number"])
    if not np.issubdtype(value.dtype, np.integer):
        return Mismatch("type", [f"{label}: got {value.item()!r} ({value.dtype}); expected a whole number "
                                 "(an int): count with integer arithmetic"])
    return None


def _value_problem(label: str, expected: np.ndarray, got: np.ndarray, atol: float, rtol: float) -> Mismatch | None:
    if expected.dtype == bool or np.issubdtype(expected.dtype, np.integer):
        wrong = got != expected
    else:
        bad = ~np.isfinite(got) & np.isfinite(expected)
        if bad.any():
            first = tuple(int(i) for i in np.argwhere(bad)[0])
            what = "NaN" if np.isnan(got[bad]).any() else "inf"
            return Mismatch("nan", [f"{label}: got {what} at {int(bad.sum())} of {got.size} positions (first at {first})"])
        wrong = ~np.isclose(got, expected, atol=atol, rtol=rtol, equal_nan=True)
    if not wrong.any():
        return None
    err = np.abs(got.astype(np.float64) - expected.astype(np.float64))
    err = np.where(wrong, np.nan_to_num(err, nan=np.inf), 0)
    where = np.unravel_index(int(np.argmax(err)), err.shape)
    lines = [f"{label}: values differ at {int(wrong.sum())} of {got.size} positions; "
             f"max |got - expected| = {float(err[where]):.3g} at {tuple(int(i) for i in where)}"]
    if got.ndim >= 1:
        row_index = where[:-1]
        name = f"row {tuple(int(i) for i in row_index)}" if len(row_index) > 1 else (
            f"row {int(row_index[0])}" if row_index else "values")
        lines += [f"expected {name}: {_fmt_row(expected[row_index])}", f"got      {name}: {_fmt_row(got[row_index])}"]
    return Mismatch("values", lines)


def compare(expected: Any, got: Any, *, atol: float, rtol: float) -> Mismatch | None:
    """Return None when `got` matches `expected` (arrays or tuples of arrays), else what is wrong."""
    exp_leaves = _leaves(expected)
    if len(exp_leaves) > 1:
        if not isinstance(got, (tuple, list)) or len(_leaves(got)) != len(exp_leaves):
            shape = f"a {type(got).__name__}" if not _is_array(got) else f"one array of shape {np.shape(got)}"
            return Mismatch("structure", [f"expected a tuple of {len(exp_leaves)} arrays, got {shape}"])
    got_leaves = _leaves(got) if len(exp_leaves) > 1 else [("output", got)]
    for (label, exp), (_, out) in zip(exp_leaves, got_leaves):
        exp = np.asarray(exp)
        problem = _type_problem(label, exp, out) or _value_problem(label, exp, np.asarray(out), atol, rtol)
        if problem:
            return problem
    return None


def same_output(a: Any, b: Any, *, atol: float, rtol: float) -> bool:
    """True when two outputs agree (NaN where the other has NaN counts as agreeing)."""
    try:
        la, lb = _leaves(a), _leaves(b)
        if len(la) != len(lb):
            return False
        for (_, x), (_, y) in zip(la, lb):
            if not all(_is_array(v) or _is_number(v) for v in (x, y)):
                return False
            x, y = np.asarray(x), np.asarray(y)
            if x.shape != y.shape:
                return False
            if x.dtype == bool or y.dtype == bool or np.issubdtype(x.dtype, np.integer):
                if not np.array_equal(x, y):
                    return False
            elif not np.allclose(x.astype(np.float64), y.astype(np.float64), atol=atol, rtol=rtol, equal_nan=True):
                return False
        return True
    except (TypeError, ValueError):
        return False
