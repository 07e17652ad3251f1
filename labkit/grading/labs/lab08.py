"""Lab 08 exercises (the capstone): a reversible block forward and back, the chunked feed-forward, and recall
accuracy counted at query positions only. Registered in the order the notebook asks them."""

from __future__ import annotations

import functools

import numpy as np

from labkit.capstone.reversible import reversible_forward, reversible_reverse
from labkit.capstone.tasks import associative_recall, query_accuracy
from labkit.grading.exercise import Case, Exercise, Mistake, hidden, register
from labkit.grading.inputs import normal as _normal

ANSWERED_BY_REVERSIBLE = ("labkit.capstone.reversible.reversible_forward",
                          "labkit.capstone.reversible.reversible_reverse",
                          "labkit.capstone.reversible.reversible_stack")


class _Residual:
    """A seeded residual function `[..., d] -> [..., d]`: `tanh(x @ matrix) + shift`. A class, not a lambda,
    so that batch grading can pickle it into the learner's kernel."""

    def __init__(self, matrix: np.ndarray, shift: float):
        self.matrix, self.shift = matrix, shift

    def __call__(self, x):
        return np.tanh(np.asarray(x) @ self.matrix) + self.shift


def _blocks(seed: int, d: int, scale: float):
    """Two seeded residual functions `F, G: [..., d] -> [..., d]` (tanh of a linear map, plus a shift)."""
    return _Residual(_normal(seed, d, d, scale=scale), 0.5), _Residual(_normal(seed + 1, d, d, scale=scale), -0.25)


# ---------------------------------------------------------------- 8.1 reversible forward

def _forward_with(x1, x2, f, g, *, g_reads_x1=False, swap=False, f_reads_x1=False):
    """A reversible forward with one step done wrong."""
    y1 = x1 + f(x1 if f_reads_x1 else x2)
    y2 = x2 + g(x1 if g_reads_x1 else y1)
    return (y2, y1) if swap else (y1, y2)


def _forward_case(name, seed, shape, scale=1.0):
    def inputs():
        f, g = _blocks(seed, shape[-1], scale)
        return (_normal(seed + 2, *shape), _normal(seed + 3, *shape), f, g), {}
    return Case(name, inputs, atol=1e-5, rtol=1e-5)


register(Exercise(
    id="lab08.reversible_forward",
    description="a reversible residual block: y1 = x1 + F(x2), y2 = x2 + G(y1)",
    points=2,
    reference=reversible_forward,
    cases=[
        _forward_case("4 positions, width 3", 0, (4, 3)),
        _forward_case("one position, width 2", 10, (1, 2)),
        _forward_case("batch 2 x 5 positions, width 4", 20, (2, 5, 4)),
        _forward_case("strong F and G: every stream matters", 30, (6, 4), scale=3.0),
        hidden(_forward_case("7 positions, width 5", 40, (7, 5))),
    ],
    mistakes=[
        Mistake("G reads x1", functools.partial(_forward_with, g_reads_x1=True),
                "the second half must read the first half's NEW value, the one just computed, not the old input"),
        Mistake("outputs swapped", functools.partial(_forward_with, swap=True),
                "the values are right but in the wrong order: return the first stream's output first"),
        Mistake("F reads its own stream", functools.partial(_forward_with, f_reads_x1=True),
                "each half adds a function of the OTHER stream; adding a function of its own input cannot be undone"),
    ],
    default_hint="follow the two equations above the exercise in order: the first output feeds the second",
    hints=(
        "first the new first stream (old first stream plus F of the second), then the new second stream (old "
        "second stream plus G of the new first stream); return both as a tuple",
        "y1 = x1 + f(x2)\ny2 = x2 + g(y1)\nreturn y1, y2",
    ),
    answered_by=ANSWERED_BY_REVERSIBLE,
))


# ---------------------------------------------------------------- 8.2 reversible reverse

def _reverse_with(y1, y2, f, g, *, f_reads_y2=False, add=False, swap=False):
    """A reversible reverse with one step done wrong."""
    sign = 1.0 if add else -1.0
    x2 = y2 + sign * g(y1)
    x1 = y1 + sign * f(y2 if f_reads_y2 else x2)
    return (x2, x1) if swap else (x1, x2)


def _reverse_case(name, seed, shape, scale=1.0):
    def inputs():
        f, g = _blocks(seed, shape[-1], scale)
        y1, y2 = reversible_forward(_normal(seed + 2, *shape), _normal(seed + 3, *shape), f, g)
        return (y1, y2, f, g), {}
    return Case(name, inputs, atol=1e-5, rtol=1e-5)


