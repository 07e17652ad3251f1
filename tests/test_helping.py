"""`labkit.use`, `labkit.hint` and the feedback a learner reads: against the lab 01 exercises."""

import jax.numpy as jnp
import numpy as np
import pytest

import labkit
from labkit.grading import is_fallback, registry
from labkit.grading.labs.lab01 import attention_reference

EX = "lab01.attention"


def _stub(q, k, v, mask=None):
    raise NotImplementedError()


def _own_attention(q, k, v, mask=None):
    return attention_reference(q, k, v, mask)


def test_use_hands_out_a_marked_reference_until_the_learners_own_passes(capsys):
    fallback = labkit.use(EX, _stub)
    assert "using labkit's reference for lab01.attention" in capsys.readouterr().out
    assert fallback is not _stub and is_fallback(fallback)
    q = np.random.default_rng(0).normal(size=(4, 2)).astype(np.float32)
    np.testing.assert_allclose(fallback(q, q, q), attention_reference(q, q, q), atol=1e-6)

    assert labkit.use(EX, _own_attention) is _own_attention, "a passing function is used as it is"
    assert capsys.readouterr().out == "", "and silently"
    assert not is_fallback(_own_attention)


def test_use_of_a_passing_check_costs_no_second_grading(monkeypatch):
    def own(q, k, v, mask=None):
        return attention_reference(q, k, v, mask)

    assert labkit.check(EX, own).passed
    monkeypatch.setattr("labkit.grading.helping.check", lambda *a, **k: pytest.fail("graded again"))
    assert labkit.use(EX, own) is own


def test_use_of_a_wrong_function_falls_back():
    def wrong(q, k, v, mask=None):
        return jnp.zeros((q.shape[0], v.shape[1]), jnp.float32)

    assert is_fallback(labkit.use(EX, wrong))
    with pytest.raises(KeyError, match="unknown exercise"):
        labkit.use("lab01.nope", wrong)


def test_layer_fallback_is_a_class_a_learner_can_subclass():
    layer = labkit.use("lab01.self_attention_layer", None)
    assert isinstance(layer, type) and is_fallback(layer)
    subclass = type("Mine", (layer,), {})
    assert not is_fallback(subclass), "the mark is not inherited: a learner's subclass is their own code"


def test_hint_levels_go_deeper_on_each_call_and_stop_at_the_last():
    exercise = registry()[EX]
    levels = exercise.hint_levels
    shown = [labkit.hint(EX) for _ in range(len(levels) + 1)]
    assert [h.level for h in shown] == [*range(1, len(levels) + 1), len(levels)]
    assert shown[0].text == exercise.default_hint
    assert "again for more" in str(shown[0]) and "the last one" in str(shown[-1])
    assert labkit.hint(EX, level=2).text == levels[1]
    assert "<div class='labkit-hint'>" in shown[0]._repr_html_()
    with pytest.raises(ValueError, match="hint levels 1 to"):
        labkit.hint(EX, level=len(levels) + 1)


def test_a_wrong_answer_gets_each_hint_once_and_a_pointer_to_more_help():
    def zeros(q, k, v, mask=None):
        return jnp.zeros((q.shape[0], v.shape[1]), jnp.float32)

    report = labkit.check(EX, zeros)
    text = report.text()
    assert len([c for c in report.cases if not c.passed]) > 1
    assert len(report.hints) == 1 and text.count("hint:") == 1, text
    assert "more help: labkit.hint('lab01.attention')" in text
    assert text.count("hint:") == report._repr_html_().count("<b>hint:</b>")


def test_a_stub_gets_no_hint():
    text = labkit.check(EX, _stub).text()
    assert "hint" not in text and "not implemented yet" in text


def test_a_layer_that_returns_only_the_output_is_told_what_to_return():
    from trax import layers as tl

    class OutputOnly(tl.SelfAttention):
        def forward_unbatched(self, x, mask=None, *, weights, state, rng, update_state):
            w_q, w_k, w_v, w_o = weights
            return attention_reference(x @ w_q, x @ w_k, x @ w_v) @ w_o

    report = labkit.check("lab01.self_attention_layer", OutputOnly)
    first = report.cases[0].lines[0]
    assert "forward_unbatched must return a pair (output, state)" in first
    assert "it returned one array of shape" in first, first
    assert "tree prefix" not in first and "unpack" not in first


def test_a_whole_number_answer_may_have_any_integer_type():
    def as_int32(batch, heads, seq_len, bytes_per_value=4):
        return np.int32(min(batch * heads * seq_len * seq_len * bytes_per_value, 2**31 - 1))

    def as_float(batch, heads, seq_len, bytes_per_value=4):
        return float(batch * heads * seq_len * seq_len * bytes_per_value)

    exercise = registry()["lab01.score_memory"]
    fits = {c.name for c in exercise.cases if exercise.reference(*c.inputs()[0], **c.inputs()[1]) < 2**31}
    report = labkit.check(exercise.id, as_int32)
    assert fits and all(c.passed for c in report.cases if c.name in fits), report.text()
    floats = labkit.check(exercise.id, as_float)
    assert not floats.passed and "expected a whole number (an int)" in floats.text()
