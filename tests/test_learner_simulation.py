"""For every registered exercise: the reference passes, the stub is "not implemented yet", and each
registered mistake fails with its own hint on at least one case."""

import pytest

import labkit
from labkit.grading import registry

EXERCISES = list(registry().values())


def _mistake_params():
    return [pytest.param(ex, m, id=f"{ex.id}:{m.name}") for ex in EXERCISES for m in ex.mistakes]


def _as_candidate(exercise, thing):
    """Mistakes of layer exercises are factories; wrap them in a class the way a learner would write one."""
    if exercise.expects_class and not isinstance(thing, type):
        return type("LearnerLayer", (), {"__new__": lambda cls, **kw: thing(**kw)})
    return thing


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda e: e.id)
def test_each_exercise_is_well_formed(exercise):
    assert len([c for c in exercise.cases if not c.hidden]) >= 4, "at least 4 cases a learner sees"
    assert len(exercise.mistakes) >= 2, "at least 2 registered mistakes"
    assert exercise.description and exercise.points > 0


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda e: e.id)
def test_reference_passes(exercise):
    report = labkit.check(exercise.id, _as_candidate(exercise, exercise.reference), include_hidden=True)
    assert report.passed, report.text()
    assert report.score == exercise.points


@pytest.mark.parametrize("exercise", EXERCISES, ids=lambda e: e.id)
def test_stub_is_not_implemented_yet(exercise):
    report = labkit.check(exercise.id, _as_candidate(exercise, exercise.stub))
    assert not report.passed and report.score == 0
    assert all(c.status == "todo" for c in report.cases), report.text()
    assert "not implemented yet" in report.summary


@pytest.mark.parametrize("exercise,mistake", _mistake_params())
def test_registered_mistake_fails_with_its_hint(exercise, mistake):
    report = labkit.check(exercise.id, _as_candidate(exercise, mistake.candidate))
    assert not report.passed, f"mistake {mistake.name!r} passes every case:\n{report.text()}"
    recognised = [c for c in report.cases if c.mistake == mistake.name]
    assert recognised, f"mistake {mistake.name!r} never recognised:\n{report.text()}"
    assert mistake.hint in report.text()
