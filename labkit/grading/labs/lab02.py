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
from labkit.grading.harness import LazyTraxLayer, run_jitted, run_with_weights_of, trax_layer
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
    run=run_jitted,
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
                "the rotations are drawn in another shape: the same rng gives Trax's numbers only in the shape "
                "(dim, n_hashes, n_buckets // 2), in that order"),
        Mistake("one rotation for all rounds", functools.partial(_hash_with, shape="shared"),
                "each hash round needs its own random rotation, or all rounds give the same buckets"),
    ],
    default_hint="each round draws its own random rotation of n_buckets // 2 directions; a vector's bucket is "
                 "the half-axis (+R_j or -R_j) it points along most, as an int32 id per round and position",
    hints=(
        "draw all rotations at once with jax.random.normal in the shape the text gives, rotate the vectors "
        "with the einsum the text gives (the result is [n_hashes, T, n_buckets // 2]), put the rotated "
        "coordinates and their negatives side by side, and take the index of the largest along the last axis",
        "rotations = jax.random.normal(rng, (vecs.shape[-1], n_hashes, n_buckets // 2))\n"
        "rotated = jnp.einsum('tf,fhb->htb', vecs, rotations)\n"
        "rotated = jnp.concatenate([rotated, -rotated], axis=-1)\n"
        "return jnp.argmax(rotated, axis=-1).astype(jnp.int32)",
    ),
    answered_by=("labkit.attention.lsh.hash_vectors", "labkit.attention.lsh.lsh_buckets"),
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
    run=run_jitted,
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
                "the rounds are mixed together: offset round r's bucket ids by r * n_buckets before sorting, so "
                "that each round stays a block of its own"),
        Mistake("undo = order", functools.partial(_sort_with, undo_is_order=True),
                "undo must be the inverse permutation of order (undo[order[i]] = i for every i), not order "
                "itself: think of what sorting a permutation gives"),
    ],
    default_hint="items are sorted by (offset bucket, position): round r's ids are offset by r * n_buckets, "
                 "ties keep the original order, and undo is the inverse permutation of order",
    hints=(
        "offset the ids per round and flatten them to [n_hashes * T]; the sort key is the integer "
        "seq_len * offset bucket + position, where an item's position is its flat index modulo seq_len; "
        "jnp.argsort of the key gives order, and of order gives undo (both int32)",
        "n_hashes, seq_len = buckets.shape\n"
        "offsets = jnp.arange(n_hashes, dtype=jnp.int32)[:, None] * n_buckets\n"
        "ids = (buckets + offsets).reshape(-1)\n"
        "ticker = jnp.arange(n_hashes * seq_len, dtype=jnp.int32)\n"
        "order = jnp.argsort(seq_len * ids + ticker % seq_len).astype(jnp.int32)\n"
        "return order, jnp.argsort(order).astype(jnp.int32)",
    ),
    answered_by=("labkit.attention.lsh.sort_by_bucket",),
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
    run=run_jitted,
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
                "with shared QK a query always scores highest against itself: apply the soft self-mask (the "
                "text gives its size) where the query's original position equals the key's"),
        Mistake("causal by sorted index",
                functools.partial(_chunk_attention_with, causal_by_index=True),
                "after sorting, an item's index is not its position: compare the original positions "
                "(the `positions` array, looked-adjacent like the keys) for the causal mask"),
        Mistake("keys not length-normalised",
                functools.partial(_chunk_attention_with, normalise=False),
                "the keys are not the raw queries: they are the queries scaled to unit RMS (length_normalized), "
                "then divided by sqrt(d)"),
        Mistake("no look-back", functools.partial(_chunk_attention_with, before=0),
                "each chunk must also attend to the n_chunks_before chunks before it (keys, values and key "
                "positions alike): a bucket may be cut by a chunk boundary"),
    ],
    default_hint="check each step of the text in turn: chunks, length-normalised and scaled keys with their "
                 "look-back, the causal mask on original positions, the soft self-mask, then the softmax and "
                 "each row's logsumexp",
    hints=(
        "reshape sq, sv and positions into chunks of chunk_len; the keys are length_normalized of the query "
        "chunks divided by sqrt(d); look_adjacent(..., n_chunks_before, 0) gives each chunk its window of "
        "keys, values and key positions; subtract the masks from the scores, then take jax.nn.logsumexp over "
        "the window and exponentiate the difference for the weights",
        "chunks = lambda a: a.reshape(-1, chunk_len, *a.shape[1:])\n"
        "q, q_pos = chunks(sq), chunks(positions)\n"
        "k = look_adjacent(length_normalized(q) / jnp.sqrt(sq.shape[-1]), n_chunks_before, 0)\n"
        "v, kv_pos = look_adjacent(chunks(sv), n_chunks_before, 0), look_adjacent(q_pos, n_chunks_before, 0)\n"
        "dots = jnp.einsum('cld,cwd->clw', q, k)\n"
        "if is_causal:\n"
        "    dots = dots - 1e9 * (q_pos[:, :, None] < kv_pos[:, None, :])\n"
        "dots = dots - 1e5 * (q_pos[:, :, None] == kv_pos[:, None, :])\n"
        "lse = jax.nn.logsumexp(dots, axis=-1, keepdims=True)\n"
        "out = jnp.einsum('clw,cwd->cld', jnp.exp(dots - lse), v)\n"
        "return out.reshape(-1, out.shape[-1]), lse.reshape(-1)",
    ),
    answered_by=("labkit.attention.lsh.chunked_lsh_attention",),
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
    run=run_jitted,
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
                "x_sorted = x[order], so un-sorting needs the inverse permutation (undo), not order"),
        Mistake("plain average of rounds", functools.partial(_combine_with, weights="mean"),
                "the rounds are not equally good: weight each round by its share of the softmax mass, which "
                "its logsumexp measures"),
        Mistake("softmax over positions", functools.partial(_combine_with, weights="over positions"),
                "normalise the weights over the rounds (axis 0 of [n_hashes, T]), not over the positions"),
        Mistake("exp without subtracting the maximum", functools.partial(_combine_with, weights="naive"),
                "exp of a logsumexp near 1e3 overflows float32: subtract the logsumexp over the rounds (or their "
                "maximum) before exponentiating"),
    ],
    default_hint="two steps: put the sorted outputs and logsumexps back in their original order, then add up "
                 "the rounds, each weighted by its share of the softmax mass",
    hints=(
        "index the sorted arrays with undo and view them as [n_hashes, T, d_v] and [n_hashes, T]; the weights "
        "are a softmax of the logsumexps over the rounds (axis 0), computed stably; sum the weighted outputs "
        "over axis 0",
        "o = so[undo].reshape(n_hashes, -1, so.shape[-1])\n"
        "lse = slse[undo].reshape(n_hashes, -1)\n"
        "weights = jnp.exp(lse - jax.nn.logsumexp(lse, axis=0, keepdims=True))\n"
        "return jnp.sum(o * weights[..., None], axis=0)",
    ),
    answered_by=("labkit.attention.lsh.unsort", "labkit.attention.lsh.combine_hash_rounds"),
))


