"""The Linformer encoder (labkit.models.linformer) against blocks built on labkit's attention function."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes

from labkit.attention.linformer import k_schedule, linformer_attention, num_projection_params
from labkit.layers import LinformerProjection, LinformerSelfAttention
from labkit.models import LinformerEncoder

from helpers import momentum_sgd

D_MODEL, MAX_LEN, K = 16, 12, 5


def _encoder(x, seed=0, **kw):
    options = {**dict(max_len=MAX_LEN, k=K, depth=2, heads=2, dim_ff=32), **kw}
    model = LinformerEncoder(D_MODEL, **options)
    model.init(shapes.signature(x), rng=jax.random.PRNGKey(seed))
    return model


def _x(seed=0, t=MAX_LEN, batch=2):
    return jnp.asarray(np.random.default_rng(seed).normal(size=(batch, t, D_MODEL)), jnp.float32)


def _walk(layer):
    yield layer
    for sub in layer.sublayers:
        yield from _walk(sub)


def _reference(model, x, projections):
    """The encoder with each attention recomputed by `linformer_attention`; `projections[i] = (e, f | None)`.

    LayerNorms and the feed-forward blocks are Trax's own layers with the model's weights (eval mode).
    """
    run = lambda layer, y: layer.pure_fn(y, layer.weights, layer.state, jax.random.PRNGKey(0))[0]
    *blocks, final = model.sublayers
    for i, block in enumerate(blocks):
        attention = [l for l in _walk(block) if isinstance(l, LinformerSelfAttention)]
        if not attention:
            x = run(block, x)  # feed-forward residual block
            continue
        norm = next(l for l in _walk(block) if type(l).__name__ == "LayerNorm")  # tl.LayerNorm is gin-wrapped
        w_q, w_k, w_v, w_o = attention[0].weights[:4]
        y = run(norm, x)
        q, k, v = (jnp.einsum("btd,ndh->btnh", y, w) for w in (w_q, w_k, w_v))
        e, f = projections[i // 2]
        layer = attention[0]
        out = linformer_attention(q, k, v, e_proj=e, f_proj=f, downsample=layer._downsample, stride=layer._stride)
        x = x + jnp.einsum("btnh,nhd->btd", out, w_o)
    return run(final, x)


def _own_projections(model):
    """Each attention layer's `(e, f | None)` as the model holds them (the shared one for layerwise)."""
    shared = [l for l in _walk(model) if isinstance(l, LinformerProjection)]
    out = []
    for layer in (l for l in _walk(model) if isinstance(l, LinformerSelfAttention)):
        proj = (shared[0].weights[0],) if shared else tuple(layer.weights[4:])
        out.append((proj[0] if proj else None, proj[1] if len(proj) == 2 else None))
    return out


@pytest.mark.parametrize("options", [
    dict(sharing="none", activation="relu"), dict(sharing="kv", downsample="conv", k_decay=0.5),
    dict(sharing="headwise", downsample="mean"), dict(sharing="layerwise", activation="gelu")],
    ids=["none-relu", "kv-conv-schedule", "headwise-mean", "layerwise-gelu"])
def test_encoder_shapes_and_outputs_match_the_function(options):
    x = _x(1, t=9)  # shorter than max_len: padded inside the attention
    model = _encoder(x, mode="eval", **options)
    out = model(x)
    assert out.shape == x.shape and np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, _reference(model, x, _own_projections(model)), atol=2e-5)


def test_layerwise_sharing_holds_one_projection_and_every_layer_trains_it():
    x = _x(3)
    model = _encoder(x, sharing="layerwise", mode="eval")
    leaves = jax.tree_util.tree_leaves(model.weights)
    projections = [w for w in leaves if w.shape == (K, MAX_LEN)]
    assert len(projections) == 1 and projections[0].size == num_projection_params(
        "layerwise", n_heads=2, proj_k=K, max_len=MAX_LEN, n_layers=2)
    e = projections[0]
    loss = lambda out: jnp.sum(jnp.sin(out))
    grads = jax.jit(jax.grad(lambda w: loss(model.pure_fn(x, w, model.state, jax.random.PRNGKey(0))[0])))(
        model.weights)
    g_model = [g for g, w in zip(jax.tree_util.tree_leaves(grads), leaves) if w is e]
    assert len(g_model) == 1
    # The same model with one copy of E per layer: each layer's gradient is non-zero, and they sum to the shared one.
    per_layer = jax.jit(jax.grad(lambda es: loss(_reference(model, x, [(ei, None) for ei in es]))))([e] * 2)
    assert all(float(jnp.abs(g).max()) > 1e-4 for g in per_layer)
    np.testing.assert_allclose(sum(per_layer), g_model[0], atol=1e-4, rtol=1e-4)


