"""DotProductSelfAttention against tl.SelfAttention: same weights, same outputs and gradients."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes

from labkit.layers import DotProductSelfAttention

CONFIGS = [
    dict(),
    dict(causal=True),
    dict(chunk_len=4, n_chunks_before=1, causal=True),
    dict(chunk_len=4, n_chunks_before=1, n_chunks_after=1),
    dict(share_qk=True, causal=True),
    dict(bias=True, d_v=6),
    dict(attention_dropout=0.3, output_dropout=0.2),
]


def _pair(config, x, use_reference_code, mode="train"):
    kwargs = dict(n_heads=2, d_qk=4, d_v=4, use_reference_code=use_reference_code, mode=mode)
    kwargs.update(config)
    ref = tl.SelfAttention(**kwargs)
    ref.init(shapes.signature(x), rng=jax.random.PRNGKey(0))
    ours = DotProductSelfAttention(**kwargs)
    ours.init(shapes.signature(x), rng=jax.random.PRNGKey(1))
    return ref, ours


@pytest.mark.parametrize("use_reference_code", [False, True])
@pytest.mark.parametrize("config", CONFIGS, ids=lambda c: ",".join(f"{k}={v}" for k, v in c.items()) or "plain")
def test_outputs_and_gradients_match_trax(config, use_reference_code):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 16, 8)), jnp.float32)
    ref, ours = _pair(config, x, use_reference_code)
    rng = jax.random.PRNGKey(7)
    out_ref, _ = ref.pure_fn(x, ref.weights, ref.state, rng)
    out, _ = ours.pure_fn(x, ref.weights, ref.state, rng)
    np.testing.assert_allclose(out, out_ref, atol=1e-5)

    def loss(layer):
        return lambda w, x: (layer.pure_fn(x, w, ref.state, rng)[0] ** 2).sum()

    g_ref = jax.grad(loss(ref), argnums=(0, 1))(ref.weights, x)
    g = jax.grad(loss(ours), argnums=(0, 1))(ref.weights, x)
    for a, b in zip(jax.tree_util.tree_leaves(g), jax.tree_util.tree_leaves(g_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)  # gradients reach ~50: relative float32 error


def test_eval_mode_and_copied_weights():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 8, 8)), jnp.float32)
    ref, ours = _pair(dict(causal=True, attention_dropout=0.5), x, False, mode="eval")
    ours.weights = ref.weights  # the drop-in promise: copy weights, get the same layer
    np.testing.assert_allclose(ours(x), ref(x), atol=1e-5)


def test_padding_mask_hides_padded_positions():
    x = jnp.asarray(np.random.default_rng(2).normal(size=(1, 8, 8)), jnp.float32)
    mask = jnp.asarray([[True] * 5 + [False] * 3])
    ref = tl.SelfAttention(n_heads=1, d_qk=4, d_v=4, masked=True)
    ref.init(shapes.signature((x, mask)), rng=jax.random.PRNGKey(0))
    ours = DotProductSelfAttention(n_heads=1, d_qk=4, d_v=4, masked=True)
    ours.init(shapes.signature((x, mask)))
    ours.weights = ref.weights
    np.testing.assert_allclose(ours((x, mask)), ref((x, mask)), atol=1e-5)
    # Changing what sits in the padding must not change anything the layer returns.
    x2 = x.at[:, 5:].set(100.0)
    np.testing.assert_allclose(ours((x2, mask))[:, :5], ours((x, mask))[:, :5], atol=1e-5)


def test_trains_inside_a_small_language_model():
    from trax.models import ReformerLM

    model = ReformerLM(vocab_size=16, d_model=16, d_ff=32, n_layers=1, n_heads=2, max_len=16, mode="train",
                       attention_type=DotProductSelfAttention)
    tokens = jnp.asarray(np.tile(np.arange(16) % 4, (4, 1)), jnp.int32)  # a repeating pattern to learn
    model.init(shapes.signature(tokens), rng=jax.random.PRNGKey(0))
    weights, state = model.weights, model.state

    def loss(w):
        logits, _ = model.pure_fn(tokens, w, state, jax.random.PRNGKey(1))
        logp = jax.nn.log_softmax(logits[:, :-1])
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    value_and_grad = jax.jit(jax.value_and_grad(loss))
    first, g = value_and_grad(weights)
    assert np.isfinite(first)
    for _ in range(5):
        weights = jax.tree_util.tree_map(lambda w, d: w - 0.1 * d, weights, g)
        last, g = value_and_grad(weights)
    assert last < first


# ---------------------------------------------------------------- every registered family's layer

def _registered_layers():
    from labkit.attention import FAMILIES

    return [pytest.param(family, causal, id=f"{family.name}-{'causal' if causal else 'full'}")
            for family in FAMILIES.values() if family.layer for causal in family.causal]


@pytest.mark.parametrize("family,causal", _registered_layers())
def test_each_registered_layer_is_a_drop_in_for_self_attention(family, causal):
    """Built from tl.SelfAttention's arguments, jitted forward and gradient; exact families give Trax's outputs."""
    import labkit.layers

    cls = getattr(labkit.layers, family.layer)
    base = tl.LSHSelfAttention if issubclass(cls, tl.LSHSelfAttention) else tl.SelfAttention
    kwargs = dict(n_heads=2, d_qk=4, d_v=4, causal=causal, mode="train")
    x = jnp.asarray(np.random.default_rng(3).normal(size=(2, 13, 8)), jnp.float32)
    ours = cls(**kwargs, **family.layer_options)
    ours.init(shapes.signature(x), rng=jax.random.PRNGKey(0))
    rng = jax.random.PRNGKey(1)
    loss = jax.jit(jax.value_and_grad(lambda w: (ours.pure_fn(x, w, ours.state, rng)[0] ** 2).sum()))
    value, grads = loss(ours.weights)
    assert np.isfinite(float(value)) and all(np.isfinite(np.asarray(g)).all()
                                             for g in jax.tree_util.tree_leaves(grads))
    assert ours.pure_fn(x, ours.weights, ours.state, rng)[0].shape == x.shape
    if family.exact and base is tl.SelfAttention:
        ref = tl.SelfAttention(**kwargs)
        ref.init(shapes.signature(x), rng=jax.random.PRNGKey(2))
        np.testing.assert_allclose(ours.pure_fn(x, ref.weights, ref.state, rng)[0],
                                   ref.pure_fn(x, ref.weights, ref.state, rng)[0], atol=1e-5)