# ---------------------------------------------------------------- 5. the tl.LSHSelfAttention subclass

def _labkit_lsh_layer() -> type:
    """labkit's finished layer, what later cells use while the learner's does not pass (imports Trax)."""
    from labkit.layers import LSHSelfAttention

    return LSHSelfAttention


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
    fallback=_labkit_lsh_layer,
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
                "the self-mask is missing: with shared QK each query would attend mostly to itself"),
        Mistake("plain average of rounds", _layer_mistake(combine="mean"),
                "the hash rounds are averaged: weight them by their logsumexps, as in exercise 2.4"),
        Mistake("state not updated", _layer_mistake(keep_old_state=True),
                "the state is returned unchanged: when update_state is true, hash with a fresh sub-key of the "
                "state's rng and return the new flat, offset bucket ids and the new rng"),
    ],
    default_hint="one example, one head: queries and values from the weights; new hashes (and a new state) "
                 "when update_state is true, else the state's; then sort, attend in chunks, un-sort and combine "
                 "with the four functions of exercises 2.1 to 2.4; return (output, state)",
    hints=(
        "split the state's rng with jax.random.split (the first half is the new state's rng, the second "
        "hashes); the state stores the flat bucket ids with the per-round offsets, so hashes reused from it "
        "lose their offsets again (modulo n_buckets, reshaped to [n_hashes, T]); sorted item i is the "
        "original position order[i] modulo seq_len: gather q and v at those positions for attend_chunks",
        "w_q, w_v, w_o = weights\n"
        "q, v = x @ w_q, x @ w_v\n"
        "if update_state:\n"
        "    hash_rng, sub_rng = jax.random.split(state[1])\n"
        "    buckets = hash_buckets(q, n_buckets, n_hashes, sub_rng)\n"
        "    offsets = jnp.arange(n_hashes, dtype=jnp.int32)[:, None] * n_buckets\n"
        "    state = ((buckets + offsets).reshape(-1), hash_rng)\n"
        "else:\n"
        "    buckets = state[0].reshape(n_hashes, seq_len) % n_buckets\n"
        "order, undo = sort_items(buckets, n_buckets)\n"
        "positions = order % seq_len\n"
        "so, slse = attend_chunks(q[positions], v[positions], positions, self._chunk_len, self._causal,\n"
        "                         self._n_chunks_before)\n"
        "return combine_rounds(so, slse, order, undo, n_hashes) @ w_o, state",
    ),
    answered_by=("labkit.layers.LSHSelfAttention", "labkit.attention.lsh.lsh_attention_head",
                 "labkit.attention.lsh.lsh_attention"),
))