def test_parameter_counts_follow_the_sharing_mode_and_k_schedule():
    x = _x(4)
    for sharing in ("none", "headwise", "kv"):
        model = _encoder(x, depth=3, sharing=sharing, k_decay=0.6, min_k=2, mode="eval")
        ks = k_schedule(K, 3, decay=0.6, min_k=2)
        counted = sum(sum(p.size for p in proj if p is not None)
                      for proj in ({id(p): p for p in pair if p is not None}.values()
                                   for pair in _own_projections(model)))
        assert counted == num_projection_params(sharing, n_heads=2, proj_k=ks, max_len=MAX_LEN, n_layers=3), sharing


def _count_checkpoints(fn, *args) -> int:
    """Top-level `jax.checkpoint` calls in `fn`'s jaxpr (descending into pjit/custom calls, not into remat)."""
    def count(jaxpr):
        total = 0
        for eqn in jaxpr.eqns:
            if "checkpoint" in eqn.primitive.name or "remat" in eqn.primitive.name:
                total += 1
                continue
            for param in eqn.params.values():
                inner = getattr(param, "jaxpr", param)  # a ClosedJaxpr holds its Jaxpr in .jaxpr
                if hasattr(inner, "eqns"):
                    total += count(inner)
        return total
    return count(jax.make_jaxpr(fn)(*args).jaxpr)


def test_checkpoint_levels_give_the_same_outputs_and_gradients():
    x = _x(5)
    kw = dict(dropout_ff=0.2, attention_dropout=0.2, mode="train")  # same rng: the same dropout masks at every level
    models = {level: _encoder(x, depth=1, checkpoint=level, **kw) for level in ("C0", "C1", "C2")}
    leaves = jax.tree_util.tree_leaves(models["C0"].weights)
    rng = jax.random.PRNGKey(7)
    results = {}
    for level, model in models.items():
        treedef = jax.tree_util.tree_structure(model.weights)
        weights = jax.tree_util.tree_unflatten(treedef, leaves)  # C0's weights in this level's nesting
        fn = lambda w, model=model: jnp.sum(jnp.sin(model.pure_fn(x, w, model.state, rng)[0]))
        results[level] = jax.jit(jax.value_and_grad(fn))(weights)
        # C1 recomputes the attention AND the feed-forward block: 2 per layer; C2 the same plus heads inside.
        assert _count_checkpoints(fn, weights) == {"C0": 0, "C1": 2, "C2": 2}[level]
    value0, grads0 = results["C0"]
    for level in ("C1", "C2"):
        value, grads = results[level]
        np.testing.assert_allclose(value, value0, rtol=1e-5)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads0)):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-4)


def test_encoder_trains_on_a_tiny_task():
    """Predict each position's vector 3 steps to the left: only attention can move information along T."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(size=(8, MAX_LEN, D_MODEL)), jnp.float32)
    target = jnp.roll(x, 3, axis=1)
    model = tl.Serial(_encoder(x, sharing="layerwise", dropout_ff=0.1, attention_dropout=0.1), tl.Dense(D_MODEL))
    model.init(shapes.signature(x), rng=jax.random.PRNGKey(0))

    def loss(w, key):
        return jnp.mean((model.pure_fn(x, w, model.state, key)[0] - target) ** 2)

    _, losses = momentum_sgd(loss, model.weights, (jax.random.PRNGKey(i) for i in range(30)), lr=0.02)
    assert np.isfinite(losses).all() and np.mean(losses[-5:]) < 0.8 * np.mean(losses[:5]), losses


def test_bad_options_raise():
    x = _x(0)
    with pytest.raises(ValueError, match="activation"):
        _encoder(x, activation="tanh")
    with pytest.raises(ValueError, match="checkpoint"):
        _encoder(x, checkpoint="C3")
    with pytest.raises(ValueError, match="same k"):
        _encoder(x, sharing="layerwise", k_decay=0.5)
