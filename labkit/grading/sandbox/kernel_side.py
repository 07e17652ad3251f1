"""The two ends of batch grading's exchange with a learner's kernel: `serve` runs there, `read_case` here.

The grader writes each case's inputs (pickled `(args, kwargs)`, built fresh by `Case.inputs()`) into the
submission's scratch directory and runs `serve(job_file, globals())` in the learner's kernel. `serve` calls
the learner's function (or layer class, via the exercise's `run`) on them under `safe_call`, and writes
back, per case, a JSON record and the output arrays as `.npy` files. Nothing the kernel writes is
unpickled by the grader: it reads JSON and `np.load(..., allow_pickle=False)` only, and it compares the
outputs with the references itself. Whatever the learner patched inside the kernel only changes what
their function returned.
"""

from __future__ import annotations

import builtins
import inspect
import json
import math
import os
import pickle
import re
from pathlib import Path
from typing import Any

import numpy as np

from labkit.grading.safe_call import CallResult, root_cause

MAX_ITEMS = 64  # elements of a returned tuple/list that are kept
MAX_DEPTH = 4
MAX_ARRAY_BYTES = 256 << 20  # larger outputs are reported as too large instead of loaded
_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")


# ------------------------------------------------------------------ kernel end

def _encode(value: Any, directory: Path, stem: str, counter: list[int], depth: int = 0) -> dict:
    """JSON description of `value`; arrays go to `<stem>_<n>.npy` files next to the record."""
    if value is None:
        return {"kind": "none"}
    if isinstance(value, bool):
        return {"kind": "bool", "value": value}
    if isinstance(value, int):
        return {"kind": "int", "value": value} if abs(value) < 2**63 else {"kind": "float", "value": float(value)}
    if isinstance(value, float):
        return {"kind": "float", "value": value if math.isfinite(value) else repr(value)}
    if isinstance(value, (tuple, list)) and depth < MAX_DEPTH and len(value) <= MAX_ITEMS:
        return {"kind": type(value).__name__,
                "items": [_encode(item, directory, stem, counter, depth + 1) for item in value]}
    module = type(value).__module__ or ""
    if isinstance(value, (np.ndarray, np.generic)) or module.startswith(("jax", "jaxlib")):
        try:
            array = np.asarray(value)
        except Exception:  # noqa: BLE001 - e.g. a tracer that escaped: describe it instead
            array = None
        if array is not None and (array.dtype.kind in "biufc"):
            index = counter[0]
            counter[0] += 1
            np.save(directory / f"{stem}_{index}.npy", array, allow_pickle=False)
            return {"kind": "scalar" if isinstance(value, np.generic) else "array", "file": index}
    return {"kind": "other", "type": type(value).__name__}


def _error_record(error: BaseException) -> dict:
    """What the grader needs to explain an exception: its type, message, and whether Trax wrapped it."""
    root = root_cause(error)
    record = {"type": type(root).__name__, "builtin": type(root).__module__ == "builtins",
              "message": str(root)[:2000], "layer": root is not error}
    if isinstance(root, SystemExit):
        record["code"] = repr(root.code)[:100]
    return record


def _write_json(path: Path, record: dict) -> None:
    """Write `record` to `path` atomically, so the grader never reads half a file."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(record), encoding="utf-8")
    os.replace(tmp, path)


def reap_children() -> int:
    """Collect the kernel's dead children (the grader killed them): each zombie still counts in the pids cgroup."""
    reaped = 0
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return reaped
        if pid == 0:
            return reaped
        reaped += 1


def serve(job_file: str, namespace: dict) -> None:
    """Run the learner's candidate named in `job_file` on every case's inputs; write one record per case."""
    from labkit.grading.check import mutated_argument, snapshot
    from labkit.grading.exercise import registry
    from labkit.grading.helping import is_fallback
    from labkit.grading.safe_call import safe_call

    job = json.loads(Path(job_file).read_text(encoding="utf-8"))
    out = Path(job["results"])
    candidate = namespace.get(job["name"])
    _write_json(out / "candidate.json", {
        "defined": job["name"] in namespace, "is_class": inspect.isclass(candidate),
        "callable": callable(candidate), "type": type(candidate).__name__, "fallback": is_fallback(candidate)})
    if not callable(candidate) or is_fallback(candidate):
        return
    run = registry()[job["exercise"]].run
    for index, request in enumerate(job["cases"]):
        with open(request, "rb") as handle:
            args, kwargs = pickle.load(handle)
        before = snapshot((args, kwargs))
        result = safe_call(lambda: run(candidate, args, kwargs), timeout=job["timeout"])
        record = {"timed_out": result.timed_out, "where": result.where,
                  "printed_chars": result.printed_chars, "printed_head": result.printed_head}
        if result.error is not None:
            record["error"] = _error_record(result.error)
        elif not result.timed_out:
            record["mutated"] = mutated_argument((args, kwargs), before)
            try:
                record["value"] = _encode(result.value, out, f"case{index}", [0])
            except Exception as err:  # noqa: BLE001 - a value numpy cannot save: describe it
                record["value"] = {"kind": "other", "type": f"{type(result.value).__name__} ({err!r:.100})"}
        _write_json(out / f"case{index}.json", record)
        if result.timed_out or isinstance(result.error, NotImplementedError):
            break  # as `check` does: a hang would hang again, a stub stays a stub


