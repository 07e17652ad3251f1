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
from labkit.grading.inputs import normal as _normal

EPS = 1e-6


def _one_head(fn):
    """Run a `[T, N, *]` labkit function on one head `[T, *]`."""
    return lambda q, k, v, **kw: fn(q[:, None], k[:, None], v[:, None], **kw)[:, 0]


# ---------------------------------------------------------------- 1. the feature map

def feature_map_reference(x):
    """`elu(x) + 1`, elementwise, same shape and dtype as `x`."""
    return la.elu_feature_map(jnp.asarray(x))


def _x_case(name, seed, *shape, scale=1.0):
    return Case(name, lambda: ((_normal(seed, *shape, scale=scale),), {}), atol=1e-6, rtol=1e-6)


register(Exercise(
    id="lab04.feature_map",
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
                "elu(x) reaches down to -1; add 1 so every feature is positive (phi(x) = elu(x) + 1)"),
        Mistake("relu + 1", lambda x: jax.nn.relu(jnp.asarray(x)) + 1.0,
                "for x < 0 the map is exp(x), not a constant 1: use jax.nn.elu(x) + 1"),
        Mistake("exp", lambda x: jnp.exp(jnp.asarray(x)),
                "exp(x) is elu(x) + 1 only for x < 0; for x > 0 it is x + 1 (and exp would overflow)"),
    ],
    default_hint="jax.nn.elu(x) + 1.0",
    nan_hint="inf/NaN: exp() of a large positive number overflowed; jax.nn.elu only exponentiates x <= 0",
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

def linear_attention_reference(q, k, v):
    """One head: `phi(q) (phi(k)^T v) / (phi(q) sum_j phi(k_j) + 1e-6)`, `[T, d], [S, d], [S, dv] -> [T, dv]`."""
    return _one_head(la.linear_attention)(q, k, v, eps=EPS)


register(Exercise(
    id="lab04.linear_attention",
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
                "divide each row by phi(q_i) . sum_j phi(k_j) (+ eps): without it the output grows with the length"),
        Mistake("no feature map", functools.partial(_linear_with, causal=False, map_q=False, map_k=False),
                "apply phi(x) = elu(x) + 1 to the queries and to the keys before any product"),
        Mistake("feature map on keys only", functools.partial(_linear_with, causal=False, map_q=False),
                "the queries need the feature map too: phi(q) . phi(k)"),
    ],
    default_hint="kv = phi(k).T @ v; z = phi(k).sum(0); out = (phi(q) @ kv) / (phi(q) @ z + eps)[:, None]",
))


# ---------------------------------------------------------------- 3. causal, prefix sums

def causal_prefix_reference(q, k, v):
    """One head, causal: the prefix sums `S_i = sum_{j<=i} phi(k_j) v_j^T`, `z_i = sum_{j<=i} phi(k_j)`."""
    return _one_head(la.linear_attention)(q, k, v, is_causal=True, eps=EPS)


register(Exercise(
    id="lab04.causal_prefix",
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
                "position i may attend to itself: sum over j <= i (an inclusive cumsum), not j < i"),
        Mistake("missing normaliser", functools.partial(_linear_with, causal=True, normalise=False),
                "divide by phi(q_i) . z_i with z_i = cumsum of phi(k_j) (+ eps)"),
        Mistake("normaliser over all keys", functools.partial(_linear_with, causal=True, global_normaliser=True),
                "the normaliser must be causal too: z_i = sum over j <= i of phi(k_j), not over all keys"),
    ],
    default_hint="S = jnp.cumsum(phi(k)[:, :, None] * v[:, None, :], axis=0); z = jnp.cumsum(phi(k), axis=0); "
                 "out_i = phi(q_i) S_i / (phi(q_i) . z_i + eps)",
))


# ---------------------------------------------------------------- 4. causal, chunkwise

def causal_chunkwise_reference(q, k, v, chunk_size):
    """One head, causal, chunk by chunk (lengths chunk_size does not divide included): same values as prefix sums."""
    return _one_head(la.linear_attention)(q, k, v, is_causal=True, chunk_size=chunk_size, eps=EPS)


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
                "inside a chunk, query i must not see later keys: multiply phi(Q_c) phi(K_c)^T by a lower "
                "triangle (diagonal included) before multiplying by V_c"),
        Mistake("state not carried", functools.partial(_chunkwise_with, carry=False),
                "add phi(Q_c) S to each chunk's output, where S = sum of phi(k_j) v_j^T over all EARLIER chunks "
                "(and z likewise for the normaliser)"),
        Mistake("state updated before it is read", functools.partial(_chunkwise_with, update_first=True),
                "read the state first (it must hold earlier chunks only), then add the current chunk to it: "
                "otherwise the chunk is counted twice and its future leaks in"),
    ],
    default_hint="for each chunk c: out_c = tril(phi(Q_c) phi(K_c)^T) V_c + phi(Q_c) S; then S += phi(K_c)^T V_c "
                 "(the same with a column of ones for the normaliser); pad or slice the last, short chunk",
))


# ---------------------------------------------------------------- 5. the recurrent step

def recurrent_step_reference(state, q_t, k_t, v_t):
    """`state = (kv [d, dv], k_sum [d])`, one token `[d], [d], [dv]` -> `((kv', k_sum'), out_t [dv])`."""
    new, out = la.recurrent_step(la.LinearState(*map(jnp.asarray, state)), q_t, k_t, v_t, eps=EPS)
    return (new.kv, new.k_sum), out


def _step_case(name, seed, d, dv, seen):
    """A state that has already seen `seen` random tokens, then one more token."""
    def inputs():
        ks, vs = _normal(seed, seen, d), _normal(seed + 1, seen, dv)
        fk = np.asarray(la.elu_feature_map(jnp.asarray(ks)))
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
                "token t attends to itself: add phi(k_t) v_t^T and phi(k_t) to the state first, then read it"),
        Mistake("missing normaliser", functools.partial(_step_with, normalise=False),
                "divide phi(q_t) . kv by phi(q_t) . k_sum + eps"),
        Mistake("normaliser sum not updated", functools.partial(_step_with, update_sum=False),
                "update both parts of the state: kv += outer(phi(k_t), v_t) AND k_sum += phi(k_t)"),
    ],
    default_hint="kv = kv + outer(phi(k_t), v_t); k_sum = k_sum + phi(k_t); "
                 "out = phi(q_t) @ kv / (phi(q_t) @ k_sum + eps); return (kv, k_sum), out",
))
