"""Chunked local attention against Trax's own `attend` and a brute-force windowed loop."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trax.layers.research import efficient_attention as ea

from labkit.attention.dense import dot_product_attention
from labkit.attention.local import local_attention, look_adjacent


def trax_attend(q, k, v, *, chunk_len, before, after, causal, share_qk=False):
    """Trax's reference for one head, with its own mask function."""
    mask_fn = lambda dots, qi, ki: ea.mask_self_attention(dots, qi, ki, causal=causal, exclude_self=share_qk)
    info = jnp.arange(q.shape[0], dtype=jnp.int32)
    out, _ = ea.attend(q, None if share_qk else k, v, q_chunk_len=chunk_len, kv_chunk_len=chunk_len,
                       n_chunks_before=before, n_chunks_after=after, mask_fn=mask_fn, q_info=info, kv_info=info)
    return out


def brute_force(q, k, v, chunk_len, before, after, causal, key_mask=None):
    """Loop over queries; each sees the keys of its chunk window (wrapping), by true position."""
    t, h = q.shape
    n_chunks = -(-t // chunk_len)
    out = np.zeros((t, v.shape[1]))
    for i in range(t):
        c = i // chunk_len
        keys = [j for off in range(-before, after + 1) for j in range(((c + off) % n_chunks) * chunk_len,
                                                                        ((c + off) % n_chunks + 1) * chunk_len)]
        keys = [j for j in keys if j < t and (not causal or j <= i) and (key_mask is None or key_mask[j])]
        s = np.array([q[i] @ k[j] / np.sqrt(h) for j in keys])
        p = np.exp(s - s.max())
        out[i] = (p / p.sum()) @ v[keys]
    return out


@pytest.mark.parametrize("chunk_len,before,after,causal", [
    (4, 1, 0, True), (4, 1, 0, False), (2, 2, 1, False), (8, 0, 0, True), (1, 1, 0, True), (4, 0, 1, False)])
def test_matches_trax_attend(rng, chunk_len, before, after, causal):
    q, k, v = (jnp.asarray(rng.normal(size=(16, 8)), jnp.float32) for _ in range(3))
    ours = local_attention(q[:, None], k[:, None], v[:, None], chunk_len=chunk_len, n_chunks_before=before,
                           n_chunks_after=after, is_causal=causal)[:, 0]
    theirs = trax_attend(q, k, v, chunk_len=chunk_len, before=before, after=after, causal=causal)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


def test_shared_qk_self_exclusion_matches_trax(rng):
    from labkit.attention.local import length_normalized

    q, v = (jnp.asarray(rng.normal(size=(12, 4)), jnp.float32) for _ in range(2))
    ours = local_attention(q[:, None], length_normalized(q)[:, None], v[:, None], chunk_len=4, n_chunks_before=1,
                           is_causal=True, exclude_self=True)[:, 0]
    theirs = trax_attend(q, None, v, chunk_len=4, before=1, after=0, causal=True, share_qk=True)
    np.testing.assert_allclose(ours, theirs, atol=1e-5)


@pytest.mark.parametrize("t,chunk_len", [(7, 3), (10, 4), (1, 4), (5, 5)])
@pytest.mark.parametrize("causal", [False, True])
def test_lengths_the_chunk_does_not_divide(rng, t, chunk_len, causal):
    q, k, v = (rng.normal(size=(t, 3)).astype(np.float32) for _ in range(3))
    key_mask = rng.random(t) > 0.2
    key_mask[0] = True
    ours = local_attention(q[:, None], k[:, None], v[:, None], mask=key_mask, chunk_len=chunk_len, n_chunks_before=1,
                           is_causal=causal)[:, 0]
    np.testing.assert_allclose(ours, brute_force(q, k, v, chunk_len, 1, 0, causal, key_mask), atol=1e-5)


def test_full_window_equals_dense_with_batch_and_heads(rng):
    q, k, v = (jnp.asarray(rng.normal(size=(2, 12, 3, 4)), jnp.float32) for _ in range(3))
    ours = local_attention(q, k, v, chunk_len=4, n_chunks_before=2, is_causal=True)  # 3 chunks: all visible
    np.testing.assert_allclose(ours, dot_product_attention(q, k, v, is_causal=True), atol=1e-5)
    np.testing.assert_allclose(local_attention(q, k, v), dot_product_attention(q, k, v), atol=1e-5)


def test_look_adjacent_wraps_like_trax():
    x = jnp.arange(12).reshape(4, 3)
    np.testing.assert_array_equal(look_adjacent(x, 1, 1), ea.look_adjacent(x, 1, 1))
    np.testing.assert_array_equal(look_adjacent(x, 2, 0), ea.look_adjacent(x, 2, 0))


def test_gradients_flow(rng):
    q, k, v = (jnp.asarray(rng.normal(size=(8, 1, 4)), jnp.float32) for _ in range(3))
    f = lambda q, k, v, **kw: (local_attention(q, k, v, **kw) ** 2).sum()
    g = jax.grad(f, argnums=(0, 1, 2))(q, k, v, chunk_len=4, n_chunks_before=1, is_causal=True)
    g_dense = jax.grad(lambda q, k, v: (dot_product_attention(q, k, v, is_causal=True) ** 2).sum(),
                       argnums=(0, 1, 2))(q, k, v)  # window covers everything for 2 chunks
    for a, b in zip(g, g_dense):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_bad_arguments(rng):
    q = rng.normal(size=(6, 1, 4)).astype(np.float32)
    with pytest.raises(ValueError, match="chunk_len"):
        local_attention(q, q, q, n_chunks_before=1)
    with pytest.raises(ValueError, match="chunk_len"):
        local_attention(q, q, q, chunk_len=0)
    with pytest.raises(ValueError, match="self-attention"):
        local_attention(q, q[:4], q[:4])
    with pytest.raises(ValueError, match="prng_key"):
        local_attention(q, q, q, dropout_rate=0.1)
