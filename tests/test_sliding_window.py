"""Sliding-window attention against dense attention with the band mask, a float64 loop, and Trax's layer."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_qkv

from labkit.attention import FAMILIES, Problem
from labkit.attention.dense import dot_product_attention
from labkit.attention.sliding_window import sliding_window_attention


def band(t: int, window: int, causal: bool) -> np.ndarray:
    """`[t, t]` True where query i sees key j, written from the definition (independent of the module)."""
    keep = np.zeros((t, t), bool)
    for i in range(t):
        for j in range(t):
            keep[i, j] = i - window < j <= i if causal else abs(i - j) < window
    return keep


def band_reference(q, k, v, window, causal, key_mask=None):
    """Dense attention with the band (and key-padding) mask; rows that see no key are zero, as promised."""
    t = q.shape[-3]
    keep = band(t, window, causal)
    if key_mask is not None:
        keep = keep & np.asarray(key_mask)  # [..., N, 1, T] & [T, T] -> [..., N, T, T]
    out = dot_product_attention(q, k, v, mask=jnp.asarray(keep))
    visible = np.broadcast_to(keep, out.shape[:-3] + (q.shape[-2], t, t)).any(-1)  # [..., N, T]
    return jnp.where(jnp.asarray(np.moveaxis(visible, -1, -2))[..., None], out, 0.0)


CASES = [  # (t, window, block_size, batch)
    (13, 4, 3, (2,)),
    (13, 4, None, (2, 3)),
    (13, 1, None, (2,)),
    (13, 1, 4, ()),
    (13, 13, None, (2,)),
    (13, 20, 5, (2,)),
    (16, 4, 4, (1,)),
    (7, 3, 10, (2,)),
    (1, 4, None, (2,)),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("t,window,block_size,batch", CASES)
def test_matches_dense_attention_with_the_band_mask(t, window, block_size, batch, causal):
    q, k, v = random_qkv(0, batch, t, None, 2, 4, 3)
    got = sliding_window_attention(q, k, v, is_causal=causal, window=window, block_size=block_size)
    np.testing.assert_allclose(got, band_reference(q, k, v, window, causal), atol=1e-5, rtol=1e-5)


def test_window_at_least_the_length_is_full_attention():
    q, k, v = random_qkv(1, (2,), 11, None, 2, 4)
    for causal in (False, True):
        got = sliding_window_attention(q, k, v, is_causal=causal, window=11, block_size=4)
        np.testing.assert_allclose(got, dot_product_attention(q, k, v, is_causal=causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("window", [1, 3, 6])
def test_key_padding_masks_per_example_and_head(window, causal):
    q, k, v = random_qkv(2, (2,), 13, None, 2, 4, 3)
    keep = np.ones((2, 2, 1, 13), bool)
    keep[0, :, :, [0, 5, 6, 7]] = False  # with window 1 (and causal window 3 at 7) some rows see nothing
    keep[1, 1, :, -4:] = False  # one head of one example only
    got = sliding_window_attention(q, k, v, mask=jnp.asarray(keep), is_causal=causal, window=window, block_size=4)
    np.testing.assert_allclose(got, band_reference(q, k, v, window, causal, keep), atol=1e-5, rtol=1e-5)
    if window == 1:
        np.testing.assert_array_equal(np.asarray(got)[0, [0, 5, 6, 7]], 0.0)


def test_matches_a_float64_loop():
    q, k, v = (a.astype(np.float64) for a in random_qkv(3, (), 10, None, 2, 3, 2))
    window, scale = 3, 0.7
    want = np.zeros((10, 2, 2))
    for n in range(2):
        for i in range(10):
            js = [j for j in range(10) if abs(i - j) < window]
            s = np.array([scale * q[i, n] @ k[j, n] for j in js])
            p = np.exp(s - s.max())
            want[i, n] = (p / p.sum()) @ v[js, n]
    got = sliding_window_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), window=window,
                                   block_size=4, scale=scale)
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_gradients_match_the_band_masked_dense_gradient(causal):
    q, k, v = (jnp.asarray(a) for a in random_qkv(4, (2,), 13, None, 2, 4, 3))
    keep = np.ones((2, 1, 1, 13), bool)
    keep[1, ..., -3:] = False
    w = jnp.asarray(np.random.default_rng(5).normal(size=(2, 13, 2, 3)), jnp.float32)
    ours = functools.partial(sliding_window_attention, mask=jnp.asarray(keep), is_causal=causal, window=4,
                             block_size=3)
    dense_mask = jnp.asarray(band(13, 4, causal) & keep)
    dense = functools.partial(dot_product_attention, mask=dense_mask)
    grads = [jax.grad(lambda q, k, v, fn=fn: jnp.sum(fn(q, k, v) * w), argnums=(0, 1, 2))(q, k, v)
             for fn in (ours, dense)]
    for g, d, what in zip(*grads, "qkv"):
        np.testing.assert_allclose(g, d, atol=2e-5, rtol=1e-4, err_msg=f"d{what}")


def test_never_forms_a_quadratic_array():
    t, window = 512, 8
    q = jnp.zeros((1, t, 1, 4))
    jaxpr = jax.make_jaxpr(lambda q: sliding_window_attention(q, q, q, is_causal=False, window=window))(q)
    sizes = [int(np.prod(var.aval.shape)) for eqn in jaxpr.jaxpr.eqns for var in eqn.outvars]
    assert max(sizes) < 4 * t * window < t * t


def test_memory_model_is_linear_in_the_length():
    memory = FAMILIES["sliding_window"].memory
    small, large = (memory(Problem(1, n, 4, 64), {"window": 256}) for n in (4096, 8192))
    assert large == 2 * small


def test_bad_arguments_name_themselves():
    q, k, v = random_qkv(6, (2,), 8, None, 2, 4)
    with pytest.raises(ValueError, match="window"):
        sliding_window_attention(q, k, v, window=0)
    with pytest.raises(ValueError, match="block_size"):
        sliding_window_attention(q, k, v, window=2, block_size=0)
    with pytest.raises(ValueError, match=r"self-attention.*\(2, 8, 2, 4\).*\(2, 5, 2, 4\)"):
        sliding_window_attention(q, k[:, :5], v[:, :5], window=2)


# ---------------------------------------------------------------- the Trax layer

def _layers(x, *, window, block_size=None, **config):
    from trax import layers as tl
    from trax import shapes

    from labkit.layers import SlidingWindowSelfAttention

    kwargs = dict(n_heads=2, d_qk=4, d_v=4, **config)
    ref = tl.SelfAttention(**kwargs)
    ref.init(shapes.signature(x), rng=jax.random.PRNGKey(0))
    ours = SlidingWindowSelfAttention(window=window, block_size=block_size, **kwargs)
    ours.init(shapes.signature(x), rng=jax.random.PRNGKey(1))
    return ref, ours


@pytest.mark.parametrize("use_reference_code", [False, True])
@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_layer_with_a_wide_window_is_trax_self_attention(causal, use_reference_code):
    x = jnp.asarray(np.random.default_rng(7).normal(size=(2, 13, 8)), jnp.float32)
    ref, ours = _layers(x, window=13, block_size=4, causal=causal, use_reference_code=use_reference_code)
    rng = jax.random.PRNGKey(3)
    forward = lambda layer: (lambda w, x: layer.pure_fn(x, w, ref.state, rng)[0])
    np.testing.assert_allclose(forward(ours)(ref.weights, x), forward(ref)(ref.weights, x), atol=1e-5)
    gradients = [jax.grad(lambda w, x, f=forward(layer): (f(w, x) ** 2).sum(), argnums=(0, 1))(ref.weights, x)
                 for layer in (ours, ref)]
    for a, b in zip(*(jax.tree_util.tree_leaves(g) for g in gradients)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_layer_with_a_wide_window_and_a_padding_mask_is_trax_self_attention():
    x = jnp.asarray(np.random.default_rng(8).normal(size=(2, 10, 8)), jnp.float32)
    mask = jnp.asarray([[True] * 7 + [False] * 3, [True] * 10])
    ref, ours = _layers((x, mask), window=16, causal=False, masked=True)
    ours.weights = ref.weights  # the drop-in promise: copy weights, get the same layer
    np.testing.assert_allclose(ours((x, mask)), ref((x, mask)), atol=1e-5)


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_layer_with_a_narrow_window_is_band_masked_attention_per_head(causal):
    x = jnp.asarray(np.random.default_rng(9).normal(size=(2, 13, 8)), jnp.float32)
    ref, ours = _layers(x, window=3, block_size=5, causal=causal)
    ours.weights = ref.weights
    w_q, w_k, w_v, w_o = ref.weights  # [N, d_model, d] each, w_o [N, d_v, d_model]
    q, k, v = (jnp.einsum("btd,nde->btne", x, w) for w in (w_q, w_k, w_v))
    heads = dot_product_attention(q, k, v, mask=jnp.asarray(band(13, 3, causal)))  # [B, T, N, d_v]
    np.testing.assert_allclose(ours(x), jnp.einsum("btne,ned->btd", heads, w_o), atol=1e-5)


@pytest.mark.parametrize("bad,message", [(dict(share_qk=True), "share_qk"), (dict(chunk_len=4), "chunk_len"),
                                         (dict(attention_dropout=0.1), "attention_dropout"),
                                         (dict(mode="predict"), "predict"), (dict(window=0), "window")],
                         ids=lambda c: ",".join(c) if isinstance(c, dict) else None)
def test_layer_rejects_what_it_cannot_compute(bad, message):
    from labkit.layers import SlidingWindowSelfAttention

    with pytest.raises(ValueError, match=message):
        SlidingWindowSelfAttention(**{"n_heads": 2, "d_qk": 4, "d_v": 4, "window": 4, **bad})


def test_layer_inside_a_reformer_lm():
    from trax import layers as tl
    from trax import shapes
    from trax.models import ReformerLM

    from labkit.layers import SlidingWindowSelfAttention

    def lm(attention):  # ReformerLM builds each attention layer itself, passing its mode
        return ReformerLM(vocab_size=16, d_model=16, d_ff=32, n_layers=1, n_heads=2, max_len=16, dropout=0.0,
                          mode="train", attention_type=attention)

    tokens = jnp.asarray(np.tile(np.arange(16) % 4, (4, 1)), jnp.int32)  # a repeating pattern to learn
    ref, wide, narrow = lm(tl.SelfAttention), lm(functools.partial(SlidingWindowSelfAttention, window=16)), \
        lm(functools.partial(SlidingWindowSelfAttention, window=5, block_size=3))
    for model in (ref, wide, narrow):
        model.init(shapes.signature(tokens), rng=jax.random.PRNGKey(0))
    rng = jax.random.PRNGKey(1)

    def loss(model, w):
        logp = jax.nn.log_softmax(model.pure_fn(tokens, w, ref.state, rng)[0][:, :-1])
        return -jnp.take_along_axis(logp, tokens[:, 1:, None], -1).mean()

    np.testing.assert_allclose(loss(wide, ref.weights), loss(ref, ref.weights), rtol=1e-5)
    value_and_grad = jax.jit(jax.value_and_grad(functools.partial(loss, narrow)))
    weights = ref.weights
    first, g = value_and_grad(weights)
    for _ in range(5):
        weights = jax.tree_util.tree_map(lambda w, d: w - 0.1 * d, weights, g)
        last, g = value_and_grad(weights)
    assert np.isfinite(first) and last < first
