"""What an exercise is: named test cases with deterministic inputs, a reference, and known mistakes."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

Inputs = tuple[tuple, dict]


def call_function(candidate: Callable, args: tuple, kwargs: dict) -> Any:
    """Default way to run a candidate: call it with the case's arguments."""
    return candidate(*args, **kwargs)


def raise_not_implemented(*args, **kwargs):
    """The student notebook's stub: what a learner has before writing anything."""
    raise NotImplementedError()


@dataclasses.dataclass(frozen=True)
class Case:
    """One test: `inputs()` builds fresh, seeded `(args, kwargs)` each time it is called."""

    name: str
    inputs: Callable[[], Inputs]
    atol: float = 1e-5
    rtol: float = 1e-5
    hidden: bool = False  # run by instructors' batch grading, not by a learner's `check`


def hidden(case: Case) -> Case:
    """The same case, run only by instructors' batch grading."""
    return dataclasses.replace(case, hidden=True)


@dataclasses.dataclass(frozen=True)
class Mistake:
    """A common wrong solution, written out, so the grader can recognise it and give `hint`."""

    name: str
    candidate: Any
    hint: str


@dataclasses.dataclass
class Exercise:
    """A graded exercise. `run(candidate, args, kwargs)` turns a candidate into an output.

    `reference` is a correct candidate (a function, or a class for layer exercises) run in the grading
    process to get expected values; `stub` is what the student notebook starts from.
    """

    id: str
    description: str
    points: int
    reference: Any
    cases: list[Case]
    mistakes: list[Mistake] = dataclasses.field(default_factory=list)
    run: Callable[[Any, tuple, dict], Any] = call_function
    stub: Any = raise_not_implemented
    default_hint: str = "compare your steps with the explanation above the exercise"
    nan_hint: str = "NaN or inf usually comes from exp() overflowing or a 0/0; subtract the row maximum first"
    timeout: float = 60.0
    expects_class: bool = False
    # Deeper help for `labkit.hint(id)`: level 1 is `default_hint`, then these in order. Only the last
    # level may show code; every other hint says what is wrong, never how to write it.
    hints: tuple[str, ...] = ()
    # What later cells use while the learner's own version does not pass yet (`labkit.use`): a function
    # returning it, called when first needed (so Trax is imported only then). None: the reference.
    fallback: Callable[[], Any] | None = None
    # Names in labkit that would answer this exercise if a notebook used them before it (tested).
    answered_by: tuple[str, ...] = ()

    @property
    def hint_levels(self) -> tuple[str, ...]:
        """Every level of help, gentlest first: `default_hint`, then `hints`."""
        return (self.default_hint, *self.hints)

    @property
    def lab(self) -> str:
        """The lab part of the id: "lab01" for "lab01.attention"."""
        return self.id.split(".", 1)[0]


_REGISTRY: dict[str, Exercise] = {}


def register(exercise: Exercise) -> Exercise:
    """Add `exercise` to the registry (ids are unique) and return it."""
    if exercise.id in _REGISTRY:
        raise ValueError(f"exercise {exercise.id!r} is registered twice")
    if len(exercise.cases) < 1:
        raise ValueError(f"exercise {exercise.id!r} has no cases")
    _REGISTRY[exercise.id] = exercise
    return exercise


def registry() -> dict[str, Exercise]:
    """All registered exercises, lab by lab, each lab's in the order its notebook asks them."""
    from labkit.grading import labs

    labs.load_all()
    return dict(sorted(_REGISTRY.items(), key=lambda item: item[1].lab))
