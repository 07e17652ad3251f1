"""Help for a learner who is stuck: `use` keeps later cells running, `hint` gives graduated help.

`use("lab01.attention", attention)` returns the learner's own function once it passes its check, and
otherwise labkit's reference, with one line saying so. The fallback is marked, so that batch grading
never mistakes it for the learner's work (`is_fallback`).
"""

from __future__ import annotations

import dataclasses
import functools
import html
import inspect
from typing import Any

from labkit.grading.check import check, has_passed
from labkit.grading.exercise import Exercise, registry

FALLBACK_MARK = "__labkit_fallback_for__"


def is_fallback(thing: Any) -> bool:
    """True for an object `use` handed out in place of the learner's own (set on it, not inherited)."""
    return FALLBACK_MARK in getattr(thing, "__dict__", {})


def _marked(thing: Any, exercise_id: str) -> Any:
    """A marked copy of the reference: a subclass for classes, a thin wrapper for functions."""
    if inspect.isclass(thing):
        return type(thing.__name__, (thing,), {FALLBACK_MARK: exercise_id, "__doc__": thing.__doc__})

    @functools.wraps(thing)
    def reference(*args, **kwargs):
        return thing(*args, **kwargs)

    setattr(reference, FALLBACK_MARK, exercise_id)
    return reference


@functools.lru_cache(maxsize=None)
def _fallback(exercise_id: str) -> Any:
    exercise = registry()[exercise_id]
    return _marked(exercise.fallback() if exercise.fallback else exercise.reference, exercise_id)


def use(exercise_id: str, candidate: Any) -> Any:
    """The learner's `candidate` if it passes `exercise_id`, else labkit's reference (printing one line).

    Later cells of a lab call this instead of using an exercise's function directly, so a learner
    stuck on one exercise still runs the rest of the lab.
    """
    exercises = registry()
    if exercise_id not in exercises:
        raise KeyError(f"unknown exercise {exercise_id!r}; known: {', '.join(exercises)}")
    if has_passed(exercise_id, candidate) or (candidate is not None and check(exercise_id, candidate).passed):
        return candidate
    name = getattr(candidate, "__name__", type(candidate).__name__)
    print(f"using labkit's reference for {exercise_id}: your {name} does not pass its check yet")
    return _fallback(exercise_id)


@dataclasses.dataclass
class Hint:
    """One level of help for an exercise; shows itself as text or HTML."""

    exercise_id: str
    level: int
    levels: int
    text: str

    def __str__(self) -> str:
        more = (f"  (level {self.level} of {self.levels}; labkit.hint({self.exercise_id!r}) again for more)"
                if self.level < self.levels else f"  (level {self.level} of {self.levels}: the last one)")
        return f"{self.exercise_id}, hint {self.level}: {self.text}\n{more}"

    __repr__ = __str__

    def _repr_html_(self) -> str:
        body = html.escape(self.text)
        if "\n" in self.text:
            body = f"<pre>{body}</pre>"
        return (f"<div class='labkit-hint'><p><b>{html.escape(self.exercise_id)}, hint {self.level} of "
                f"{self.levels}</b></p>{body}</div>")


_SHOWN: dict[str, int] = {}


def hint(exercise_id: str, level: int | None = None) -> Hint:
    """The next level of help for `exercise_id` each time it is called (or `level`, from 1)."""
    exercises = registry()
    if exercise_id not in exercises:
        raise KeyError(f"unknown exercise {exercise_id!r}; known: {', '.join(exercises)}")
    exercise: Exercise = exercises[exercise_id]
    levels = exercise.hint_levels
    if level is None:
        level = min(_SHOWN.get(exercise_id, 0) + 1, len(levels))
    if not 1 <= level <= len(levels):
        raise ValueError(f"{exercise_id} has hint levels 1 to {len(levels)}, got level={level}")
    _SHOWN[exercise_id] = max(_SHOWN.get(exercise_id, 0), level)
    return Hint(exercise_id, level, len(levels), levels[level - 1])
