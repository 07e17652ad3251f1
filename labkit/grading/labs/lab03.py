"""Lab 03 exercises: exact attention in chunks (Rabe & Staats): running max and sums, one query chunk with
`lax.scan`, all query chunks with `lax.map` and padding, the causal block skip, `jax.checkpoint`, and a
memory-efficient `tl.SelfAttention`. Registered in the order the notebook asks them."""

from __future__ import annotations

import functools
import importlib

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from labkit.grading.exercise import Case, Exercise, Mistake, hidden, register
from labkit.grading.harness import LazyTraxLayer, run_with_weights_of, self_attention_with
from labkit.grading.inputs import layer_case as _layer_case, normal as _normal

ANSWERED_BY_CHUNKED = ("labkit.attention.chunked.memory_efficient_attention",)
HIDDEN_SCORE = -1e30  # the score given to hidden keys (finite, so exp(HIDDEN - HIDDEN) is not NaN)


def dense_attention_np(q, k, v, *, scale=None, causal_start=None, kv_len=None):
    """Dense softmax attention for one head in float64 numpy (fast: no compilation), as float32.

    `q [T, H]`, `k [S, H]`, `v [S, Hv]`; `kv_len` keeps only the first keys; `causal_start` is the position
    of the first query when key j must be hidden from query i for j > i.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    if kv_len is not None:
        k, v = k[:kv_len], v[:kv_len]
    scores = q @ k.T * (1 / np.sqrt(q.shape[-1]) if scale is None else scale)
    if causal_start is not None:
        visible = (causal_start + np.arange(q.shape[0]))[:, None] >= np.arange(k.shape[0])[None, :]
        scores = np.where(visible, scores, -np.inf)
    weights = np.exp(scores - scores.max(-1, keepdims=True))
    return ((weights / weights.sum(-1, keepdims=True)) @ v).astype(np.float32)


def _chunks(n: int, size: int, drop_remainder: bool = False) -> list[slice]:
    stop = n - n % size if drop_remainder else n
    return [slice(start, min(start + size, n)) for start in range(0, stop, size)]


# ---------------------------------------------------------------- 3.1 one query, keys in chunks

def attend_one_query_reference(q, k, v, chunk_size):
    """One query `q [H]` against `k [S, H]`, `v [S, Hv]` -> `[Hv]` (the dense result; chunking is exact)."""
    del chunk_size
    return dense_attention_np(np.asarray(q)[None], k, v)[0]


def _one_query_with(q, k, v, chunk_size, *, rescale=True, subtract_max=True, normalise=True,
                    drop_remainder=False):
    """A written-out running-max/running-sum loop with one step done wrong."""
    q, k, v = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
    q = q / np.sqrt(q.shape[-1])
    acc = jnp.zeros(v.shape[-1], jnp.float32)
    total = jnp.float32(0.0)
    running_max = jnp.float32(-jnp.inf)
    for part in _chunks(k.shape[0], chunk_size, drop_remainder):
        s = k[part] @ q
        new_max = jnp.maximum(running_max, s.max()) if subtract_max else jnp.float32(0.0)
        correction = jnp.exp(running_max - new_max) if rescale and subtract_max else jnp.float32(1.0)
        p = jnp.exp(s - new_max)
        acc = acc * correction + p @ v[part]
        total = total * correction + p.sum()
        running_max = new_max
    return acc / total if normalise else acc


def _one_query_case(name, seed, s, h, chunk_size, *, logit_scale=1.0, hv=None):
    def inputs():
        q = _normal(seed, h, scale=logit_scale)
        k = _normal(seed + 1, s, h, scale=logit_scale)
        # Keys drawn so that the maximum score keeps rising from chunk to chunk: a missing rescale shows.
        k = k + np.linspace(0, 2, s, dtype=np.float32)[:, None] * np.sign(q)[None, :]
        return (q, k, _normal(seed + 2, s, hv or h), chunk_size), {}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


register(Exercise(
    id="lab03.attend_one_query",
    description="one query against keys in chunks: running maximum, running sums, rescaling",
    points=3,
    reference=attend_one_query_reference,
    cases=[
        _one_query_case("8 keys in chunks of 4, dim 4", 0, 8, 4, 4),
        _one_query_case("10 keys in chunks of 3 (the last chunk is shorter)", 10, 10, 4, 3, hv=6),
        _one_query_case("one key", 20, 1, 3, 4),
        _one_query_case("chunks of 1: the softmax one key at a time", 30, 6, 4, 1),
        _one_query_case("large logits: scores up to ~1e4", 40, 12, 8, 5, logit_scale=40.0),
        hidden(_one_query_case("13 keys in chunks of 5, dim 3, value dim 2", 50, 13, 3, 5, hv=2)),
    ],
    mistakes=[
        Mistake("old sums not rescaled", functools.partial(_one_query_with, rescale=False),
                "when a chunk raises the running maximum, the sums built so far were exponentiated against the "
                "old maximum: both of them (weighted values and normaliser) must be brought to the new one"),
        Mistake("no maximum subtracted", functools.partial(_one_query_with, subtract_max=False),
                "exp() of scores near 1e4 overflows to inf: exponentiate scores relative to the running maximum"),
        Mistake("last short chunk dropped", functools.partial(_one_query_with, drop_remainder=True),
                "the last keys are missing: when the chunk size does not divide the number of keys, the last "
                "chunk is shorter, and it still counts"),
        Mistake("not normalised", functools.partial(_one_query_with, normalise=False),
                "the weights do not sum to one: the weighted sum of values still has to be divided by the "
                "running normaliser"),
    ],
    default_hint="compare your loop with the three running quantities above the exercise (maximum, normaliser, "
                 "weighted sum): each chunk updates all three, and the result is only divided at the end",
    hints=(
        "per chunk: scores of the chunk's keys (scaled by 1/sqrt(d)), the new maximum, a correction factor "
        "exp(old maximum - new maximum) applied to both old sums, then the chunk's own exponentials added in; "
        "start from maximum -inf and sums 0",
        "q = q / jnp.sqrt(q.shape[-1])\n"
        "acc, total, m = jnp.zeros(v.shape[-1]), 0.0, -jnp.inf\n"
        "for start in range(0, k.shape[0], chunk_size):\n"
        "    s = k[start:start + chunk_size] @ q\n"
        "    new_m = jnp.maximum(m, s.max())\n"
        "    c, p = jnp.exp(m - new_m), jnp.exp(s - new_m)\n"
        "    acc, total, m = acc * c + p @ v[start:start + chunk_size], total * c + p.sum(), new_m\n"
        "return acc / total",
    ),
    answered_by=ANSWERED_BY_CHUNKED,
))


# ---------------------------------------------------------------- 3.2 one query chunk: lax.scan over key chunks

def attend_query_chunk_reference(q_blk, k_chunks, v_chunks, q_start, kv_len, is_causal=False):
    """One block of (already scaled) queries `[qc, H]` against padded key chunks `[nk, kc, H]`, `[nk, kc, Hv]`."""
    k = np.asarray(k_chunks).reshape(-1, k_chunks.shape[-1])
    v = np.asarray(v_chunks).reshape(-1, v_chunks.shape[-1])
    return dense_attention_np(q_blk, k, v, scale=1.0, kv_len=kv_len, causal_start=q_start if is_causal else None)


def _query_chunk_scan(q_blk, k_chunks, v_chunks, q_start, kv_len, is_causal=False, *, rescale=True,
                      hide_padding=True, ignore_causal=False, block_positions=False):
    """labkit's scan over key chunks for one query block (the fallback), or one with a step done wrong."""
    qc, kc = q_blk.shape[0], k_chunks.shape[1]
    q_pos = (0 if block_positions else q_start) + jnp.arange(qc)[:, None]

    def step(carry, xs):
        acc, total, running_max = carry
        j, k_blk, v_blk = xs
        k_pos = (0 if block_positions else j * kc) + jnp.arange(kc)[None, :]
        keep = (k_pos < kv_len) if hide_padding else jnp.ones((1, kc), bool)
        if is_causal and not ignore_causal:
            keep = keep & (k_pos <= q_pos)
        scores = jnp.where(keep, q_blk @ k_blk.T, HIDDEN_SCORE)
        new_max = jnp.maximum(running_max, scores.max(-1))
        correction = jnp.exp(running_max - new_max) if rescale else 1.0
        p = jnp.exp(scores - new_max[:, None])
        return (acc * correction[..., None] if rescale else acc) + p @ v_blk, \
            total * correction + p.sum(-1), new_max

    def scan_step(carry, xs):
        return step(carry, xs), None

    init = (jnp.zeros((qc, v_chunks.shape[-1]), jnp.float32), jnp.zeros(qc, jnp.float32),
            jnp.full(qc, HIDDEN_SCORE, jnp.float32))
    (acc, total, _), _ = lax.scan(scan_step, init, (jnp.arange(k_chunks.shape[0]), jnp.asarray(k_chunks, jnp.float32),
                                                    jnp.asarray(v_chunks, jnp.float32)))
    return acc / total[:, None]


