"""Lab 04 exercises: the elu+1 feature map, non-causal, causal prefix-sum and chunkwise linear attention, and
the recurrent step. One head each: `q [T, d]`, `k [T, d]`, `v [T, dv]`; expected values come from
`labkit.attention.linear`. The written-out mistakes compute the same sums with one step wrong."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from labkit.attention import linear as la
from labkit.grading.exercise import Case, Exercise, Mistake, hidden, register
from labkit.grading.harness import run_jitted
from labkit.grading.inputs import normal as _normal

EPS = 1e-6


def _one_head(fn):
    """Run a `[T, N, *]` labkit function on one head `[T, *]`."""
    return lambda q, k, v, **kw: fn(q[:, None], k[:, None], v[:, None], **kw)[:, 0]


# Jitted once per shape: a check compiles one program per case instead of one per operation.
_linear = jax.jit(la.linear_attention, static_argnames=("is_causal", "chunk_size", "eps"))
_elu = jax.jit(la.elu_feature_map)
_step = jax.jit(la.recurrent_step, static_argnames=("feature_map", "eps"))


# ---------------------------------------------------------------- 1. the feature map

def feature_map_reference(x):
    """`elu(x) + 1`, elementwise, same shape and dtype as `x`."""
    return _elu(jnp.asarray(x))


def _x_case(name, seed, *shape, scale=1.0):
    return Case(name, lambda: ((_normal(seed, *shape, scale=scale),), {}), atol=1e-6, rtol=1e-6)


register(Exercise(
    id="lab04.feature_map",
    run=run_jitted,
    description="the feature map phi(x) = elu(x) + 1: positive, smooth, close to 1 + x near 0",
    points=1,
    reference=feature_map_reference,
    cases=[
        _x_case("a vector of 5", 0, 5),
        _x_case("a [4, 3] matrix", 1, 4, 3),
        _x_case("large values, up to +-100", 2, 6, 4, scale=50.0),
        _x_case("one number", 3, 1),
        hidden(_x_case("a [2, 3, 5] array, values up to +-10", 4, 2, 3, 5, scale=3.0)),
    ],
    mistakes=[
        Mistake("elu without +1", lambda x: jax.nn.elu(jnp.asarray(x)),
                "your features go negative (down to -1 for very negative x): the map is elu shifted up by one, "
                "so that every feature is positive"),
        Mistake("relu + 1", lambda x: jax.nn.relu(jnp.asarray(x)) + 1.0,
                "for negative x your features are a constant 1; the map is e^x there (smooth, between 0 and 1)"),
        Mistake("exp", lambda x: jnp.exp(jnp.asarray(x)),
                "your features are right for x <= 0 but grow exponentially for x > 0, where the map is linear "
                "(x + 1)"),
    ],
    default_hint="phi has two branches: x + 1 for x > 0 and e^x for x <= 0. Work out phi(-2), phi(0) and phi(3) "
                 "by hand and compare them with what your function returns",
    hints=("JAX has the exponential linear unit built in (`jax.nn.elu`): the map is that function plus one, "
           "elementwise, so no loop, mask or reshaping is needed",
           "return jax.nn.elu(x) + 1.0"),
    nan_hint="inf/NaN: the exponential of a large positive number overflowed; the map only exponentiates "
             "inputs at or below zero",
    answered_by=("labkit.attention.linear.elu_feature_map", "labkit.attention.linear.get_feature_map",
                 "labkit.attention.kernel.kernel_features"),
))


# ---------------------------------------------------------------- shared pieces of the mistakes

def _linear_with(q, k, v, *, causal, normalise=True, map_q=True, map_k=True, exclusive=False,
                 global_normaliser=False):
    """One head, written the quadratic way so each mistake is one flag."""
    fq = la.elu_feature_map(jnp.asarray(q)) if map_q else jnp.asarray(q)
    fk = la.elu_feature_map(jnp.asarray(k)) if map_k else jnp.asarray(k)
    scores = fq @ fk.T
    t = scores.shape[0]
    keep = jnp.tril(jnp.ones((t, t)), -1 if exclusive else 0) if causal else jnp.ones_like(scores)
    num = (scores * keep) @ v
    if not normalise:
        return num
    den = (scores if global_normaliser else scores * keep).sum(-1, keepdims=True)
    return num / (den + EPS)


def _qkv_case(name, seed, t, d, dv=None, *, extra=(), scale=1.0, atol=1e-5):
    def inputs():
        q = _normal(seed, t, d, scale=scale)
        k = _normal(seed + 1, t, d, scale=scale)
        v = _normal(seed + 2, t, dv or d)
        return (q, k, v) + tuple(extra), {}
    return Case(name, inputs, atol=atol, rtol=1e-4)


# ---------------------------------------------------------------- 2. non-causal linear attention

def linear_attention_reference(q, k, v, eps=EPS):
    """One head: `phi(q) (phi(k)^T v) / (phi(q) sum_j phi(k_j) + eps)`, `[T, d], [S, d], [S, dv] -> [T, dv]`
    (the learner's signature, so that later cells can call it in the learner's place)."""
    return _one_head(_linear)(q, k, v, eps=eps)


register(Exercise(
    id="lab04.linear_attention",
    run=run_jitted,
    description="non-causal linear attention with phi = elu + 1: compute phi(K)^T V first (O(n d^2))",
    points=2,
    reference=linear_attention_reference,
    cases=[
        _qkv_case("tiny: seq 4, dim 2", 0, 4, 2),
        _qkv_case("seq 6, dim 4, value dim 3", 10, 6, 4, 3),
        _qkv_case("length 1", 20, 1, 3),
        _qkv_case("seq 64, dim 8, values up to +-10", 30, 64, 8, scale=10.0, atol=1e-4),
        _qkv_case("seq 200, dim 16", 40, 200, 16),
        hidden(_qkv_case("seq 13, dim 5, value dim 7", 50, 13, 5, 7)),
    ],
    mistakes=[
        Mistake("missing normaliser", functools.partial(_linear_with, causal=False, normalise=False),
                "your output is the numerator only: each row must be divided by its own total weight (the "
                "normaliser, plus eps), otherwise it grows with the number of keys"),
        Mistake("no feature map", functools.partial(_linear_with, causal=False, map_q=False, map_k=False),
                "the similarity is phi(q) . phi(k): apply the feature map to the queries and to the keys before "
                "any product"),
        Mistake("feature map on keys only", functools.partial(_linear_with, causal=False, map_q=False),
                "the queries need the feature map too, not only the keys"),
    ],
    default_hint="each output row is a weighted mean of the values: the numerator reads the key summary "
                 "sum_j phi(k_j) v_j^T with phi(q_i), the denominator reads z = sum_j phi(k_j) with phi(q_i) "
                 "(+ eps). Check both parts, and that phi is applied to queries and keys",
    hints=("use `phi` on q and k; the key summary is ONE matrix product (phi of the keys, transposed, times v: "
           "[d, d_v]), z a sum over the key axis ([d]); then one product with phi of the queries for each, and a "
           "division broadcast over the value columns",
           "phi_q, phi_k = phi(q), phi(k)\n"
           "kv = phi_k.T @ v                  # [d, d_v]\n"
           "z = phi_k.sum(axis=0)             # [d]\n"
           "return (phi_q @ kv) / (phi_q @ z + eps)[:, None]"),
    nan_hint="NaN/inf: a 0/0 or an overflow; with positive features the denominator cannot vanish, so check "
             "that phi is applied and that eps is added to the denominator",
    answered_by=("labkit.attention.linear.linear_attention", "labkit.attention.kernel.kernel_attention",
                 "labkit.layers.LinearSelfAttention"),
))


# ---------------------------------------------------------------- 3. causal, prefix sums

def causal_prefix_reference(q, k, v, eps=EPS):
    """One head, causal: the prefix sums `S_i = sum_{j<=i} phi(k_j) v_j^T`, `z_i = sum_{j<=i} phi(k_j)`."""
    return _one_head(_linear)(q, k, v, is_causal=True, eps=eps)


register(Exercise(
    id="lab04.causal_prefix",
    run=run_jitted,
    description="causal linear attention with prefix sums (cumsum) of phi(k_j) v_j^T and phi(k_j)",
    points=2,
    reference=causal_prefix_reference,
    cases=[
        _qkv_case("tiny: seq 4, dim 2", 0, 4, 2),
        _qkv_case("seq 7, dim 3, value dim 5", 10, 7, 3, 5),
        _qkv_case("length 1", 20, 1, 4),
        _qkv_case("seq 100, dim 8", 30, 100, 8),
        hidden(_qkv_case("seq 17, dim 5, value dim 2", 40, 17, 5, 2)),
    ],
    mistakes=[
        Mistake("exclusive prefix sum", functools.partial(_linear_with, causal=True, exclusive=True),
                "position i may attend to itself: its sums run over j <= i (an inclusive prefix sum), yours stop "
                "at j < i"),
        Mistake("missing normaliser", functools.partial(_linear_with, causal=True, normalise=False),
                "your output is the numerator only: divide row i by phi(q_i) . z_i (+ eps), z_i the prefix sum "
                "of the key features"),
        Mistake("normaliser over all keys", functools.partial(_linear_with, causal=True, global_normaliser=True),
                "the normaliser must be causal too: z_i sums the key features over j <= i, not over all keys"),
    ],
    default_hint="query i may use keys j <= i only, itself included: the summary S_i and the normaliser z_i are "
                 "both sums over j <= i, so they differ for every i. Check row 0 (it sees key 0 only) by hand",
    hints=("build the per-position outer products phi(k_j) v_j^T as one [T, d, d_v] array by broadcasting, take "
           "cumulative sums along the sequence axis (`jnp.cumsum`, axis 0) of it and of phi(k), then contract "
           "phi(q_i) with S_i and with z_i at every position (`jnp.einsum`)",
           "phi_q, phi_k = phi(q), phi(k)\n"
           "s = jnp.cumsum(phi_k[:, :, None] * v[:, None, :], axis=0)   # [T, d, d_v]\n"
           "z = jnp.cumsum(phi_k, axis=0)                                # [T, d]\n"
           "num = jnp.einsum(\"td,tdv->tv\", phi_q, s)\n"
           "den = jnp.einsum(\"td,td->t\", phi_q, z)\n"
           "return num / (den + eps)[:, None]"),
    nan_hint="NaN/inf: a 0/0 or an overflow; with positive features and eps the denominator cannot vanish, so "
             "check the feature map and the eps",
    answered_by=("labkit.attention.linear.linear_attention", "labkit.attention.kernel.kernel_attention",
                 "labkit.layers.LinearSelfAttention"),
))


# ---------------------------------------------------------------- 4. causal, chunkwise

def causal_chunkwise_reference(q, k, v, chunk_size, eps=EPS):
    """One head, causal, chunk by chunk (lengths chunk_size does not divide included): same values as prefix sums."""
    return _one_head(_linear)(q, k, v, is_causal=True, chunk_size=chunk_size, eps=eps)


def _chunkwise_with(q, k, v, chunk_size, *, mask_inside=True, carry=True, update_first=False):
    """A chunkwise loop with one step wrong: no mask inside a chunk, no carried state, or state updated too early."""
    t = q.shape[0]
    fq, fk = la.elu_feature_map(jnp.asarray(q)), la.elu_feature_map(jnp.asarray(k))
    v1 = jnp.concatenate([jnp.asarray(v), jnp.ones((t, 1), jnp.float32)], -1)
    state = jnp.zeros((fk.shape[1], v1.shape[1]))
    outs = []
    for start in range(0, t, chunk_size):
        qc, kc, vc = fq[start:start + chunk_size], fk[start:start + chunk_size], v1[start:start + chunk_size]
        scores = qc @ kc.T
        if mask_inside:
            scores = jnp.tril(scores)
        if update_first:
            state = state + kc.T @ vc
        outs.append(scores @ vc + (qc @ state if carry else 0.0))
        if not update_first:
            state = state + kc.T @ vc
    out = jnp.concatenate(outs)
    return out[:, :-1] / (out[:, -1:] + EPS)


def _chunk_case(name, seed, t, d, chunk, dv=None):
    return _qkv_case(name, seed, t, d, dv, extra=(chunk,))


register(Exercise(
    id="lab04.causal_chunkwise",
    run=run_jitted,
    description="chunkwise causal linear attention: masked quadratic form inside a chunk, a carried state across",
    points=3,
    reference=causal_chunkwise_reference,
    cases=[
        _chunk_case("seq 8, chunks of 4, dim 2", 0, 8, 2, 4),
        _chunk_case("seq 7, chunks of 3 (the last chunk is short)", 10, 7, 3, 3, 5),
        _chunk_case("length 1, chunks of 4", 20, 1, 4, 4),
        _chunk_case("chunks of 1 (the recurrent form)", 30, 6, 3, 1),
        _chunk_case("one chunk longer than the sequence", 40, 5, 4, 16),
        _chunk_case("seq 100, chunks of 16, dim 8", 50, 100, 8, 16),
        hidden(_chunk_case("seq 23, chunks of 5 (the last chunk is short), dim 3, value dim 4", 60, 23, 3, 5, 4)),
    ],
    mistakes=[
        Mistake("no mask inside the chunk", functools.partial(_chunkwise_with, mask_inside=False),
                "inside a chunk, query i sees later keys of the same chunk: the chunk's score block needs the "
                "lower-triangle mask M (diagonal included) before it multiplies the values"),
        Mistake("state not carried", functools.partial(_chunkwise_with, carry=False),
                "each chunk also attends to everything before it: add the state of all EARLIER chunks, read with "
                "the chunk's query features, to its output (the normaliser's part too)"),
        Mistake("state updated before it is read", functools.partial(_chunkwise_with, update_first=True),
                "read the state first (it must hold earlier chunks only), then add the current chunk to it: "
                "otherwise the chunk is counted twice and its future leaks in"),
    ],
    default_hint="each chunk's output has two parts: the masked quadratic form inside the chunk (lower triangle, "
                 "diagonal included) and the chunk's query features times the state of all EARLIER chunks; "
                 "the last chunk may be shorter than chunk_size",
    hints=("append a column of ones to v (the normaliser becomes the last output column); pad the features and "
           "v with zero rows to a multiple of chunk_size (`jnp.pad`), reshape to [n_chunks, chunk_size, ...] and "
           "`jax.lax.scan` a step that returns (the state plus this chunk's K^T V, this chunk's output); at the "
           "end drop the padded rows and divide by the last column + eps",
           "t, d = q.shape\n"
           "pad = -t % chunk_size\n"
           "v1 = jnp.concatenate([v, jnp.ones((t, 1), v.dtype)], axis=1)\n"
           "chunks = lambda a: jnp.pad(a, ((0, pad), (0, 0))).reshape(-1, chunk_size, a.shape[-1])\n"
           "tri = jnp.tril(jnp.ones((chunk_size, chunk_size)))\n\n"
           "def step(state, chunk):\n"
           "    qc, kc, vc = chunk\n"
           "    return state + kc.T @ vc, ((qc @ kc.T) * tri) @ vc + qc @ state\n\n"
           "xs = (chunks(phi(q)), chunks(phi(k)), chunks(v1))\n"
           "out = jax.lax.scan(step, jnp.zeros((d, v1.shape[1])), xs)[1].reshape(-1, v1.shape[1])[:t]\n"
           "return out[:, :-1] / (out[:, -1:] + eps)"),
    nan_hint="NaN/inf: a 0/0 or an overflow; padded rows have a zero denominator, so drop them before dividing "
             "(and add eps)",
    answered_by=("labkit.attention.linear.linear_attention", "labkit.attention.kernel.kernel_attention",
                 "labkit.layers.LinearSelfAttention"),
))


# ---------------------------------------------------------------- 5. the recurrent step

def recurrent_step_reference(state, q_t, k_t, v_t, eps=EPS):
    """`state = (kv [d, dv], k_sum [d])`, one token `[d], [d], [dv]` -> `((kv', k_sum'), out_t [dv])`."""
    new, out = _step(la.LinearState(*map(jnp.asarray, state)), q_t, k_t, v_t, eps=eps)
    return (new.kv, new.k_sum), out


def _step_case(name, seed, d, dv, seen):
    """A state that has already seen `seen` random tokens, then one more token."""
    def inputs():
        ks, vs = _normal(seed, seen, d), _normal(seed + 1, seen, dv)
        fk = np.asarray(_elu(jnp.asarray(ks)))
        state = ((fk.T @ vs).astype(np.float32), fk.sum(0).astype(np.float32))
        q_t, k_t, v_t = _normal(seed + 2, d), _normal(seed + 3, d), _normal(seed + 4, dv)
        return (state, q_t, k_t, v_t), {}
    return Case(name, inputs, atol=1e-5, rtol=1e-5)


def _step_with(state, q_t, k_t, v_t, *, read_first=False, normalise=True, update_sum=True):
    kv, k_sum = (jnp.asarray(s) for s in state)
    fq, fk = la.elu_feature_map(jnp.asarray(q_t)), la.elu_feature_map(jnp.asarray(k_t))
    new_kv, new_sum = kv + jnp.outer(fk, v_t), (k_sum + fk if update_sum else k_sum)
    read_kv, read_sum = (kv, k_sum) if read_first else (new_kv, new_sum)
    out = fq @ read_kv
    if normalise:
        out = out / (fq @ read_sum + EPS)
    return (new_kv, new_sum), out


register(Exercise(
    id="lab04.recurrent_step",
    run=run_jitted,
    description="one step of the RNN form: add phi(k_t) v_t^T to the state, then read it with phi(q_t)",
    points=2,
    reference=recurrent_step_reference,
    cases=[
        _step_case("first token (empty state), dim 2", 0, 2, 2, 0),
        _step_case("after 3 tokens, dim 3, value dim 4", 10, 3, 4, 3),
        _step_case("after 50 tokens, dim 8", 20, 8, 8, 50),
        _step_case("after 1000 tokens, dim 4", 30, 4, 6, 1000),
        hidden(_step_case("after 7 tokens, dim 5, value dim 3", 40, 5, 3, 7)),
    ],
    mistakes=[
        Mistake("read before update", functools.partial(_step_with, read_first=True),
                "token t attends to itself: add it to the state first, then read the updated state"),
        Mistake("missing normaliser", functools.partial(_step_with, normalise=False),
                "your output is the numerator only: divide it by the query's reading of k_sum (+ eps)"),
        Mistake("normaliser sum not updated", functools.partial(_step_with, update_sum=False),
                "update both parts of the state: the new token enters kv AND k_sum"),
    ],
    default_hint="the state holds sums over every token seen so far: the new token enters both parts (kv and "
                 "k_sum) BEFORE they are read, since it attends to itself; then read them with phi(q_t) and "
                 "normalise, as one row of the causal form",
    hints=("the token adds the outer product of phi(k_t) and v_t to kv (`jnp.outer`) and phi(k_t) to k_sum; "
           "the output is the updated kv read with phi(q_t), divided by the reading of k_sum + eps; return the "
           "new state as a tuple, then the output",
           "kv, k_sum = state\n"
           "phi_q, phi_k = phi(q_t), phi(k_t)\n"
           "kv = kv + jnp.outer(phi_k, v_t)\n"
           "k_sum = k_sum + phi_k\n"
           "return (kv, k_sum), (phi_q @ kv) / (phi_q @ k_sum + eps)"),
    nan_hint="NaN/inf: a 0/0 or an overflow; with positive features and eps the denominator cannot vanish, so "
             "check the feature map and the eps",
    answered_by=("labkit.attention.linear.recurrent_step", "labkit.attention.linear.generate"),
))