register(Exercise(
    id="lab08.reversible_reverse",
    description="the block's inputs from its outputs: x2 = y2 - G(y1), x1 = y1 - F(x2)",
    points=2,
    reference=reversible_reverse,
    cases=[
        _reverse_case("4 positions, width 3", 0, (4, 3)),
        _reverse_case("one position, width 2", 10, (1, 2)),
        _reverse_case("batch 2 x 5 positions, width 4", 20, (2, 5, 4)),
        _reverse_case("strong F and G: every stream matters", 30, (6, 4), scale=3.0),
        hidden(_reverse_case("7 positions, width 5", 40, (7, 5))),
    ],
    mistakes=[
        Mistake("F reads y2", functools.partial(_reverse_with, f_reads_y2=True),
                "F was applied to the second stream's output; in the forward pass it read the second stream's "
                "INPUT, so recover that one first and feed it to F"),
        Mistake("added instead of subtracted", functools.partial(_reverse_with, add=True),
                "undoing a residual addition takes the residual away again"),
        Mistake("outputs swapped", functools.partial(_reverse_with, swap=True),
                "the values are right but in the wrong order: return the first stream's input first"),
    ],
    default_hint="undo the forward's steps in reverse order: the last thing computed is undone first",
    hints=(
        "the second output only needs G of the first output, which you have: that gives the second input; "
        "with it, F of the second input gives back the first input",
        "x2 = y2 - g(y1)\nx1 = y1 - f(x2)\nreturn x1, x2",
    ),
    answered_by=ANSWERED_BY_REVERSIBLE,
))


# ---------------------------------------------------------------- 8.3 chunked feed-forward

def feed_forward_reference(x, w1, b1, w2, b2, chunk_size):
    """`relu(x @ w1 + b1) @ w2 + b2` over `x [seq, d]` in float64 numpy: chunking changes nothing."""
    del chunk_size
    x, w1, b1, w2, b2 = (np.asarray(a, np.float64) for a in (x, w1, b1, w2, b2))
    return (np.maximum(x @ w1 + b1, 0.0) @ w2 + b2).astype(np.float32)


def _chunked_with(x, w1, b1, w2, b2, chunk_size, *, drop_last=False, no_relu=False, no_b1=False):
    """A chunked feed-forward with one step done wrong."""
    seq = x.shape[0]
    stop = seq - seq % chunk_size if drop_last and seq > chunk_size else seq
    outs = []
    for start in range(0, stop, chunk_size):
        h = x[start:start + chunk_size] @ w1 + (0.0 if no_b1 else b1)
        outs.append((h if no_relu else np.maximum(h, 0.0)) @ w2 + b2)
    return np.concatenate(outs, 0)


def _ff_case(name, seed, seq, d, d_ff, chunk_size):
    def inputs():
        args = (_normal(seed, seq, d), _normal(seed + 1, d, d_ff, scale=0.5), _normal(seed + 2, d_ff),
                _normal(seed + 3, d_ff, d, scale=0.5), _normal(seed + 4, d))
        return (*args, chunk_size), {}
    return Case(name, inputs, atol=1e-4, rtol=1e-4)


register(Exercise(
    id="lab08.chunked_feed_forward",
    description="a position-wise feed-forward applied chunk_size positions at a time",
    points=2,
    reference=feed_forward_reference,
    cases=[
        _ff_case("8 positions in chunks of 4, width 3, hidden 6", 0, 8, 3, 6, 4),
        _ff_case("10 positions in chunks of 4: the last chunk is shorter", 10, 10, 3, 8, 4),
        _ff_case("chunk longer than the sequence", 20, 3, 4, 8, 16),
        _ff_case("chunks of 1 position", 30, 5, 2, 4, 1),
        hidden(_ff_case("13 positions in chunks of 5, width 4, hidden 12", 40, 13, 4, 12, 5)),
    ],
    mistakes=[
        Mistake("last short chunk dropped", functools.partial(_chunked_with, drop_last=True),
                "positions are missing at the end: when the chunk size does not divide the length, the last "
                "chunk is shorter, and it still counts"),
        Mistake("no activation", functools.partial(_chunked_with, no_relu=True),
                "the hidden layer is linear: the ReLU between the two projections is missing"),
        Mistake("first bias missing", functools.partial(_chunked_with, no_b1=True),
                "the hidden pre-activation is missing its bias (the first one, before the ReLU)"),
    ],
    default_hint="each chunk of positions goes through the whole feed-forward (both projections, biases and the "
                 "ReLU), and the chunks' outputs are put back together in order along the sequence",
    hints=(
        "loop over the start positions 0, chunk_size, 2*chunk_size, ...; slice the rows of x; apply the "
        "feed-forward to the slice; concatenate the results along axis 0",
        "outs = []\nfor start in range(0, x.shape[0], chunk_size):\n"
        "    h = jnp.maximum(x[start:start + chunk_size] @ w1 + b1, 0)\n"
        "    outs.append(h @ w2 + b2)\nreturn jnp.concatenate(outs, axis=0)",
    ),
    nan_hint="NaN or inf should not appear here: check the slices and the arithmetic of each chunk",
    answered_by=("labkit.capstone.reversible.chunked_feed_forward", "labkit.capstone.reversible.feed_forward"),
))


