"""LSH attention against Trax (hash_vecs, tl.LSHSelfAttention), a brute-force float64 loop and dense attention."""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import trax
from trax import layers as tl
from trax import shapes
from trax.layers.research.efficient_attention import hash_vecs

from labkit.attention.local import local_attention
from labkit.attention.lsh import (default_n_buckets, hash_vectors, lsh_attention, lsh_attention_head,
                                  lsh_buckets)
from labkit.layers import LSHSelfAttention


def brute_force(q, v, buckets, n_hashes, chunk_len, before, after, causal, key_mask=None):
    """Plain-Python float64 LSH attention from the definition, given flat offset bucket ids.

    Also returns, per position, whether some round saw a visible key other than itself. Rows that only
    ever see themselves combine rounds whose logsumexps sit near -1e5 (the soft self-mask), where float32
    (Trax's arithmetic, and labkit's) resolves only ~0.008: those rows are exact only to ~1%.
    """
    q, v, buckets = np.asarray(q, np.float64), np.asarray(v, np.float64), np.asarray(buckets)
    t, h = q.shape
    items = sorted(range(n_hashes * t), key=lambda i: (buckets[i], i % t))  # (bucket, position)
    m = len(items)
    chunk_len = chunk_len or m
    n_chunks = -(-m // chunk_len)
    k = q / np.sqrt(np.mean(q**2, axis=-1, keepdims=True) + 1e-6) / np.sqrt(h)
    out, lse = np.zeros((n_hashes, t, v.shape[1])), np.zeros((n_hashes, t))
    sees_other = np.zeros(t, bool)
    for s, item in enumerate(items):
        i = item % t
        c = s // chunk_len
        window = [items[j] for off in range(-before, after + 1)
                  for j in range(((c + off) % n_chunks) * chunk_len, ((c + off) % n_chunks + 1) * chunk_len)
                  if j < m]
        pos = np.array([w % t for w in window])
        dots = k[pos] @ q[i] - 1e9 * (causal & (pos > i)) - 1e5 * (pos == i)
        if key_mask is not None:
            dots = dots - 1e9 * ~key_mask[pos]
        sees_other[i] |= bool(np.any(dots > -1e4))
        mx = dots.max()
        p = np.exp(dots - mx)
        out[item // t, i] = p @ v[pos] / p.sum()
        lse[item // t, i] = mx + np.log(p.sum())
    w = np.exp(lse - lse.max(0))
    return np.einsum("rt,rth->th", w / w.sum(0), out), sees_other


def _normal(seed, *shape):
    return jnp.asarray(np.random.default_rng(seed).normal(size=shape), jnp.float32)


# ------------------------------------------------------------------------------------------ hashing

@pytest.mark.parametrize("n_buckets,n_hashes", [(2, 1), (16, 3), ([4, 2], 1), ([8, 4], 3)])
def test_hash_vectors_equals_trax_hash_vecs(n_buckets, n_hashes):
    vecs, rng = _normal(0, 37, 8), jax.random.PRNGKey(3)
    theirs, total = hash_vecs(vecs, n_buckets, n_hashes, rng)
    ours = hash_vectors(vecs, n_buckets, n_hashes, rng)
    assert ours.dtype == jnp.int32 and ours.shape == (n_hashes, 37)
    np.testing.assert_array_equal(ours, theirs)
    assert int(ours.max()) < total


@pytest.mark.parametrize("seq_len,chunk_len,n_buckets,masked", [
    (16, 4, None, False), (16, 4, 4, True), (1040, 8, None, False)])  # 1040/8 -> 260 buckets, factorised
def test_lsh_buckets_equals_trax_layer_hash_vectors(seq_len, chunk_len, n_buckets, masked):
    layer = tl.LSHSelfAttention(n_heads=1, d_qk=8, d_v=8, chunk_len=chunk_len, n_buckets=n_buckets, n_hashes=2)
    vecs, rng = _normal(1, seq_len, 8), jax.random.PRNGKey(4)
    mask = jnp.asarray(np.random.default_rng(2).random(seq_len) > 0.3) if masked else None
    theirs = layer.hash_vectors(vecs, rng, mask)
    ours = lsh_buckets(vecs, n_buckets or default_n_buckets(seq_len, chunk_len), 2, rng, mask)
    np.testing.assert_array_equal(ours, theirs)


def test_similar_vectors_share_buckets_more_often_than_random_ones():
    base = _normal(5, 1, 16)
    similar = base + 0.05 * _normal(6, 64, 16)
    unrelated = _normal(7, 64, 16)
    hashes = jax.jit(lambda x: hash_vectors(x, 8, 8, jax.random.PRNGKey(0)))
    same = lambda x: float(jnp.mean(hashes(x) == hashes(base)))
    assert same(similar) > 0.9 and same(unrelated) < 0.4


# ------------------------------------------------------------------------------------------ one head

STATIC = ("n_hashes", "is_causal", "chunk_len", "n_chunks_before", "n_chunks_after")


@pytest.mark.parametrize("t,n_hashes,chunk_len,before,after,causal,masked", [
    (16, 1, 4, 1, 0, True, False),
    (16, 2, 4, 1, 0, False, False),
    (12, 4, 8, 1, 1, True, False),
    (7, 2, 4, 1, 0, True, False),    # 14 sorted items: the last chunk is padded
    (5, 1, 4, 2, 0, False, False),   # padded, with two chunks back
    (1, 3, 4, 1, 0, True, False),    # length 1: only itself to attend to
    (16, 2, 4, 1, 0, True, True),    # padding mask
    (9, 2, None, 0, 0, False, False),
])
def test_head_matches_brute_force(t, n_hashes, chunk_len, before, after, causal, masked):
    q, v = _normal(t, t, 6), _normal(t + 1, t, 5)
    mask = np.random.default_rng(t).random(t) > 0.3 if masked else None
    buckets = lsh_buckets(q, 4, n_hashes, jax.random.PRNGKey(t), mask)
    ours = jax.jit(lsh_attention_head, static_argnames=STATIC)(
        q, v, buckets, mask, n_hashes=n_hashes, is_causal=causal, chunk_len=chunk_len,
        n_chunks_before=before, n_chunks_after=after)
    expected, exact = brute_force(q, v, buckets, n_hashes, chunk_len, before, after, causal, mask)
    if masked:  # outputs at hidden positions are unspecified (as in Trax): compare the real tokens only
        ours, expected, exact = ours[mask], expected[mask], exact[mask]
    np.testing.assert_allclose(ours[exact], expected[exact], atol=2e-5, rtol=1e-4)
    np.testing.assert_allclose(ours[~exact], expected[~exact], atol=1e-5, rtol=1e-2)


@pytest.mark.parametrize("n_hashes", [1, 3])
@pytest.mark.parametrize("causal", [False, True])
def test_one_chunk_is_dense_shared_qk_attention(n_hashes, causal):
    """With every item in one chunk, each round sees all keys: LSH is exact (soft self-mask) attention."""
    q, v = _normal(0, 10, 4), _normal(1, 10, 4)
    buckets = lsh_buckets(q, 4, n_hashes, jax.random.PRNGKey(0))
    ours = jax.jit(lsh_attention_head, static_argnames=STATIC)(
        q, v, buckets, n_hashes=n_hashes, is_causal=causal, chunk_len=None, n_chunks_before=0)
    dense = local_attention(q[:, None], (q / jnp.sqrt(jnp.mean(q**2, -1, keepdims=True) + 1e-6))[:, None],
                            v[:, None], is_causal=causal, exclude_self=True)[:, 0]
    # Causal position 0 sees only its own copies, one per round (see brute_force): float32-exact to ~1%.
    np.testing.assert_allclose(ours[1:], dense[1:], atol=1e-5)
    np.testing.assert_allclose(ours[0], dense[0], rtol=1e-2 if causal and n_hashes > 1 else 1e-5, atol=1e-5)


def test_lsh_attention_layout_and_per_head_keys():
    query, value = _normal(0, 2, 16, 3, 4), _normal(1, 2, 16, 3, 5)
    key = jax.random.PRNGKey(1)
    run = jax.jit(lsh_attention, static_argnames=("is_causal", "chunk_len", "n_hashes"))
    out = run(query, None, value, is_causal=True, chunk_len=4, n_hashes=2, prng_key=key)
    assert out.shape == (2, 16, 3, 5)
    keys = jax.random.split(key, 6)
    b, n = 1, 2  # example 1, head 2 used key 1 * 3 + 2
    buckets = lsh_buckets(query[b, :, n], default_n_buckets(16, 4), 2, keys[b * 3 + n])
    one = jax.jit(lsh_attention_head, static_argnames=STATIC)(
        query[b, :, n], value[b, :, n], buckets, n_hashes=2, is_causal=True, chunk_len=4)
    np.testing.assert_allclose(out[b, :, n], one, atol=1e-6)


def test_bad_arguments_are_named():
    q = _normal(0, 1, 8, 2, 4)
    with pytest.raises(ValueError, match="prng_key"):
        lsh_attention(q, None, q)
    with pytest.raises(ValueError, match="query and value"):
        lsh_attention(q, None, q[:, :4], prng_key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="n_buckets must be even"):
        hash_vectors(q[0, :, 0], 3, 1, jax.random.PRNGKey(0))
    with pytest.raises(TypeError, match="query"):
        lsh_attention(jnp.zeros((1, 8, 2, 4), jnp.int32), None, q, prng_key=jax.random.PRNGKey(0))


# ------------------------------------------------------------------------------------------ the Trax layer

def _pair(seq, kw, batch=2, d_model=8):
    x = _normal(seq, batch, seq, d_model)
    ref = tl.LSHSelfAttention(**kw)
    ref.init(shapes.signature(x), rng=jax.random.PRNGKey(7))
    ours = LSHSelfAttention(**kw)
    ours.init(shapes.signature(x), rng=jax.random.PRNGKey(8))  # different init: weights are copied below
    return x, ref, ours


def _max_diff(a, b):
    return max(float(jnp.max(jnp.abs(jnp.asarray(x, jnp.float32) - jnp.asarray(y, jnp.float32))))
               for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


# Each Trax layer costs seconds to build and compile, so the grid is covered by few points: n_hashes 1, 2 and 4,
# each causal or not, both Trax code paths, chunk lengths 4 and 8, 2/4 buckets, Trax's default and a factorised
# [4, 2]; seq 6 with 4 rounds is 24 sorted items, chunks of 4 (4 does not divide 6 itself).
LAYER_GRID = [  # (use_reference_code, n_hashes, causal, seq, chunk_len, n_buckets)
    (False, 1, False, 16, 4, 4), (False, 2, True, 32, 8, None), (False, 4, True, 6, 4, 2),
    (True, 4, False, 16, 4, [4, 2]), (True, 1, True, 8, 4, 4),
]


@pytest.mark.parametrize("ref_code,n_hashes,causal,seq,chunk_len,n_buckets", LAYER_GRID)
def test_layer_matches_trax(ref_code, n_hashes, causal, seq, chunk_len, n_buckets):
    kw = dict(n_heads=2, d_qk=4, d_v=6, chunk_len=chunk_len, n_buckets=n_buckets, n_hashes=n_hashes,
              causal=causal, use_reference_code=ref_code)
    x, ref, ours = _pair(seq, kw)
    rng = jax.random.PRNGKey(5)
    out_ref, state_ref = ref.pure_fn(x, ref.weights, ref.state, rng)
    out, state = ours.pure_fn(x, ref.weights, ref.state, rng)
    assert _max_diff(out, out_ref) < 1e-5
    assert _max_diff(state, state_ref) == 0  # same bucket ids and next hashing rngs


def test_masked_layer_with_dropout_matches_trax():
    """Padding mask, attention and output dropout, fixed-size bucket state.

    Positions 0 and 1 stay visible: Trax's sign trick on 1-based positions cannot hide them.
    """
    kw = dict(n_heads=2, d_qk=4, d_v=4, chunk_len=4, n_hashes=2, causal=True, masked=True, attention_dropout=0.2,
              output_dropout=0.1, max_length_for_buckets=24)
    x = _normal(0, 2, 16, 8)
    mask = jnp.asarray(np.random.default_rng(1).random((2, 16)) > 0.3).at[:, :2].set(True)
    ref, ours = tl.LSHSelfAttention(**kw), LSHSelfAttention(**kw)
    ref.init(shapes.signature((x, mask)), rng=jax.random.PRNGKey(7))
    rng = jax.random.PRNGKey(5)
    out_ref, state_ref = ref.pure_fn((x, mask), ref.weights, ref.state, rng)
    out, state = ours.pure_fn((x, mask), ref.weights, ref.state, rng)
    keep = np.asarray(mask)  # outputs at padding positions are unspecified
    assert _max_diff(out[keep], out_ref[keep]) < 1e-5 and _max_diff(state, state_ref) == 0


def test_layer_gradients_match_trax():
    """Trax's own backward pass: it re-runs forward_unbatched with update_state=False on the new state."""
    kw = dict(n_heads=2, d_qk=4, d_v=4, chunk_len=4, n_hashes=2, causal=True)
    x, ref, ours = _pair(16, kw)
    cotangent = _normal(3, *x.shape)

    def grads(layer):
        loss = lambda x, w: jnp.sum(layer.pure_fn(x, w, ref.state, jax.random.PRNGKey(5))[0] * cotangent)
        return jax.grad(loss, argnums=(0, 1))(x, ref.weights)

    expected = grads(ref)
    scale = max(float(jnp.max(jnp.abs(g))) for g in jax.tree_util.tree_leaves(expected))
    assert _max_diff(grads(ours), expected) < 1e-5 * max(1.0, scale)


def test_runs_inside_reformer_lm_forward_and_one_training_step():
    model = trax.models.ReformerLM(
        vocab_size=16, d_model=16, d_ff=16, d_attention_key=4, d_attention_value=4, n_layers=1, n_heads=2,
        max_len=32, dropout=0.0, ff_activation=tl.Relu,
        attention_type=functools.partial(LSHSelfAttention, chunk_len=8, n_hashes=2))
    tokens = np.random.default_rng(0).integers(1, 16, (2, 32)).astype(np.int32)
    loss_layer = tl.Serial(model, tl.CrossEntropyLossWithLogSoftmax())
    batch = (tokens, tokens, np.ones_like(tokens, np.float32))
    loss_layer.init(shapes.signature(batch))
    weights, state = loss_layer.weights, loss_layer.state
    # A fixed rng and state: the same hashes before and after the step, so the losses are comparable.
    loss_fn = lambda w: loss_layer.pure_fn(batch, w, state, jax.random.PRNGKey(0))[0]
    loss_and_grads = jax.jit(jax.value_and_grad(loss_fn))
    loss, grads = loss_and_grads(weights)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))
    new_loss, _ = loss_and_grads(jax.tree_util.tree_map(lambda w, g: w - 0.5 * g, weights, grads))
    assert bool(jnp.isfinite(loss)) and float(new_loss) < float(loss)
