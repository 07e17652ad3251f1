"""Lab 08's building blocks against independent references: generators, reversible blocks, chunked FF, sweep."""

import csv

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labkit.capstone import reversible, sweep, tasks

OPS = {11: "MIN", 12: "MAX", 13: "MED", 14: "SM"}


def _parse_and_evaluate(tokens: list[int]) -> int:
    """Evaluate a ListOps token list with an explicit stack (independent of the generator's tree)."""
    stack: list[list] = []
    value = None
    for token in tokens:
        if token in OPS:
            stack.append([OPS[token]])
        elif token == tasks.CLOSE:
            op, *args = stack.pop()
            args.sort()
            value = {"MIN": args[0], "MAX": args[-1], "MED": args[(len(args) - 1) // 2],
                     "SM": sum(args) % 10}[op]
            if stack:
                stack[-1].append(value)
        else:
            stack[-1].append(token - 1)
    assert not stack
    return value


def test_listops_labels_match_an_independent_evaluator():
    batch = tasks.listops(seed=3, batch=64, seq_len=48, max_depth=3)
    assert batch.inputs.shape == (64, 48) and batch.targets.shape == (64,)
    for row, label in zip(batch.inputs, batch.targets):
        length = int(np.count_nonzero(row))
        assert not row[length:].any(), "padding only at the end"
        assert _parse_and_evaluate(row[:length].tolist()) == label
    assert len(set(batch.targets.tolist())) > 3, "labels vary"


def test_listops_text_and_seed():
    tree = ("MAX", [2, 9, ("MIN", [4, 7]), 0])
    assert tasks.to_text(tree) == "[MAX 2 9 [MIN 4 7 ] 0 ]" and tasks.evaluate(tree) == 9
    a, b = tasks.listops(5, 4, 32), tasks.listops(5, 4, 32)
    np.testing.assert_array_equal(a.inputs, b.inputs)


def test_recall_queries_ask_for_the_bound_value():
    batch = tasks.associative_recall(seed=1, batch=8, seq_len=40, n_pairs=5, n_queries=4, n_keys=10, n_values=6)
    for seq, targets, weights in zip(batch.inputs, batch.targets, batch.weights):
        bound = {int(seq[i]): int(seq[i + 1]) for i in range(0, 10, 2)}
        assert len(bound) == 5 and all(1 <= k <= 10 < v <= 16 for k, v in bound.items())
        positions = np.flatnonzero(weights)
        assert len(positions) == 4 and positions.min() >= 40 - 8
        for t in positions:
            assert targets[t] == bound[int(seq[t])] == seq[t + 1]
    with pytest.raises(ValueError, match="seq_len"):
        tasks.associative_recall(0, 1, 10, n_pairs=4, n_queries=4)


def test_query_accuracy_matches_a_loop():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(3, 7, 5))
    targets = rng.integers(0, 5, (3, 7))
    weights = (rng.random((3, 7)) < 0.4).astype(np.float32)
    weights[0, 0] = 1.0
    hits = [logits[b, t].argmax() == targets[b, t] for b in range(3) for t in range(7) if weights[b, t]]
    assert tasks.query_accuracy(logits, targets, weights) == pytest.approx(np.mean(hits))


def _blocks(seed, d, depth):
    keys = jax.random.split(jax.random.PRNGKey(seed), 3)
    wf = jax.random.normal(keys[0], (depth, d, d)) / np.sqrt(d)
    wg = jax.random.normal(keys[1], (depth, d, d)) / np.sqrt(d)
    x = jax.random.normal(keys[2], (2, 6, d))
    return (wf, wg), x


def _f(w, x):
    return jnp.tanh(x @ w)


def _g(w, x):
    return jax.nn.relu(x @ w) - 0.1


def test_reverse_rebuilds_the_inputs():
    (wf, wg), x = _blocks(0, 8, 1)
    f, g = (lambda x: _f(wf[0], x)), (lambda x: _g(wg[0], x))
    y1, y2 = reversible.reversible_forward(x, 2 * x, f, g)
    np.testing.assert_allclose(y1, x + f(2 * x), atol=1e-6)
    x1, x2 = reversible.reversible_reverse(y1, y2, f, g)
    np.testing.assert_allclose(x1, x, atol=1e-5)
    np.testing.assert_allclose(x2, 2 * x, atol=1e-5)