# ---------------------------------------------------------------- 8.4 accuracy at query positions

def _accuracy_with(logits, targets, weights, *, everywhere=False, over_all=False, per_row=False):
    """An accuracy with one step done wrong."""
    correct = (np.asarray(logits).argmax(-1) == targets).astype(np.float32)
    if everywhere:
        return float(correct.mean())
    if over_all:
        return float((correct * weights).sum() / weights.size)
    if per_row:
        return float(np.mean((correct * weights).sum(-1) / weights.sum(-1)))
    return float((correct * weights).sum() / weights.sum())


def _accuracy_case(name, seed, batch, seq, vocab, hit_rate, *, ragged=False):
    """Recall-shaped weights; logits right everywhere except at query positions, where `hit_rate` are right."""
    def inputs():
        data = associative_recall(seed, batch, seq, n_pairs=2, n_queries=2, n_keys=vocab // 2 - 1,
                                  n_values=vocab // 2)
        weights = data.weights.copy()
        if ragged:  # rows with different numbers of queries: a mean of per-row means weighs them wrongly
            weights[0, np.flatnonzero(weights[0])[1:]] = 0.0
        rng = np.random.default_rng(seed + 1)
        guess = np.where((weights > 0) & (rng.random(weights.shape) > hit_rate),
                         (data.targets + 1) % vocab, data.targets)
        logits = rng.normal(size=(batch, seq, vocab)).astype(np.float32)
        np.put_along_axis(logits, guess[..., None], 10.0, axis=-1)
        return (logits, data.targets, weights), {}
    return Case(name, inputs, atol=1e-6, rtol=1e-6)


register(Exercise(
    id="lab08.query_accuracy",
    description="recall accuracy: argmax predictions counted at query positions only",
    points=2,
    reference=query_accuracy,
    cases=[
        _accuracy_case("one sequence of 8, half the queries right", 0, 1, 8, 8, 0.5),
        _accuracy_case("4 sequences of 12", 10, 4, 12, 8, 0.5),
        _accuracy_case("all queries wrong: other positions do not count", 20, 3, 10, 10, 0.0),
        _accuracy_case("rows with different numbers of queries", 30, 3, 12, 8, 0.5, ragged=True),
        hidden(_accuracy_case("8 sequences of 16, vocabulary 12", 40, 8, 16, 12, 0.3)),
    ],
    mistakes=[
        Mistake("counted everywhere", functools.partial(_accuracy_with, everywhere=True),
                "every position was counted; only the positions whose weight is 1 (the queried keys) ask the "
                "model to recall something"),
        Mistake("divided by every position", functools.partial(_accuracy_with, over_all=True),
                "the right positions were counted, but the total was divided by the number of all positions "
                "instead of the number of query positions"),
        Mistake("mean of per-row means", functools.partial(_accuracy_with, per_row=True),
                "each query position counts once overall: averaging per sequence first over-weights sequences "
                "with few queries"),
    ],
    default_hint="an accuracy is (number of correct predictions) / (number of predictions), both counted over the "
                 "query positions only",
    hints=(
        "the prediction is the argmax over the last axis (the vocabulary); compare it with the targets, multiply "
        "by the weights, sum, and divide by the sum of the weights; return a Python float",
        "correct = (np.asarray(logits).argmax(-1) == targets).astype(np.float32)\n"
        "return float((correct * weights).sum() / weights.sum())",
    ),
    nan_hint="NaN usually means a division by zero: divide by the number of query positions",
    answered_by=("labkit.capstone.tasks.query_accuracy",),
))
