"""`check(exercise_id, candidate)`: grade a learner's function against labkit's reference, case by case."""

from __future__ import annotations

import inspect
from typing import Any

import jax
import numpy as np

from labkit.grading.compare import compare, same_output
from labkit.grading.exercise import Case, Exercise, registry
from labkit.grading.explain import explain
from labkit.grading.report import CaseResult, Report
from labkit.grading.safe_call import CallResult, root_cause, safe_call


def snapshot(tree: Any) -> list[np.ndarray | None]:
    """Copies of the numpy arrays among `tree`'s leaves (None for other leaves), to detect in-place changes."""
    return [np.array(leaf, copy=True) if isinstance(leaf, np.ndarray) else None
            for leaf in jax.tree_util.tree_leaves(tree)]


def mutated_argument(tree: Any, before: list[np.ndarray | None]) -> int | None:
    """Index of the first numpy input that changed in place, if any."""
    for i, (leaf, old) in enumerate(zip(jax.tree_util.tree_leaves(tree), before)):
        if old is not None and not np.array_equal(np.asarray(leaf), old, equal_nan=True):
            return i
    return None


def _printed_note(result: CallResult) -> list[str]:
    if not result.printed_chars:
        return []
    first = result.printed_head.strip().splitlines()[0][:80] if result.printed_head.strip() else ""
    return [f"(it printed {result.printed_chars:,} characters; first line: {first!r})"]


def _error_result(name: str, result: CallResult, exercise: Exercise) -> CaseResult:
    err = result.error
    if isinstance(err, NotImplementedError):
        return CaseResult(name, "todo", ["not implemented yet"])
    if isinstance(err, SystemExit):
        lines = [f"called sys.exit({err.code!r}) instead of returning a result"]
        return CaseResult(name, "error", lines + _printed_note(result), "return the value; never exit the kernel")
    root = root_cause(err)
    inside = " inside the Trax layer" if root is not err else ""
    raw = f"{type(root).__name__}: {str(root).strip()}"
    meaning = explain(root)
    if meaning:
        lines = [f"your code raised an error{inside}: {meaning}", f"(details: {raw[:200]})"]
    else:
        lines = [f"raised {raw[:300]}{' (' + inside.strip() + ')' if inside else ''}"]
    if result.where:
        lines.append(f"at {result.where}")
    return CaseResult(name, "error", lines + _printed_note(result), exercise.default_hint)


# Outputs of labkit's own code (the reference, the registered mistakes) per case: they are deterministic,
# so a learner's second check, and every mistake lookup after the first, costs no recomputation.
_KNOWN_OUTPUTS: dict[tuple[str, int, str], CallResult] = {}


