"""Lab 02 exercises: Reformer LSH attention, step by step, then as a `tl.LSHSelfAttention` subclass."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from labkit.attention.local import length_normalized, look_adjacent
from labkit.attention.lsh import (chunked_lsh_attention, combine_hash_rounds, hash_vectors, lsh_attention_head,
                                  lsh_buckets, sort_by_bucket, unsort)
from labkit.grading.exercise import Case, Exercise, Mistake, hidden, register
from labkit.grading.harness import LazyTraxLayer, run_with_weights_of, trax_layer
from labkit.grading.inputs import layer_case as _layer_case, normal as _normal


# ---------------------------------------------------------------- 1. hashing

def hash_vectors_reference(vecs, n_buckets, n_hashes, rng):
    """`vecs [T, H]` -> int32 bucket ids `[n_hashes, T]`, as Trax's `hash_vecs(...)[0]`."""
    return hash_vectors(jnp.asarray(vecs), n_buckets, n_hashes, rng)


def _hash_with(vecs, n_buckets, n_hashes, rng, *, shape="trax", negate=True):
    """A wrong hash: rotations drawn in another shape or shared by the rounds, or no `-xR` half."""
    vecs = jnp.asarray(vecs)
    dim = vecs.shape[-1]
    if shape == "rounds first":
        rotations = jax.random.normal(rng, (n_hashes, dim, n_buckets // 2)).transpose(1, 0, 2)
    elif shape == "shared":
        rotations = jnp.repeat(jax.random.normal(rng, (dim, 1, n_buckets // 2)), n_hashes, axis=1)
    else:
        rotations = jax.random.normal(rng, (dim, n_hashes, n_buckets // 2))
    rotated = jnp.einsum("tf,fhb->htb", vecs, rotations)
    if negate:
        rotated = jnp.concatenate([rotated, -rotated], axis=-1)
    return jnp.argmax(rotated, axis=-1).astype(jnp.int32)


def _hash_case(name, seed, t, h, n_buckets, n_hashes, scale=1.0):
    def inputs():
        return (_normal(seed, t, h, scale=scale), n_buckets, n_hashes, jax.random.PRNGKey(seed)), {}
    return Case(name, inputs)


register(Exercise(
    id="lab02.hash_vectors",
    description="angular LSH: random rotations, argmax over [xR, -xR], one bucket per position and round",
    points=2,
    reference=hash_vectors_reference,
    cases=[
        _hash_case("tiny: 4 vectors of dim 2, 2 buckets, 1 round", 0, 4, 2, 2, 1),
        _hash_case("16 vectors of dim 8, 4 buckets, 3 rounds", 1, 16, 8, 4, 3),
        _hash_case("length 1: one vector, 8 buckets, 2 rounds", 2, 1, 4, 8, 2),
        _hash_case("64 vectors of dim 32, 16 buckets, 4 rounds", 3, 64, 32, 16, 4),
        _hash_case("large vectors (norm ~1e4), 8 buckets, 2 rounds", 4, 12, 16, 8, 2, scale=3e3),
        hidden(_hash_case("7 vectors of dim 6, 6 buckets, 3 rounds", 5, 7, 6, 6, 3)),
    ],
    mistakes=[
        Mistake("only xR", functools.partial(_hash_with, negate=False),
                "take the argmax over the concatenation [xR, -xR] of n_buckets // 2 rotated coordinates: the "
                "sign matters, and it gives n_buckets choices"),
        Mistake("rotations in another shape", functools.partial(_hash_with, shape="rounds first"),
                "draw the rotations with jax.random.normal(rng, (dim, n_hashes, n_buckets // 2)): the same rng "
                "only gives Trax's numbers in that shape"),
        Mistake("one rotation for all rounds", functools.partial(_hash_with, shape="shared"),
                "each hash round needs its own random rotation, or all rounds give the same buckets"),
    ],
    default_hint="rotations R ~ normal(rng, (dim, n_hashes, n_buckets // 2)); rotated = einsum('tf,fhb->htb', x, R); "
                 "bucket = argmax(concatenate([rotated, -rotated], -1), -1) as int32",
))


# ---------------------------------------------------------------- 2. sorting by bucket

def sort_buckets_reference(buckets, n_buckets):
    """`buckets [n_hashes, T]` (ids in `[0, n_buckets)`) -> `(order, undo)`, int32 `[n_hashes * T]`.

    Round r's ids are offset by `r * n_buckets`; items are sorted by (offset bucket, position);
    `undo` is the inverse permutation of `order`.
    """
    buckets = jnp.asarray(buckets, jnp.int32)
    n_hashes, seq_len = buckets.shape
    offsets = jnp.arange(n_hashes, dtype=jnp.int32)[:, None] * n_buckets
    return sort_by_bucket((buckets + offsets).reshape(-1), seq_len)


def _sort_with(buckets, n_buckets, *, offsets=True, undo_is_order=False):
    buckets = jnp.asarray(buckets, jnp.int32)
    n_hashes, seq_len = buckets.shape
    if offsets:
        buckets = buckets + jnp.arange(n_hashes, dtype=jnp.int32)[:, None] * n_buckets
    flat = buckets.reshape(-1)
    ticker = jnp.arange(flat.shape[0], dtype=jnp.int32)
    order = jnp.argsort(seq_len * flat + ticker % seq_len).astype(jnp.int32)
    undo = order if undo_is_order else jnp.argsort(order).astype(jnp.int32)
    return order, undo


def _sort_case(name, seed, t, n_buckets, n_hashes, constant=False):
    def inputs():
        rng = np.random.default_rng(seed)
        b = rng.integers(0, n_buckets, (n_hashes, t)).astype(np.int32)
        if constant:
            b[:] = 0
        return (b, n_buckets), {}
    return Case(name, inputs)


register(Exercise(
    id="lab02.sort_buckets",
    description="offset each round's bucket ids, sort by (bucket, position), and build the inverse permutation",
    points=2,
    reference=sort_buckets_reference,
    cases=[
        _sort_case("tiny: 1 round, 4 positions, 2 buckets", 0, 4, 2, 1),
        _sort_case("2 rounds, 8 positions, 4 buckets", 1, 8, 4, 2),
        _sort_case("length 1, 3 rounds", 2, 1, 4, 3),
        _sort_case("4 rounds, 16 positions, 8 buckets", 3, 16, 8, 4),
        _sort_case("every position in bucket 0, 2 rounds (order = original order)", 4, 6, 4, 2, constant=True),
        hidden(_sort_case("3 rounds, 7 positions, 6 buckets", 5, 7, 6, 3)),
    ],
    mistakes=[
        Mistake("no round offsets", functools.partial(_sort_with, offsets=False),
                "add r * n_buckets to the ids of round r before sorting, so each round stays a block of its own"),
        Mistake("undo = order", functools.partial(_sort_with, undo_is_order=True),
                "undo must be the inverse permutation of order (undo[order[i]] = i), e.g. jnp.argsort(order)"),
    ],
    default_hint="ids = buckets + r * n_buckets for round r, flattened; order = argsort(seq_len * ids + position); "
                 "undo = argsort(order)",
))


# ---------------------------------------------------------------- 3. attention inside chunks of sorted items

def chunk_attention_reference(sq, sv, positions, chunk_len, is_causal=False, n_chunks_before=1):
    """Sorted `sq [M, H]`, `sv [M, Hv]`, `positions [M]` -> `(out [M, Hv], logsumexp [M])`, as Trax's `attend`."""
    return chunked_lsh_attention(jnp.asarray(sq), jnp.asarray(sv), jnp.asarray(positions), is_causal=is_causal,
                                 chunk_len=chunk_len, n_chunks_before=n_chunks_before)


def _chunk_attention_with(sq, sv, positions, chunk_len, is_causal=False, n_chunks_before=1, *, self_mask=True,
                          causal_by_index=False, normalise=True, before=None):
    """A wrong in-chunk attention: no self-mask, causal by sorted index, raw keys, or no look-back."""
    sq, sv, positions = jnp.asarray(sq), jnp.asarray(sv), jnp.asarray(positions)
    before = n_chunks_before if before is None else before
    if causal_by_index:
        positions = jnp.arange(sq.shape[0])
    chunks = lambda a: a.reshape(-1, chunk_len, *a.shape[1:])
    q = chunks(sq)
    k = (length_normalized(q) if normalise else q) / np.sqrt(sq.shape[-1])
    k, v = look_adjacent(k, before, 0), look_adjacent(chunks(sv), before, 0)
    q_pos = chunks(positions)
    kv_pos = look_adjacent(q_pos, before, 0)
    dots = jnp.einsum("clh,cwh->clw", q, k)
    if is_causal:
        dots = dots - 1e9 * (q_pos[:, :, None] < kv_pos[:, None, :])
    if self_mask:
        dots = dots - 1e5 * (q_pos[:, :, None] == kv_pos[:, None, :])
    lse = jax.nn.logsumexp(dots, axis=-1, keepdims=True)
    out = jnp.einsum("clw,cwh->clh", jnp.exp(dots - lse), v)
    return out.reshape(-1, out.shape[-1]), lse.reshape(-1)


def _chunk_case(name, seed, t, n_hashes, h, chunk_len, causal, before=1):
    def inputs():
        rng = np.random.default_rng(seed)
        m = t * n_hashes
        positions = (rng.permutation(m) % t).astype(np.int32)  # as after sorting: each position once per round
        return (_normal(seed, m, h), _normal(seed + 1, m, h), positions, chunk_len), {
            "is_causal": causal, "n_chunks_before": before}
    return Case(name, inputs, atol=1e-5, rtol=1e-5)


register(Exercise(
    id="lab02.chunk_attention",
    description="attention within each chunk of sorted items and the chunk before: self-mask, causal mask, logsumexp",
    points=3,
    reference=chunk_attention_reference,
    cases=[
        _chunk_case("tiny: 8 items, chunks of 4, not causal", 0, 8, 1, 4, 4, False),
        _chunk_case("12 items, chunks of 4, causal", 1, 12, 1, 4, 4, True),
        _chunk_case("2 rounds (each position twice): 16 items, chunks of 4, causal", 2, 8, 2, 4, 4, True),
        _chunk_case("one chunk (4 items): the chunk before wraps around to itself", 3, 4, 1, 4, 4, False),
        _chunk_case("chunk_len 1: each item sees itself and the item before, causal", 4, 6, 1, 2, 1, True),
        _chunk_case("32 items, chunks of 8, dim 16, two chunks back, causal", 5, 16, 2, 16, 8, True, before=2),
        hidden(_chunk_case("3 rounds of 6 = 18 items, chunks of 3, dim 5, two chunks back, causal", 8, 6, 3, 5, 3,
                           True, before=2)),
    ],
    mistakes=[
        Mistake("no self-mask", functools.partial(_chunk_attention_with, self_mask=False),
                "with shared QK a query always scores highest against itself: subtract 1e5 from the scores where "
                "the query's position equals the key's position"),
        Mistake("causal by sorted index", functools.partial(_chunk_attention_with, causal_by_index=True),
                "after sorting, an item's index is not its position: compare the original positions "
                "(the `positions` array, looked-adjacent like the keys) for the causal mask"),
        Mistake("keys not length-normalised", functools.partial(_chunk_attention_with, normalise=False),
                "the keys are the queries scaled to unit RMS (length_normalized), then divided by sqrt(d)"),
        Mistake("no look-back", functools.partial(_chunk_attention_with, before=0),
                "each chunk must also attend to the previous chunk (look_adjacent(x, 1, 0)): a bucket may be cut "
                "by a chunk boundary"),
    ],
    default_hint="reshape to [n_chunks, chunk_len, d]; keys = length_normalized(q) / sqrt(d) looked-adjacent; "
                 "dots - 1e9 * (q_pos < kv_pos) if causal - 1e5 * (q_pos == kv_pos); return softmax @ v and the "
                 "logsumexp of each row",
))


# ---------------------------------------------------------------- 4. un-sorting and combining hash rounds

def unsort_and_combine_reference(so, slse, order, undo, n_hashes):
    """Sorted `so [n_hashes * T, Hv]`, `slse [n_hashes * T]` -> `[T, Hv]`: un-sort, weight rounds by logsumexp."""
    del order
    so, slse, undo = jnp.asarray(so), jnp.asarray(slse), jnp.asarray(undo)
    o = unsort(so, undo).reshape(n_hashes, -1, so.shape[-1])
    return combine_hash_rounds(o, unsort(slse, undo).reshape(n_hashes, -1))


def _combine_with(so, slse, order, undo, n_hashes, *, perm="undo", weights="softmax"):
    so, slse = jnp.asarray(so), jnp.asarray(slse)
    p = jnp.asarray(order if perm == "order" else undo)
    o = so[p].reshape(n_hashes, -1, so.shape[-1])
    lse = slse[p].reshape(n_hashes, -1)
    if weights == "mean":
        w = jnp.full_like(lse, 1.0 / n_hashes)
    elif weights == "naive":
        w = jnp.exp(lse) / jnp.sum(jnp.exp(lse), axis=0, keepdims=True)
    elif weights == "over positions":
        w = jax.nn.softmax(lse, axis=1)
    else:
        w = jax.nn.softmax(lse, axis=0)
    return jnp.sum(o * w[..., None], axis=0)


def _combine_case(name, seed, t, n_hashes, hv, lse_scale=1.0):
    def inputs():
        rng = np.random.default_rng(seed)
        order = rng.permutation(t * n_hashes).astype(np.int32)
        undo = np.argsort(order).astype(np.int32)
        return (_normal(seed, t * n_hashes, hv), _normal(seed + 1, t * n_hashes, scale=lse_scale), order, undo,
                n_hashes), {}
    return Case(name, inputs, atol=1e-5, rtol=1e-5)


register(Exercise(
    id="lab02.unsort_and_combine",
    description="put sorted outputs back in order and combine the hash rounds weighted by their logsumexp",
    points=2,
    reference=unsort_and_combine_reference,
    cases=[
        _combine_case("tiny: 1 round, 4 positions", 0, 4, 1, 3),
        _combine_case("2 rounds, 6 positions", 1, 6, 2, 4),
        _combine_case("4 rounds, 16 positions", 2, 16, 4, 8),
        _combine_case("length 1, 3 rounds", 3, 1, 3, 2),
        _combine_case("large logsumexps (up to ~1e3), 2 rounds", 4, 8, 2, 4, lse_scale=400.0),
        hidden(_combine_case("3 rounds, 7 positions, value dim 5, logsumexps up to ~100", 6, 7, 3, 5,
                             lse_scale=40.0)),
    ],
    mistakes=[
        Mistake("un-sorts with the sorting permutation", functools.partial(_combine_with, perm="order"),
                "x_sorted = x[order], so x = x_sorted[undo]: un-sort with the inverse permutation undo, not order"),
        Mistake("plain average of rounds", functools.partial(_combine_with, weights="mean"),
                "rounds are not equally good: weight round r by exp(lse_r - logsumexp over rounds), the share of "
                "the softmax mass that round saw"),
        Mistake("softmax over positions", functools.partial(_combine_with, weights="over positions"),
                "normalise the weights over the rounds (axis 0 of [n_hashes, T]), not over the positions"),
        Mistake("exp without subtracting the maximum", functools.partial(_combine_with, weights="naive"),
                "exp(lse) overflows for large logsumexps: use exp(lse - logsumexp(lse, axis=0)) (jax.nn.softmax)"),
    ],
    default_hint="o = so[undo].reshape(n_hashes, T, -1); lse = slse[undo].reshape(n_hashes, T); "
                 "w = softmax(lse, axis=0); return sum over rounds of o * w[..., None]",
))


# ---------------------------------------------------------------- 5. the tl.LSHSelfAttention subclass

# The layer must also store the hashes it used in its state: graded are (output, new bucket ids).
run_lsh_layer = run_with_weights_of("LSHSelfAttention", lambda output, state: (output, state[0]))


def _head_with(q, v, buckets, n_hashes, *, causal, chunk_len, n_chunks_before, self_mask=True, combine="softmax"):
    """LSH attention for one head with one of the chunk/combine mistakes above."""
    seq_len = q.shape[0]
    order, undo = sort_by_bucket(buckets, seq_len)
    positions = order % seq_len
    so, slse = _chunk_attention_with(jnp.take(q, positions, axis=0), jnp.take(v, positions, axis=0), positions,
                                     chunk_len, causal, n_chunks_before, self_mask=self_mask)
    return _combine_with(so, slse, order, undo, n_hashes, weights=combine)


def _layer_mistake(*, keep_old_state=False, **head_kwargs):
    """A tl.LSHSelfAttention subclass with a mistake (built on first use, so Trax loads lazily)."""

    def build(**kwargs):
        base = trax_layer("LSHSelfAttention")

        class Wrong(base):
            def forward_unbatched(self, x, mask=None, *, weights, state, rng, update_state):
                w_q, w_v, w_o = weights
                q, v = x @ w_q, x @ w_v
                old_buckets, old_rng = state
                hash_rng, sub = jax.random.split(old_rng)
                n_buckets = self._n_buckets or 2 * max(1, x.shape[0] // self._chunk_len)
                buckets = lsh_buckets(q, n_buckets, self._n_hashes, sub)
                if keep_old_state:
                    o = lsh_attention_head(q, v, buckets, n_hashes=self._n_hashes, is_causal=self._causal,
                                           chunk_len=self._chunk_len, n_chunks_before=self._n_chunks_before)
                    return o @ w_o, state
                o = _head_with(q, v, buckets, self._n_hashes, causal=self._causal, chunk_len=self._chunk_len,
                               n_chunks_before=self._n_chunks_before, **head_kwargs)
                return o @ w_o, (buckets, hash_rng)

        return Wrong(**kwargs)

    return build


register(Exercise(
    id="lab02.lsh_layer",
    description="subclass tl.LSHSelfAttention, override forward_unbatched; match Trax's outputs and hashes",
    points=3,
    reference=LazyTraxLayer("LSHSelfAttention"),
    run=run_lsh_layer,
    expects_class=True,
    cases=[
        _layer_case("one head, 1 round, seq 8, chunks of 4", 0, 1, 8, 8, n_heads=1, d_qk=4, d_v=4, chunk_len=4,
                    n_buckets=2, n_hashes=1),
        _layer_case("causal, 2 heads, 2 rounds, seq 16, chunks of 4", 1, 2, 16, 8, n_heads=2, d_qk=4, d_v=4,
                    chunk_len=4, n_buckets=4, n_hashes=2, causal=True),
        _layer_case("4 rounds of seq 6 = 24 sorted items in chunks of 4 (6 is not a multiple of 4)", 2, 1, 6, 8,
                    n_heads=2, d_qk=4, d_v=4, chunk_len=4, n_buckets=2, n_hashes=4, causal=True),
        _layer_case("use_reference_code=True, one chunk of 8 (the look-back wraps to itself)", 3, 1, 8, 8,
                    n_heads=1, d_qk=4, d_v=4, chunk_len=8, n_buckets=2, n_hashes=2, use_reference_code=True),
        _layer_case("mode='eval', default n_buckets, seq 32, chunks of 8, batch 2", 4, 2, 32, 8, n_heads=2,
                    d_qk=4, d_v=4, chunk_len=8, n_hashes=2, causal=True, mode="eval"),
        hidden(_layer_case("causal, 3 heads, 3 rounds of seq 12 in chunks of 4, 6 buckets, d_v 6", 6, 2, 12, 8,
                           n_heads=3, d_qk=4, d_v=6, chunk_len=4, n_buckets=6, n_hashes=3, causal=True)),
    ],
    mistakes=[
        Mistake("no self-mask", _layer_mistake(self_mask=False),
                "mask each query's own position (subtract 1e5): with shared QK it would attend mostly to itself"),
        Mistake("plain average of rounds", _layer_mistake(combine="mean"),
                "combine the hash rounds weighted by softmax over rounds of their logsumexps, not a plain mean"),
        Mistake("state not updated", _layer_mistake(keep_old_state=True),
                "return the new state (buckets, hash_rng): split the rng kept in the state, hash with the sub-key, "
                "and store the flat bucket ids and the new rng"),
    ],
    default_hint="per head: q = x @ w_q, v = x @ w_v; split the state's rng; hash q (offset ids); sort; attend in "
                 "chunks; un-sort; combine rounds; return (o @ w_o, (buckets, new_rng))",
))