def _query_chunk_case(name, seed, qc, nk, kc, h, q_start, kv_len, causal=False, *, logit_scale=1.0, hv=None):
    def inputs():
        q = _normal(seed, qc, h, scale=logit_scale) + 0.5
        k = _normal(seed + 1, nk * kc, h, scale=logit_scale)
        # Scores rise along the keys, so the running maximum moves from chunk to chunk. The padded slots
        # (after kv_len) hold keys too: the chunk function must hide them, whatever they hold.
        k = k + np.linspace(0, 2, nk * kc, dtype=np.float32)[:, None]
        v = _normal(seed + 2, nk * kc, hv or h)
        return (q, k.reshape(nk, kc, h), v.reshape(nk, kc, hv or h), q_start, kv_len), {"is_causal": causal}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


register(Exercise(
    id="lab03.attend_query_chunk",
    description="one block of queries against all key chunks: lax.scan carrying running sums and maxima",
    points=3,
    reference=attend_query_chunk_reference,
    fallback=lambda: _query_chunk_scan,
    cases=[
        _query_chunk_case("4 queries, 8 keys in 2 chunks of 4, dim 4", 0, 4, 2, 4, 4, 0, 8),
        _query_chunk_case("7 keys in 3 chunks of 3: 2 padded slots to hide", 10, 3, 3, 3, 4, 0, 7, hv=5),
        _query_chunk_case("length 1: one query, one key", 20, 1, 1, 1, 3, 0, 1),
        _query_chunk_case("causal, queries 4..7 against 12 keys in chunks of 4", 30, 4, 3, 4, 4, 4, 12,
                          causal=True),
        _query_chunk_case("causal, queries 0..1: later key chunks hide whole rows", 40, 2, 4, 2, 4, 0, 8,
                          causal=True),
        _query_chunk_case("causal, queries 6..8, 10 keys in chunks of 4", 50, 3, 3, 4, 4, 6, 10, causal=True),
        _query_chunk_case("large logits: scores up to ~1e4", 60, 4, 3, 4, 8, 0, 12, logit_scale=30.0),
        hidden(_query_chunk_case("causal, queries 5..7, 11 keys in chunks of 5, value dim 2", 70, 3, 3, 5, 3, 5,
                                 11, causal=True, hv=2)),
    ],
    mistakes=[
        Mistake("old sums not rescaled", functools.partial(_query_chunk_scan, rescale=False),
                "the carried sums were computed against the previous running maximum: when a key chunk raises "
                "a row's maximum, both carried sums of that row must be brought to the new maximum"),
        Mistake("padded keys not hidden", functools.partial(_query_chunk_scan, hide_padding=False),
                "the key slots from kv_len on are padding, not keys: hide them (a very negative score) so they "
                "get no weight"),
        Mistake("causal ignored", functools.partial(_query_chunk_scan, ignore_causal=True),
                "with is_causal=True a query must not see keys at later positions: hide those scores before the "
                "running maximum"),
        Mistake("positions inside the block", functools.partial(_query_chunk_scan, block_positions=True),
                "compare positions in the whole sequence, not inside the blocks: this block's queries start at "
                "q_start, and key chunk j starts j chunks into the keys"),
    ],
    default_hint="check the three things the step does for every key chunk: hide what must not be seen "
                 "(padding, and later keys when causal), update the running maximum, rescale and add",
    hints=(
        "write step(carry, xs) for lax.scan: carry = (weighted sums [qc, Hv], normalisers [qc], maxima [qc]); "
        "xs = (chunk index j, key chunk, value chunk), so the step can compute global key positions and "
        "compare them with kv_len and with the queries' positions; jnp.where hides scores",
        "qc, kc = q_blk.shape[0], k_chunks.shape[1]\n"
        "q_pos = q_start + jnp.arange(qc)[:, None]\n"
        "def step(carry, xs):\n"
        "    acc, total, m = carry\n"
        "    j, k_blk, v_blk = xs\n"
        "    k_pos = j * kc + jnp.arange(kc)[None, :]\n"
        "    keep = (k_pos < kv_len) & ((k_pos <= q_pos) if is_causal else True)\n"
        "    s = jnp.where(keep, q_blk @ k_blk.T, -1e30)\n"
        "    new_m = jnp.maximum(m, s.max(-1))\n"
        "    c, p = jnp.exp(m - new_m), jnp.exp(s - new_m[:, None])\n"
        "    return (acc * c[:, None] + p @ v_blk, total * c + p.sum(-1), new_m), None\n"
        "init = (jnp.zeros((qc, v_chunks.shape[-1])), jnp.zeros(qc), jnp.full(qc, -1e30))\n"
        "(acc, total, _), _ = lax.scan(step, init, (jnp.arange(k_chunks.shape[0]), k_chunks, v_chunks))\n"
        "return acc / total[:, None]",
    ),
    answered_by=ANSWERED_BY_CHUNKED,
))


