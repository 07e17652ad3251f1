"""labkit's dense attention against jax.nn.dot_product_attention and a float64 numpy computation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_qkv

from labkit.attention.dense import attention_weights, dot_product_attention


def numpy_attention(q, k, v, mask=None, causal=False, bias=None, scale=None):
    """Float64 reference on `[T, N, H]` arrays, written independently of labkit."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    scale = 1 / np.sqrt(q.shape[-1]) if scale is None else scale
    s = np.einsum("tnh,snh->nts", q, k) * scale
    if bias is not None:
        s = s + bias
    keep = np.ones(s.shape, bool)
    if mask is not None:
        keep &= mask
    if causal:
        keep &= np.tril(np.ones(s.shape[-2:], bool))
    s = np.where(keep, s, -1e30)
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    return np.einsum("nts,snh->tnh", p, v)


_qkv = functools.partial(random_qkv, as_jax=True)


@pytest.mark.parametrize("batch", [(), (2,), (2, 3)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t,s", [(1, 1), (5, 5), (4, 9), (16, 16)])
def test_matches_jax(rng, batch, causal, t, s):
    q, k, v = _qkv(rng, batch, t, s, 2, 8)
    mask = rng.random(batch + (2, t, s)) > 0.3
    ours = dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    if not batch:  # jax needs a batch dim
        theirs = jax.nn.dot_product_attention(q[None], k[None], v[None], mask=mask[None], is_causal=causal)[0]
    elif len(batch) == 1:
        theirs = jax.nn.dot_product_attention(q, k, v, mask=mask, is_causal=causal)
    else:
        flat = lambda a: a.reshape((-1,) + a.shape[2:])
        theirs = jax.nn.dot_product_attention(flat(q), flat(k), flat(v), mask=flat(mask), is_causal=causal)
        theirs = theirs.reshape(ours.shape)
    np.testing.assert_allclose(ours, theirs, atol=1e-6)


def test_bias_scale_and_value_dim_against_float64(rng):
    q, k, v = _qkv(rng, (), 6, 7, 3, 4, hv=5)
    bias = rng.normal(size=(3, 6, 7))
    ours = dot_product_attention(q, k, v, bias=bias, scale=0.3)
    np.testing.assert_allclose(ours, numpy_attention(q, k, v, bias=bias, scale=0.3), atol=1e-5)


def test_large_logits_do_not_overflow(rng):
    q, k, v = _qkv(rng, (2,), 8, 8, 2, 4, scale=100.0)  # logits ~ 1e4
    ours = dot_product_attention(q, k, v, is_causal=True)
    assert np.isfinite(np.asarray(ours)).all()
    for b in range(2):
        np.testing.assert_allclose(ours[b], numpy_attention(q[b], k[b], v[b], causal=True), atol=1e-5)


def test_fully_hidden_row_is_mean_of_values(rng):
    q, k, v = _qkv(rng, (), 4, 5, 1, 3)
    mask = np.ones((1, 4, 5), bool)
    mask[0, 2] = False
    out = dot_product_attention(q, k, v, mask=mask)
    np.testing.assert_allclose(out[2, 0], np.asarray(v)[:, 0].mean(0), atol=1e-6)
    np.testing.assert_allclose(
        out, jax.nn.dot_product_attention(q[None], k[None], v[None], mask=mask[None])[0], atol=1e-6)


def test_weights_rows_sum_to_one(rng):
    q, k, _ = _qkv(rng, (2,), 5, 6, 2, 4)
    w = attention_weights(q, k, is_causal=True)
    assert w.shape == (2, 2, 5, 6)
    np.testing.assert_allclose(w.sum(-1), 1.0, atol=1e-6)
    assert float(jnp.triu(w, k=1).max()) == 0.0


def test_gradients_match_jax(rng):
    q, k, v = _qkv(rng, (2,), 6, 6, 2, 4)
    loss = lambda f: lambda q, k, v: (f(q, k, v, is_causal=True) ** 2).sum()
    ours = jax.grad(loss(dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    theirs = jax.grad(loss(jax.nn.dot_product_attention), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(ours, theirs):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_bad_arguments_name_what_is_wrong(rng):
    q, k, v = _qkv(rng, (1,), 4, 4, 2, 8)
    with pytest.raises(ValueError, match="head dim"):
        dot_product_attention(q, k[..., :4], v)
    with pytest.raises(ValueError, match="sequence length"):
        dot_product_attention(q, k, v[:, :3])
    with pytest.raises(ValueError, match="rank"):
        dot_product_attention(q[0, :, 0], k, v)
    with pytest.raises(TypeError, match="query"):
        dot_product_attention(None, k, v)
    with pytest.raises(TypeError, match="floating"):
        dot_product_attention(q.astype(jnp.int32), k, v)