def test_reversible_stack_gradients_match_plain_autodiff():
    weights, x = _blocks(1, 8, 4)

    def plain(weights, x1, x2):  # the same blocks, differentiated the ordinary way (keeps every activation)
        for layer in range(4):
            x1, x2 = reversible.reversible_forward(x1, x2, lambda h: _f(weights[0][layer], h),
                                                   lambda h: _g(weights[1][layer], h))
        return x1, x2

    def loss(stack):
        return lambda w, a, b: sum(jnp.sum(jnp.sin(y)) for y in stack(w, a, b))

    ours = jax.grad(loss(lambda w, a, b: reversible.reversible_stack(_f, _g, w, a, b)), argnums=(0, 1, 2))
    ref = jax.grad(loss(plain), argnums=(0, 1, 2))
    np.testing.assert_allclose(reversible.reversible_stack(_f, _g, weights, x, -x)[1], plain(weights, x, -x)[1],
                               atol=1e-5)
    for a, b in zip(jax.tree_util.tree_leaves(ours(weights, x, -x)), jax.tree_util.tree_leaves(ref(weights, x, -x))):
        np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_trax_reversible_serial_equals_the_reference_block():
    from trax import layers as tl
    from trax import shapes

    x1, x2 = (jnp.asarray(np.random.default_rng(s).normal(size=(2, 5, 6)), jnp.float32) for s in (0, 1))
    f, g = tl.Serial(tl.Dense(6), tl.Tanh()), tl.Serial(tl.Dense(6), tl.Relu())
    block = tl.ReversibleSerial(tl.ReversibleHalfResidual(f), tl.ReversibleSwap(),
                                tl.ReversibleHalfResidual(g), tl.ReversibleSwap())
    block.init((shapes.signature(x1), shapes.signature(x2)), rng=jax.random.PRNGKey(0))
    for got, expected in zip(block((x1, x2)), reversible.reversible_forward(x1, x2, f, g)):
        np.testing.assert_allclose(got, expected, atol=1e-6)


@pytest.mark.parametrize("seq,chunk", [(12, 4), (13, 5), (3, 8), (7, 1)])
def test_chunked_feed_forward_equals_the_whole(seq, chunk):
    rng = np.random.default_rng(seq)
    w = [jnp.asarray(rng.normal(size=s), jnp.float32) for s in ((4, 10), (10,), (10, 4), (4,))]
    x = jnp.asarray(rng.normal(size=(2, seq, 4)), jnp.float32)
    np.testing.assert_allclose(reversible.chunked_feed_forward(x, *w, chunk),
                               np.maximum(np.asarray(x) @ w[0] + w[1], 0) @ w[2] + w[3], atol=1e-5)
    grads = [jax.grad(lambda x, fn=fn: jnp.sum(fn(x) ** 2))(x) for fn in
             (lambda x: reversible.chunked_feed_forward(x, *w, chunk), lambda x: reversible.feed_forward(x, *w))]
    np.testing.assert_allclose(grads[0], grads[1], atol=1e-4, rtol=1e-5)


def test_sweep_resumes_without_rerunning_finished_rows(tmp_path, monkeypatch):
    specs = sweep.Settings(("dense", "linear"), ("dense",), (64,), (32,), steps=3).specs()
    path = tmp_path / "sweep.csv"
    with path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, sweep.COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows([{**spec, "accuracy": 0.5} for spec in specs[:2]])
    ran = []
    monkeypatch.setattr(sweep, "run_in_worker", lambda target, spec, **kw: ran.append(spec) or
                        type("R", (), {"ok": True, "value": {"accuracy": 0.25}})())
    rows = sweep.run_sweep(specs, path, progress=False, command="test")
    assert [spec["task"] for spec in ran] == ["listops"], "only the missing run is run"
    assert len(rows) == 3 and rows[-1]["accuracy"] == "0.25" and rows[-1]["command"] == "test"


def test_causal_language_model_does_not_look_ahead():
    from trax import shapes

    from labkit.capstone import models

    tokens = np.random.default_rng(0).integers(1, 17, (1, 16)).astype(np.int32)
    changed = tokens.copy()
    changed[0, 10:] = (changed[0, 10:] % 16) + 1
    for family in ("dense", "linear"):
        model = models.language_model(family, 17, d_model=16, n_layers=1, max_len=16)
        model.init(shapes.signature(jnp.asarray(tokens)), rng=jax.random.PRNGKey(0))
        a, b = model(jnp.asarray(tokens)), model(jnp.asarray(changed))
        np.testing.assert_allclose(a[0, :10], b[0, :10], atol=1e-5)
        assert np.abs(np.asarray(a[0, 10:] - b[0, 10:])).max() > 1e-3


@pytest.mark.parametrize("family", ["dense", "linear"])
def test_predict_twin_decodes_like_the_full_forward(family):
    """Trax's eval forward over the whole sequence is the reference: the predict-mode twin, fed one token per
    call, gives the same logits, and greedy generation picks the argmax of the eval model's logits."""
    from trax import shapes

    from labkit.capstone import generation, models

    shape = dict(d_model=16, n_layers=1, n_heads=2, max_len=8)
    prompt = jax.random.randint(jax.random.PRNGKey(3), (2, 3), 1, 12)
    twin = generation.predict_twin(family, 12, batch=2, seed=1, **shape)
    tokens = generation.generate(twin, np.asarray(prompt), n_new=3)
    slow = models.language_model(family, 12, mode="eval", **shape)
    slow.init(shapes.signature(jnp.asarray(tokens)), rng=jax.random.PRNGKey(1))
    full = np.asarray(jax.jit(slow.pure_fn)(jnp.asarray(tokens), twin.weights, slow.state, jax.random.PRNGKey(0))[0])
    np.testing.assert_array_equal(tokens[:, :3], prompt)
    np.testing.assert_allclose(generation.decode(twin, tokens), full, atol=2e-5)
    np.testing.assert_array_equal(tokens[:, 3:], full[:, 2:-1].argmax(-1))