class Grader:
    """Grades one candidate on one exercise; recognises registered mistakes for hints."""

    def __init__(self, exercise: Exercise, candidate: Any, timeout: float):
        self.exercise, self.candidate, self.timeout = exercise, candidate, timeout

    def _known_output(self, case: Case, label: str, candidate: Any) -> CallResult:
        index = next(i for i, c in enumerate(self.exercise.cases) if c is case)
        key = (self.exercise.id, index, label)
        if key not in _KNOWN_OUTPUTS:
            args, kwargs = case.inputs()
            _KNOWN_OUTPUTS[key] = safe_call(lambda: self.exercise.run(candidate, args, kwargs), timeout=self.timeout)
        return _KNOWN_OUTPUTS[key]

    def expected(self, case: Case) -> Any:
        result = self._known_output(case, "reference", self.exercise.reference)
        if not result.ok:
            raise RuntimeError(f"the reference failed: {result.error!r}" if result.error else "the reference hung")
        return result.value

    def recognise(self, case: Case, got: Any, expected: Any) -> tuple[str, str]:
        """`(mistake name, hint)` of the registered mistake whose output equals `got`, else blanks.

        A mistake that gives the right answer on this case says nothing about it, so it is not considered.
        """
        for mistake in self.exercise.mistakes:
            wrong = self._known_output(case, f"mistake {mistake.name}", mistake.candidate)
            if (wrong.ok and same_output(got, wrong.value, atol=case.atol, rtol=case.rtol)
                    and compare(expected, wrong.value, atol=case.atol, rtol=case.rtol) is not None):
                return mistake.name, mistake.hint
        return "", ""

    def call(self, case: Case) -> tuple[CallResult, int | None]:
        """Run the candidate on fresh inputs: `(result, index of an input it changed in place or None)`."""
        args, kwargs = case.inputs()
        before = snapshot((args, kwargs))
        result = safe_call(lambda: self.exercise.run(self.candidate, args, kwargs), timeout=self.timeout)
        return result, (mutated_argument((args, kwargs), before) if result.ok else None)

    def grade_case(self, case: Case) -> CaseResult:
        try:
            expected = self.expected(case)
        except Exception as err:  # noqa: BLE001 - a grader bug must still not escape check()
            return CaseResult(case.name, "error", [f"grader error computing the expected value: {err!r}"],
                              "this is a bug in labkit, not in your code: please report it", case.hidden)
        result, changed = self.call(case)
        if result.timed_out:
            return CaseResult(case.name, "timeout", [f"stopped after {self.timeout:g} s without returning"]
                              + _printed_note(result), "look for a loop that never ends or work that grows too fast",
                              case.hidden)
        if result.error is not None:
            res = _error_result(case.name, result, self.exercise)
            res.hidden = case.hidden
            return res
        if changed is not None:
            return CaseResult(case.name, "fail", [f"it changed input argument #{changed + 1} in place"],
                              "work on copies (or jnp arrays) instead of writing into the inputs", case.hidden)
        mismatch = compare(expected, result.value, atol=case.atol, rtol=case.rtol)
        if mismatch is None:
            return CaseResult(case.name, "ok", _printed_note(result), hidden=case.hidden)
        name, hint = self.recognise(case, result.value, expected)
        if not hint:
            hint = self.exercise.nan_hint if mismatch.kind == "nan" else self.exercise.default_hint
        return CaseResult(case.name, "fail", mismatch.lines + _printed_note(result), hint, case.hidden, name)

    def grade(self, cases: list[Case]) -> list[CaseResult]:
        results: list[CaseResult] = []
        for i, case in enumerate(cases):
            res = self.grade_case(case)
            results.append(res)
            if res.status in ("todo", "timeout"):
                # A stub stays a stub and a hang would hang again: don't make the learner wait.
                status = "todo" if res.status == "todo" else "skipped"
                line = "not implemented yet" if status == "todo" else "skipped after the time-out above"
                results += [CaseResult(c.name, status, [line], hidden=c.hidden) for c in cases[i + 1:]]
                break
        return results


def candidate_problem(exercise: Exercise, candidate: Any) -> str:
    """Why `candidate` cannot be graded on `exercise` at all (not a function / not a class), or ""."""
    if exercise.expects_class:
        if not inspect.isclass(candidate):
            return f"expected a class (a subclass of the Trax layer), got {type(candidate).__name__}"
    elif not callable(candidate):
        return f"expected a function, got {type(candidate).__name__}"
    return ""


# The candidates that passed each exercise in this session (kept alive, so an id is never reused).
_PASSED: dict[str, list[Any]] = {}


def has_passed(exercise_id: str, candidate: Any) -> bool:
    """True when this very object passed `check(exercise_id, ...)` earlier in this session."""
    return any(candidate is seen for seen in _PASSED.get(exercise_id, ()))


def check(exercise_id: str, candidate: Any, *, timeout: float | None = None, include_hidden: bool = False) -> Report:
    """Grade `candidate` on exercise `exercise_id` (see `labkit.exercises()`); never raises.

    Args:
      exercise_id: e.g. "lab01.attention".
      candidate: the learner's function (or class, for layer exercises).
      timeout: seconds allowed per case (default: the exercise's own limit).
      include_hidden: also run the hidden cases instructors grade with.
    """
    try:
        exercises = registry()
    except Exception as err:  # noqa: BLE001
        return Report(exercise_id, "", 0, [], note=f"could not load the exercises: {err!r}")
    exercise = exercises.get(exercise_id)
    if exercise is None:
        return Report(exercise_id, "", 0, [], note=f"unknown exercise {exercise_id!r}; known: {', '.join(exercises)}")
    cases = [c for c in exercise.cases if include_hidden or not c.hidden]
    problem = candidate_problem(exercise, candidate)
    if problem:
        return Report(exercise.id, exercise.description, exercise.points,
                      [CaseResult(c.name, "error", ["not run"], hidden=c.hidden) for c in cases], note=problem)
    grader = Grader(exercise, candidate, timeout if timeout is not None else exercise.timeout)
    report = Report(exercise.id, exercise.description, exercise.points, grader.grade(cases))
    if report.passed and not has_passed(exercise.id, candidate):
        _PASSED.setdefault(exercise.id, []).append(candidate)
    return report
