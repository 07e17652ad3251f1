"""Graders never crash and never lie: adversarial candidates against `labkit.check`."""

import sys
import threading
import time

import jax
import jax.numpy as jnp
import numpy as np

import labkit
from labkit.grading import registry
from labkit.grading.labs.lab01 import attention_reference

EX = "lab01.attention"


def _only_failures(report):
    return [c for c in report.cases if not c.passed]


def test_master_solution_passes_and_reports_look_right():
    report = labkit.check(EX, attention_reference)
    assert report.passed and report.score == report.max_score == 3
    text = report.text()
    assert text.splitlines()[0] == "lab01.attention: all 6 cases passed (3/3 points)"
    assert "ok      tiny: seq 4, dim 2" in text
    html = report._repr_html_()
    assert "<table>" in html and "lab01.attention" in html


def test_wrong_values_report_expected_got_error_and_where():
    def off_by_one(q, k, v, mask=None):
        return attention_reference(q, k, v, mask).at[1, 0].add(0.5)

    report = labkit.check(EX, off_by_one)
    case = report.cases[0]
    assert case.status == "fail"
    assert "max |got - expected| = 0.5 at (1, 0)" in case.lines[0]
    assert case.lines[1].startswith("expected row 1:") and case.lines[2].startswith("got      row 1:")
    assert not report.passed and report.score == 0.5  # only "length 1" has no row 1 to break


def test_exceptions_become_failed_cases_with_location():
    def broken(q, k, v, mask=None):
        scores = q @ k  # forgot the transpose
        return scores

    report = labkit.check(EX, broken)
    assert all(c.status == "error" for c in report.cases[:2])
    assert "shapes do not fit together" in report.cases[0].lines[0]  # said in the learner's terms
    assert "(details: ValueError: matmul" in report.cases[0].lines[1]  # the raw error, folded below
    assert "scores = q @ k" in report.text()


def test_stub_says_not_implemented_yet():
    def attention(q, k, v, mask=None):
        raise NotImplementedError()

    report = labkit.check(EX, attention)
    assert report.summary == "lab01.attention: not implemented yet (0/3 points)"


def test_none_list_shape_dtype_and_nan_are_explained():
    cases = {
        "none": (lambda q, k, v, mask=None: None, "got None"),
        "list": (lambda q, k, v, mask=None: attention_reference(q, k, v, mask).tolist(), "got a list"),
        "shape": (lambda q, k, v, mask=None: attention_reference(q, k, v, mask).T, "shape"),
        "dtype": (lambda q, k, v, mask=None: np.asarray(attention_reference(q, k, v, mask), np.float64), "dtype float64"),
        "nan": (lambda q, k, v, mask=None: attention_reference(q, k, v, mask) * jnp.nan, "got NaN"),
    }
    for name, (fn, words) in cases.items():
        report = labkit.check(EX, fn)
        assert not report.passed, name
        assert words in report.cases[0].lines[0], (name, report.text())
        assert report.cases[0].hint, name


def test_endless_loop_and_sleep_time_out_quickly():
    def spin(q, k, v, mask=None):
        while True:
            pass

    def sleepy(q, k, v, mask=None):
        time.sleep(60)

    for fn in (spin, sleepy):
        start = time.perf_counter()
        report = labkit.check(EX, fn, timeout=0.5)
        assert time.perf_counter() - start < 5
        assert report.cases[0].status == "timeout"
        assert {c.status for c in report.cases[1:]} == {"skipped"}


def test_loop_that_swallows_the_timeout_is_still_stopped():
    def stubborn(q, k, v, mask=None):
        for _ in range(10**9):
            try:
                time.sleep(10)
            except Exception:  # a learner's catch-all must not defeat the time limit
                pass

    report = labkit.check(EX, stubborn, timeout=0.3)
    assert report.cases[0].status == "timeout"


def test_timeout_also_works_off_the_main_thread():
    box = {}

    def spin(q, k, v, mask=None):
        while True:
            pass

    worker = threading.Thread(target=lambda: box.setdefault("r", labkit.check(EX, spin, timeout=0.5)))
    worker.start()
    worker.join(30)
    assert box["r"].cases[0].status == "timeout"