# ---------------------------------------------------------------- 3.3 all query chunks: padding and lax.map

def chunked_attention_reference(q, k, v, query_chunk_size, key_chunk_size, is_causal=False, chunk_fn=None):
    """One head: `q [T, H]`, `k [S, H]`, `v [S, Hv]` -> `[T, Hv]`, exact (the expected values of the cases)."""
    del query_chunk_size, key_chunk_size, chunk_fn  # chunking is exact: the dense result
    return dense_attention_np(q, k, v, causal_start=0 if is_causal else None)


def _chunked_map(q, k, v, query_chunk_size, key_chunk_size, is_causal=False, chunk_fn=None, *, scale=True,
                 padded_length=False, chunk_index_as_start=False):
    """labkit's pad + lax.map over query chunks (the fallback, `chunk_fn` as given), or one with a step wrong."""
    chunk_fn = chunk_fn or _query_chunk_scan
    q, k, v = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
    t, s = q.shape[0], k.shape[0]
    qc, kc = min(query_chunk_size, t), min(key_chunk_size, s)
    nq, nk = -(-t // qc), -(-s // kc)
    q = q / jnp.sqrt(q.shape[-1]) if scale else q
    q = jnp.pad(q, ((0, nq * qc - t), (0, 0))).reshape(nq, qc, -1)
    k = jnp.pad(k, ((0, nk * kc - s), (0, 0))).reshape(nk, kc, -1)
    v = jnp.pad(v, ((0, nk * kc - s), (0, 0))).reshape(nk, kc, -1)
    kv_len = nk * kc if padded_length else s
    out = lax.map(lambda xs: chunk_fn(xs[1], k, v, xs[0] * (1 if chunk_index_as_start else qc), kv_len, is_causal),
                  (jnp.arange(nq), q))
    return out.reshape(nq * qc, -1)[:t]


def _chunked_case(name, seed, t, s, h, qc, kc, causal=False, *, logit_scale=1.0, hv=None):
    def inputs():
        q = _normal(seed, t, h, scale=logit_scale)
        k = _normal(seed + 1, s, h, scale=logit_scale) + np.linspace(0, 2, s, dtype=np.float32)[:, None]
        return (q + 1.0, k, _normal(seed + 2, s, hv or h), qc, kc), {"is_causal": causal}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


register(Exercise(
    id="lab03.chunked_attention",
    description="exact attention for one head: scale, pad to whole chunks, lax.map over query chunks, crop",
    points=3,
    reference=chunked_attention_reference,
    fallback=lambda: _chunked_map,
    cases=[
        _chunked_case("seq 8, chunks 4 x 4", 0, 8, 8, 4, 4, 4),
        _chunked_case("10 queries, 7 keys, chunks 3 x 2 (neither divides)", 10, 10, 7, 4, 3, 2, hv=5),
        _chunked_case("length 1", 20, 1, 1, 3, 4, 4),
        _chunked_case("causal, seq 12, chunks 4 x 4", 30, 12, 12, 4, 4, 4, causal=True),
        _chunked_case("causal, seq 10, chunks 4 x 3", 40, 10, 10, 4, 4, 3, causal=True),
        _chunked_case("large logits, seq 16, chunks 8 x 4", 50, 16, 16, 8, 8, 4, logit_scale=30.0),
        hidden(_chunked_case("causal, seq 11, dim 3, value dim 2, chunks 3 x 5", 60, 11, 11, 3, 3, 5, causal=True,
                             hv=2)),
    ],
    mistakes=[
        Mistake("missing scale", functools.partial(_chunked_map, scale=False),
                "the scores are not divided by sqrt(d): fold the scale into the queries once, before the chunks"),
        Mistake("padded length passed as kv_len", functools.partial(_chunked_map, padded_length=True),
                "the chunk function hides key slots from kv_len on: tell it how many keys are real, not how "
                "many slots the padded chunks have"),
        Mistake("chunk index as q_start", functools.partial(_chunked_map, chunk_index_as_start=True),
                "q_start is a position in the sequence, not a chunk number: query chunk i starts i whole "
                "chunks into the queries (it matters for causal attention)"),
    ],
    default_hint="check the bookkeeping around the chunk function: the scale, the padding to whole chunks, "
                 "where each query chunk starts, how many keys are real, and cropping the padded rows away",
    hints=(
        "pad q, k and v along the sequence to a multiple of their chunk size (jnp.pad) and reshape them to "
        "[n_chunks, chunk, dim]; lax.map then takes (chunk index, query chunk) pairs and calls chunk_fn with "
        "its six arguments in order; reshape the result back to [n_chunks * chunk, Hv] and keep the first T rows",
        "t, s = q.shape[0], k.shape[0]\n"
        "qc, kc = min(query_chunk_size, t), min(key_chunk_size, s)\n"
        "nq, nk = -(-t // qc), -(-s // kc)\n"
        "q = jnp.pad(q / jnp.sqrt(q.shape[-1]), ((0, nq * qc - t), (0, 0))).reshape(nq, qc, -1)\n"
        "k = jnp.pad(k, ((0, nk * kc - s), (0, 0))).reshape(nk, kc, -1)\n"
        "v = jnp.pad(v, ((0, nk * kc - s), (0, 0))).reshape(nk, kc, -1)\n"
        "out = lax.map(lambda x: chunk_fn(x[1], k, v, x[0] * qc, s, is_causal), (jnp.arange(nq), q))\n"
        "return out.reshape(nq * qc, -1)[:t]",
    ),
    answered_by=ANSWERED_BY_CHUNKED,
))


# ---------------------------------------------------------------- 3.4 which blocks causal attention needs

SKIP, FULL, MASKED = 0, 1, 2


def block_kind_reference(i, j, query_chunk_size, key_chunk_size):
    """Causal block (query chunk i, key chunk j): SKIP (0) above the diagonal, FULL (1) below it, else MASKED (2)."""
    first_query, last_query = i * query_chunk_size, (i + 1) * query_chunk_size - 1
    first_key, last_key = j * key_chunk_size, (j + 1) * key_chunk_size - 1
    if first_key > last_query:
        return SKIP
    if last_key <= first_query:
        return FULL
    return MASKED


def run_block_table(candidate, args, kwargs):
    """The candidate's kinds for every block of a `seq_len` causal attention, as an int array [nq, nk]."""
    seq_len, qc, kc = args
    nq, nk = -(-seq_len // qc), -(-seq_len // kc)
    return np.array([[int(candidate(i, j, qc, kc)) for j in range(nk)] for i in range(nq)], np.int64)


def _block_by_index(i, j, query_chunk_size, key_chunk_size):
    return SKIP if j > i else MASKED if j == i else FULL


def _block_skip_touching(i, j, query_chunk_size, key_chunk_size):
    if j * key_chunk_size >= (i + 1) * query_chunk_size - 1:
        return SKIP
    return block_kind_reference(i, j, query_chunk_size, key_chunk_size)


def _block_no_mask_on_diagonal(i, j, query_chunk_size, key_chunk_size):
    kind = block_kind_reference(i, j, query_chunk_size, key_chunk_size)
    return FULL if kind == MASKED and j * key_chunk_size <= i * query_chunk_size else kind


register(Exercise(
    id="lab03.block_kind",
    description="causal attention: which [query_chunk, key_chunk] blocks to skip, compute plainly, or mask",
    points=2,
    reference=block_kind_reference,
    run=run_block_table,
    cases=[
        Case("seq 8, chunks 4 x 4", lambda: ((8, 4, 4), {})),
        Case("seq 12, queries in 4s, keys in 2s", lambda: ((12, 4, 2), {})),
        Case("seq 12, queries in 2s, keys in 4s", lambda: ((12, 2, 4), {})),
        Case("chunks of 1", lambda: ((5, 1, 1), {})),
        Case("seq 15, chunks 3 x 5", lambda: ((15, 3, 5), {})),
        hidden(Case("seq 14, queries in 3s, keys in 4s (neither divides)", lambda: ((14, 3, 4), {}))),
    ],
    mistakes=[
        Mistake("chunk indices instead of positions", _block_by_index,
                "compare positions, not chunk numbers: query chunk i and key chunk j cover different position "
                "ranges when the two chunk sizes differ"),
        Mistake("skips a block the last query needs", _block_skip_touching,
                "a query sees the key at its own position: a block may be skipped only when its first key comes "
                "strictly after its last query"),
        Mistake("diagonal block not masked", _block_no_mask_on_diagonal,
                "a block is fully visible only when its LAST key is at or before its FIRST query; any other "
                "block that is not skipped needs the causal mask"),
    ],
    default_hint="work out the first and last position each block covers, for its queries and for its keys; "
                 "the answer depends only on how those four positions compare",
    hints=(
        "query chunk i covers positions i*qc to (i+1)*qc - 1, key chunk j covers j*kc to (j+1)*kc - 1; skip "
        "when the earliest key is later than the latest query, full when the latest key is not later than the "
        "earliest query, masked otherwise",
        "first_query, last_query = i * query_chunk_size, (i + 1) * query_chunk_size - 1\n"
        "first_key, last_key = j * key_chunk_size, (j + 1) * key_chunk_size - 1\n"
        "if first_key > last_query:\n    return 0\n"
        "if last_key <= first_query:\n    return 1\n"
        "return 2",
    ),
))


# ---------------------------------------------------------------- 3.5 jax.checkpoint on the query chunk

def checkpoint_chunk_reference(chunk_fn):
    """`chunk_fn` whose backward pass recomputes the chunk's blocks instead of storing them."""
    return jax.checkpoint(chunk_fn, static_argnums=(5,))


def kept_for_backward(fn, *args) -> int:
    """How many floats `jax.vjp(fn, *args)` keeps for the backward pass (the leaves of its vjp function)."""
    _, vjp = jax.vjp(fn, *args)
    return sum(int(np.size(leaf)) for leaf in jax.tree_util.tree_leaves(vjp))


def run_checkpointed(candidate, args, kwargs):
    """labkit's chunked attention built on `candidate(labkit's chunk function)`, graded on what it keeps.

    `kept`: the floats `jax.vjp` keeps for the backward pass (the leaves of its vjp function), in units of one
    `[T, H]` array, rounded; found by tracing alone. Cases with `values=True` also compute, jitted, the output
    and the gradients `(dq, dk, dv)` of `sum(out * cotangent)`: `(out, grads, kept)`; the others give `kept`.
    """
    q, k, v, cotangent = (jnp.asarray(a, jnp.float32) for a in args[:4])
    qc, kc = args[4:]
    chunk_fn = candidate(_query_chunk_scan)
    kept = []

    def forward_backward(q, k, v, cotangent):
        out, vjp = jax.vjp(lambda q, k, v: _chunked_map(q, k, v, qc, kc, kwargs["is_causal"], chunk_fn=chunk_fn),
                           q, k, v)
        kept.append(sum(int(np.prod(leaf.shape)) for leaf in jax.tree_util.tree_leaves(vjp)))
        return out, tuple(vjp(cotangent))

    if not kwargs.get("values"):
        jax.eval_shape(forward_backward, q, k, v, cotangent)
        return int(round(kept[0] / q.size))
    if candidate is checkpoint_chunk_reference:  # expected values: trace only (for `kept`), values from numpy
        jax.eval_shape(forward_backward, q, k, v, cotangent)
        out, grads = _attention_and_grads_np(*args[:4], is_causal=kwargs["is_causal"])
    else:
        out, grads = jax.jit(forward_backward)(q, k, v, cotangent)
    return out, grads, int(round(kept[0] / q.size))


def _attention_and_grads_np(q, k, v, cotangent, *, is_causal):
    """Dense attention and its gradients w.r.t. q, k, v for the loss sum(out * cotangent), float64 numpy."""
    q, k, v, cotangent = (np.asarray(a, np.float64) for a in (q, k, v, cotangent))
    scale = 1 / np.sqrt(q.shape[-1])
    scores = q @ k.T * scale
    if is_causal:
        scores = np.where(np.tril(np.ones(scores.shape, bool)), scores, -np.inf)
    p = np.exp(scores - scores.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    d_p = cotangent @ v.T
    d_scores = p * (d_p - (d_p * p).sum(-1, keepdims=True))
    grads = (d_scores @ k * scale, d_scores.T @ q * scale, p.T @ cotangent)
    return (p @ v).astype(np.float32), tuple(g.astype(np.float32) for g in grads)


def _checkpoint_case(name, seed, t, h, qc, kc, causal=False, values=False):
    def inputs():
        q, k, v, cot = (_normal(seed + i, t, h) for i in range(4))
        return (q, k, v, cot, qc, kc), {"is_causal": causal, "values": values}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


def _keep_dots(chunk_fn):
    return jax.checkpoint(chunk_fn, static_argnums=(5,), policy=jax.checkpoint_policies.dots_saveable)


register(Exercise(
    id="lab03.checkpoint_chunk",
    description="jax.checkpoint on the query-chunk function: same values and gradients, blocks recomputed",
    points=2,
    reference=checkpoint_chunk_reference,
    run=run_checkpointed,
    cases=[
        _checkpoint_case("causal, seq 16, chunks 4 x 4: values, gradients, what is kept", 0, 16, 4, 4, 4,
                         causal=True, values=True),
        _checkpoint_case("seq 8, chunks 4 x 4: what is kept", 10, 8, 4, 4, 4),
        _checkpoint_case("seq 10, chunks 4 x 3 (neither divides): what is kept", 20, 10, 4, 4, 3),
        _checkpoint_case("causal, seq 32, chunks 8 x 8: what is kept", 30, 32, 8, 8, 8, causal=True),
        hidden(_checkpoint_case("causal, seq 24, dim 3, chunks 6 x 4", 40, 24, 3, 6, 4, causal=True, values=True)),
    ],
    mistakes=[
        Mistake("returned unchanged", lambda chunk_fn: chunk_fn,
                "the values and gradients are right, but the backward pass still keeps every block of every "
                "query chunk (the count of what it keeps is too high): the function has to be wrapped so that its "
                "backward pass recomputes it"),
        Mistake("matrix products saved", _keep_dots,
                "a checkpoint policy that saves the matrix products keeps the score blocks, the very thing that "
                "grows with T x S: use no policy, so only the chunk's inputs are kept"),
    ],
    default_hint="the check counts what the backward pass keeps, in [T, d] arrays (the first case also compares "
                 "the attention and its gradients first): a checkpointed chunk function keeps little more than "
                 "its inputs, three such arrays",
    hints=(
        "jax.checkpoint(f) returns f with the same values, whose backward pass recomputes f's inside; "
        "is_causal (argument 5) is a Python bool that chunk_fn branches on, so it must be marked static "
        "(static_argnums), or tracing fails",
        "return jax.checkpoint(chunk_fn, static_argnums=(5,))",
    ),
))


# ---------------------------------------------------------------- 3.6 the Trax layer

def _chunked_with(q, k, v, query_chunk_size, key_chunk_size, causal=False, *, rescale=True, ignore_causal=False):
    """Blockwise attention written with Python loops (for the layer's mistakes), with one step done wrong."""
    q, k, v = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
    t, s = q.shape[0], k.shape[0]
    q = q / np.sqrt(q.shape[-1])
    outs = []
    for qs in _chunks(t, query_chunk_size):
        q_pos = jnp.arange(t)[qs][:, None]
        acc = jnp.zeros((q_pos.shape[0], v.shape[-1]), jnp.float32)
        total = jnp.zeros((q_pos.shape[0], 1), jnp.float32)
        m = jnp.full((q_pos.shape[0], 1), HIDDEN_SCORE, jnp.float32)
        for ks in _chunks(s, key_chunk_size):
            sc = q[qs] @ k[ks].T
            if causal and not ignore_causal:
                sc = jnp.where(jnp.arange(s)[ks][None, :] <= q_pos, sc, HIDDEN_SCORE)
            new_m = jnp.maximum(m, sc.max(-1, keepdims=True))
            corr = jnp.exp(m - new_m) if rescale else 1.0
            p = jnp.exp(sc - new_m)
            acc, total, m = acc * corr + p @ v[ks], total * corr + p.sum(-1, keepdims=True), new_m
        outs.append(acc / total)
    return jnp.concatenate(outs, axis=0)


def _layer_mistake(**options):
    """A SelfAttention subclass built on the chunked loops above, with one mistake."""
    return self_attention_with(lambda q, k, v, causal: _chunked_with(q, k, v, 4, 4, causal, **options))


def _memory_efficient_layer():
    return importlib.import_module("labkit.layers").MemoryEfficientSelfAttention


register(Exercise(
    id="lab03.memory_efficient_layer",
    description="a tl.SelfAttention subclass whose forward_unbatched uses chunked attention; matches Trax",
    points=3,
    reference=LazyTraxLayer("SelfAttention"),
    fallback=_memory_efficient_layer,
    run=run_with_weights_of("SelfAttention"),
    expects_class=True,
    cases=[
        _layer_case("one head, seq 4, d_model 8", 0, 1, 4, 8, n_heads=1, d_qk=4, d_v=4),
        _layer_case("causal, 2 heads, seq 8", 1, 2, 8, 8, n_heads=2, d_qk=4, d_v=4, causal=True),
        _layer_case("seq 13, d_qk 4, d_v 6, causal", 2, 2, 13, 10, n_heads=2, d_qk=4, d_v=6, causal=True),
        _layer_case("use_reference_code=True, seq 16", 3, 2, 16, 8, n_heads=2, d_qk=4, d_v=4,
                    use_reference_code=True),
        _layer_case("mode='eval', seq 1", 4, 2, 1, 8, n_heads=2, d_qk=4, d_v=4, mode="eval"),
        hidden(_layer_case("causal, 3 heads, seq 11, d_qk 2, d_v 5, d_model 6", 6, 1, 11, 6, n_heads=3, d_qk=2,
                           d_v=5, causal=True)),
    ],
    mistakes=[
        Mistake("ignores causal", _layer_mistake(ignore_causal=True),
                "the layer's causal setting is not reaching the attention: a causal layer must hide later keys"),
        Mistake("old sums not rescaled", _layer_mistake(rescale=False),
                "the chunked attention underneath does not rescale its running sums when the maximum grows: "
                "the layer is only as right as the attention it calls"),
    ],
    default_hint="forward_unbatched sees one example and one head: project x with the head's weights, attend "
                 "in chunks (honouring the layer's causal flag), apply the head's output weights, and return "
                 "the output together with the state",
    hints=(
        "weights is the tuple (w_q, w_k, w_v, w_o) of one head; x @ w_q gives that head's queries [seq, d_qk]; "
        "self._causal is the layer's causal flag; the result must be the pair (output [seq, d_model], state)",
        "w_q, w_k, w_v, w_o = weights\n"
        "o = chunked(x @ w_q, x @ w_k, x @ w_v, 4, 4, self._causal)\n"
        "return o @ w_o, state",
    ),
    answered_by=("labkit.layers.MemoryEfficientSelfAttention",),
))