# ------------------------------------------------------------------ grader end

class RemoteError(Exception):
    """An exception raised in the learner's kernel, rebuilt by name (its class is not unpickled)."""


class _LayerError(Exception):
    """Stands for Trax's LayerError wrapping a learner's exception, so reports say "inside the Trax layer"."""


_LayerError.__name__ = "LayerError"
_BUILTIN_ERRORS = {name: obj for name, obj in vars(builtins).items()
                   if isinstance(obj, type) and issubclass(obj, BaseException)}


def _rebuild_error(record: dict) -> BaseException:
    name = str(record.get("type", "Exception"))
    message = str(record.get("message", ""))
    cls = _BUILTIN_ERRORS.get(name) if record.get("builtin") else None
    if cls is SystemExit:
        error: BaseException = SystemExit(record.get("code", ""))
    elif cls is not None:
        try:
            error = cls(message)
        except Exception:  # noqa: BLE001 - builtins with other constructors (UnicodeError, ...)
            error = RemoteError(message)
    else:
        error = type(name if _NAME.match(name) else "RemoteError", (RemoteError,), {})(message)
    if record.get("layer"):
        wrapper = _LayerError("error inside the layer")
        wrapper.__cause__ = error
        return wrapper
    return error


def _placeholder(type_name: str) -> Any:
    """An object whose type is called `type_name`: enough for the reports' "got a str" lines."""
    name = type_name if _NAME.match(type_name) else "object"
    return type(name, (), {"__repr__": lambda self: f"<{type_name}>"})()


def _decode(record: Any, directory: Path, stem: str) -> Any:
    if not isinstance(record, dict):
        raise ValueError("malformed value record")
    kind = record.get("kind")
    if kind == "none":
        return None
    if kind == "bool":
        return bool(record["value"])
    if kind == "int":
        return int(record["value"])
    if kind == "float":
        return float(record["value"])
    if kind in ("tuple", "list"):
        items = [_decode(item, directory, stem) for item in record["items"][:MAX_ITEMS]]
        return tuple(items) if kind == "tuple" else items
    if kind in ("array", "scalar"):
        path = directory / f"{stem}_{int(record['file'])}.npy"
        if not path.is_file() or path.is_symlink() or path.stat().st_size > MAX_ARRAY_BYTES:
            return _placeholder("missing or oversized array")
        array = np.load(path, allow_pickle=False)
        return array[()] if kind == "scalar" else array
    return _placeholder(str(record.get("type", "object")))


def read_candidate(directory: Path) -> dict | None:
    """The kernel's description of the learner's candidate, or None if the kernel wrote none."""
    try:
        record = json.loads((directory / "candidate.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return record if isinstance(record, dict) else None


def candidate_stand_in(record: dict) -> Any:
    """A local object with the candidate's kind (class / function / other type) for `candidate_problem`."""
    if record.get("is_class"):
        return type("LearnerClass", (), {})
    if record.get("callable"):
        return lambda *args, **kwargs: None
    return _placeholder(str(record.get("type", "object")))


def read_case(directory: Path, index: int) -> tuple[CallResult, int | None] | None:
    """`(CallResult, mutated argument index)` of case `index` as the kernel reported it; None if absent."""
    try:
        record = json.loads((directory / f"case{index}.json").read_text(encoding="utf-8"))
        if not isinstance(record, dict):
            raise ValueError("not a record")
        result = CallResult(timed_out=bool(record.get("timed_out")), where=str(record.get("where", ""))[:500],
                            printed_chars=int(record.get("printed_chars", 0)),
                            printed_head=str(record.get("printed_head", ""))[:2000])
        if "error" in record:
            result.error = _rebuild_error(record["error"])
        elif not result.timed_out:
            result.value = _decode(record.get("value"), directory, f"case{index}")
        mutated = record.get("mutated")
        return result, (int(mutated) if isinstance(mutated, int) and not isinstance(mutated, bool) else None)
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as err:
        return CallResult(error=RemoteError(f"the kernel's answer could not be read: {err}")), None