def test_sys_exit_and_keyboard_interrupt_are_contained():
    for fn, words in ((lambda q, k, v, mask=None: sys.exit(1), "sys.exit"),
                      (lambda q, k, v, mask=None: (_ for _ in ()).throw(KeyboardInterrupt()), "KeyboardInterrupt")):
        report = labkit.check(EX, fn)
        assert report.cases[0].status == "error" and words in report.cases[0].lines[0]


def test_mutating_inputs_fails_even_with_right_values():
    def sneaky(q, k, v, mask=None):
        out = attention_reference(q.copy(), k, v, mask)
        q[...] = 0
        return out

    report = labkit.check(EX, sneaky)
    assert not report.passed and "changed input argument #1 in place" in report.cases[0].lines[0]


def test_printing_megabytes_is_capped_and_mentioned():
    def chatty(q, k, v, mask=None):
        print("x" * 3_000_000)
        return attention_reference(q, k, v, mask)

    report = labkit.check(EX, chatty)
    assert report.passed
    assert "printed 3,000,001 characters" in report.cases[0].lines[0]
    assert len(report.text()) < 5000


def test_not_callable_unknown_exercise_and_class_expected():
    assert "expected a function" in labkit.check(EX, [1, 2]).note
    assert "unknown exercise" in labkit.check("lab99.nope", attention_reference).note
    assert "expected a class" in labkit.check("lab01.self_attention_layer", attention_reference).note


def test_registered_mistake_is_named_in_the_hint():
    import functools

    from labkit.grading.labs.lab01 import _attention_with

    report = labkit.check(EX, functools.partial(_attention_with, scale=False))
    assert any(c.mistake == "missing scale" for c in report.cases)
    assert "sqrt(d)" in report.text()


def test_exercises_catalogue():
    cat = labkit.exercises("lab01")
    ids = [e.id for e in cat]
    assert ids[:2] == ["lab01.attention", "lab01.causal_mask"]  # the notebook's order (test_learner_path checks all)
    assert "lab01.attention" in str(cat) and "<table>" in cat._repr_html_()
    assert all(e.points > 0 and e.n_cases >= 4 and e.n_hidden >= 1 for e in cat)
    exercise = registry()["lab01.attention"]
    row = next(e for e in cat if e.id == exercise.id)
    assert row.n_cases == len(labkit.check(exercise.id, exercise.reference).cases)  # what a learner's check runs
    assert row.n_cases + row.n_hidden == len(exercise.cases)


def test_equivalent_correct_formulations_all_pass():
    """A right answer always passes, however the learner orders the arithmetic."""

    def scale_queries_first(q, k, v, mask=None):
        s = (q / np.sqrt(q.shape[-1])) @ k.T
        return jax.nn.softmax(jnp.where(mask, s, -1e9) if mask is not None else s, axis=-1) @ v

    def float64_numpy(q, k, v, mask=None):
        s = q.astype(np.float64) @ k.T.astype(np.float64) / np.sqrt(q.shape[-1])
        if mask is not None:
            s = np.where(mask, s, -1e30)
        p = np.exp(s - s.max(-1, keepdims=True))
        return ((p / p.sum(-1, keepdims=True)) @ v).astype(np.float32)

    def einsum_then_scale(q, k, v, mask=None):
        s = jnp.einsum("td,sd->ts", q, k) * (1 / jnp.sqrt(q.shape[-1] * 1.0))
        s = jnp.where(mask, s, jnp.finfo(jnp.float32).min) if mask is not None else s
        return jnp.einsum("ts,sd->td", jax.nn.softmax(s, -1), v)

    for fn in (scale_queries_first, float64_numpy, einsum_then_scale):
        report = labkit.check(EX, fn)
        assert report.passed, report.text()


def test_every_case_input_travels_to_a_learner_kernel():
    # Batch grading pickles each case's inputs into the submission's kernel: a lambda there (lab 08 once had
    # two) made `labkit grade` fail on every submission of that lab.
    import pickle

    for exercise in registry().values():
        for case in exercise.cases:
            args, kwargs = pickle.loads(pickle.dumps(case.inputs()))
            assert isinstance(args, tuple) and isinstance(kwargs, dict), (exercise.id, case.name)
