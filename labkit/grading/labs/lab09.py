"""Lab 09 exercises: ring attention. Shards of a sequence, merging two partial softmax results, the ring loop
with `ppermute`, causal ring attention with global positions, the zigzag layout, and gradients through the ring.
Registered in the order the notebook asks them.

The ring exercises run the learner's function under `jax.vmap(..., axis_name="ring")`: the same collectives
(`ppermute`, `axis_index`, `psum`) as under `jax.shard_map`, on one device, so a check works in any process,
whatever number of devices its backend started with.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from labkit.grading.exercise import Case, Exercise, Mistake, hidden, register
from labkit.grading.inputs import normal as _normal

AXIS = "ring"
HIDDEN_SCORE = -1e30


def _qkv_case(name, seed, b, t, n_heads, h, n_devices, *, hv=None, logit_scale=1.0, **kwargs):
    def inputs():
        q = _normal(seed, b, t, n_heads, h, scale=logit_scale)
        k = _normal(seed + 1, b, t, n_heads, h, scale=logit_scale)
        return (q, k, _normal(seed + 2, b, t, n_heads, hv or h), n_devices), dict(kwargs)
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- 9.1 the shards of a sequence

def split_sequence_reference(x, n_devices):
    """`[B, T, N, H]` -> `[P, B, T/P, N, H]`: device d's contiguous block of positions d*T/P .. (d+1)*T/P - 1."""
    return np.stack(np.split(np.asarray(x), n_devices, axis=1))


def _split_reshaped(x, n_devices):
    b, t, n, h = x.shape
    return np.asarray(x).reshape(n_devices, b, t // n_devices, n, h)


def _split_strided(x, n_devices):
    return np.stack([np.asarray(x)[:, d::n_devices] for d in range(n_devices)])


def _split_case(name, seed, b, t, n_devices):
    return Case(name, lambda: ((_normal(seed, b, t, 2, 3), n_devices), {}))


register(Exercise(
    id="lab09.split_sequence",
    description="the shards of a sequence on P devices: device d's contiguous block of positions",
    points=1,
    reference=split_sequence_reference,
    cases=[
        _split_case("batch 1, seq 8 on 2 devices", 0, 1, 8, 2),
        _split_case("batch 2, seq 8 on 4 devices", 10, 2, 8, 4),
        _split_case("one device: the whole sequence", 20, 2, 6, 1),
        _split_case("batch 3, seq 12 on 3 devices", 30, 3, 12, 3),
        hidden(_split_case("batch 2, seq 10 on 5 devices", 40, 2, 10, 5)),
    ],
    mistakes=[
        Mistake("reshaped without moving the device axis", _split_reshaped,
                "a plain reshape mixes the batch axis into the device axis: the positions must be cut into P "
                "blocks first, and the block number then moved to the front"),
        Mistake("every P-th position (striped)", _split_strided,
                "device d holds one contiguous block, positions d*T/P to (d+1)*T/P - 1, not every P-th position"),
    ],
    default_hint="device d holds positions d*T/P to (d+1)*T/P - 1 of every example, all heads and all features",
    hints=(
        "cut the sequence axis (axis 1) into P equal pieces and stack them along a new leading axis "
        "(np.split, np.stack)",
        "return np.stack(np.split(x, n_devices, axis=1))",
    ),
))


# ---------------------------------------------------------------- 9.2 merging two partial results

def _partial(scores, v, state_cls):
    """The online-softmax state of scores `[..., T, S]` over values `[..., S, Hv]` (float32)."""
    m = scores.max(-1)
    p = np.exp(scores - m[..., None])
    return state_cls(jnp.asarray(p @ v, jnp.float32), jnp.asarray(m, jnp.float32),
                     jnp.asarray(p.sum(-1), jnp.float32))


def _empty(rows, hv, state_cls):
    from labkit.attention.online_softmax import init_state

    return state_cls(*init_state(rows, hv))


def run_merge(candidate, args, kwargs):
    """`(out, logsumexp)` of the merged state `(acc, m, l)` the candidate returns: any exact merge gives them."""
    from labkit.attention.online_softmax import SoftmaxState

    sa, va, sb, vb = (np.asarray(a, np.float64) for a in args)
    a = _partial(sa, va, SoftmaxState) if sa.shape[-1] else _empty(sa.shape[:-1], va.shape[-1], SoftmaxState)
    b = _partial(sb, vb, SoftmaxState)
    acc, m, l = candidate(a, b)
    acc, m, l = (jnp.asarray(x, jnp.float32) for x in (acc, m, l))
    return acc / l[..., None], m + jnp.log(l)


def merge_reference(a, b):
    """Two partial states `(acc, m, l)` over disjoint keys -> the state over their union."""
    from labkit.attention.online_softmax import merge

    return merge(a, b)


def _merge_unscaled(a, b):
    return a.acc + b.acc, jnp.maximum(a.m, b.m), a.l + b.l


def _merge_normaliser_unscaled(a, b):
    m = jnp.maximum(a.m, b.m)
    ca, cb = jnp.exp(a.m - m), jnp.exp(b.m - m)
    return a.acc * ca[..., None] + b.acc * cb[..., None], m, a.l + b.l


def _merge_case(name, seed, rows, sa, sb, hv, *, logit_scale=1.0, empty_a=False):
    def inputs():
        scores_a = _normal(seed, *rows, sa, scale=logit_scale) + (0 if empty_a else 3.0)
        scores_b = _normal(seed + 1, *rows, sb, scale=logit_scale)
        va, vb = _normal(seed + 2, *rows[:-1], sa, hv), _normal(seed + 3, *rows[:-1], sb, hv)
        if empty_a:
            scores_a, va = scores_a[..., :0], va[..., :0, :]
        return (scores_a, va, scores_b, vb), {}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


register(Exercise(
    id="lab09.merge_partials",
    description="merge two partial softmax results (maximum, normaliser, weighted sum) exactly",
    points=2,
    reference=merge_reference,
    run=run_merge,
    cases=[
        _merge_case("4 queries, 3 + 5 keys, value dim 2", 0, (4,), 3, 5, 2),
        _merge_case("heads and batch: rows [2, 3, 4], 6 + 2 keys", 10, (2, 3, 4), 6, 2, 3),
        _merge_case("one side has seen nothing yet", 20, (3,), 4, 4, 2, empty_a=True),
        _merge_case("large logits: maxima far apart", 30, (5,), 4, 7, 3, logit_scale=300.0),
        hidden(_merge_case("rows [2, 6], 1 + 9 keys", 40, (2, 6), 1, 9, 4)),
    ],
    mistakes=[
        Mistake("sums added without rescaling", _merge_unscaled,
                "each partial sum was exponentiated against its own maximum: bring both to the common maximum "
                "before adding them"),
        Mistake("normaliser not rescaled", _merge_normaliser_unscaled,
                "the weighted sums are rescaled but the normalisers are not: both quantities of each side need "
                "the same correction factor"),
    ],
    default_hint="the two partial results were computed against different maxima; the merged one uses the "
                 "larger of the two, and both sides' sums must be expressed against it",
    hints=(
        "new maximum = elementwise maximum of the two; each side's correction factor is exp(its maximum - new "
        "maximum); multiply that side's weighted sum (one factor per row) and its normaliser by it, then add",
        "m = jnp.maximum(a.m, b.m)\n"
        "ca, cb = jnp.exp(a.m - m), jnp.exp(b.m - m)\n"
        "return a.acc * ca[..., None] + b.acc * cb[..., None], m, a.l * ca + b.l * cb",
    ),
    answered_by=("labkit.attention.online_softmax.merge",),
))


# ---------------------------------------------------------------- 9.3 the ring loop

def shards(x, n_devices):
    """`[B, T, N, H]` -> `[P, B, T/P, N, H]` (contiguous blocks), as jnp float32."""
    return jnp.stack(jnp.split(jnp.asarray(x, jnp.float32), n_devices, axis=1))


def run_ring(candidate, args, kwargs):
    """The candidate `fn(q, k, v, axis_name)` on P shards under vmap -> the global `[B, T, N, Hv]`."""
    q, k, v, n = args
    out = jax.jit(jax.vmap(lambda *a: candidate(*a, AXIS), axis_name=AXIS))(shards(q, n), shards(k, n), shards(v, n))
    out = jnp.swapaxes(out, 0, 1)
    return out.reshape(out.shape[0], -1, *out.shape[3:])


def ring_reference(q, k, v, axis_name, is_causal=False):
    """Dense attention of this device's queries against the whole (all-gathered) sequence: no ring involved."""
    from labkit.attention.dense import dot_product_attention

    me, t = lax.axis_index(axis_name), q.shape[1]
    k_all, v_all = (lax.all_gather(x, axis_name, axis=1, tiled=True) for x in (k, v))
    mask = None
    if is_causal:
        mask = me * t + jnp.arange(t)[:, None] >= jnp.arange(k_all.shape[1])[None, :]
    return dot_product_attention(q, k_all, v_all, mask=mask)


def causal_ring_reference(q, k, v, axis_name):
    """Causal dense attention of this device's queries against the all-gathered sequence."""
    return ring_reference(q, k, v, axis_name, is_causal=True)


def heads_first(x):
    """`[B, t, N, H]` -> `[B, N, t, H]` float32 (the online softmax's rows before keys)."""
    return jnp.swapaxes(jnp.asarray(x, jnp.float32), 1, 2)


def _ring_with(q, k, v, axis_name, is_causal=False, *, rotate_values=True, steps_short=0, forward=True,
               local_positions=False):
    """A written-out ring loop (the fallback) or one with one step done wrong."""
    from labkit.attention.online_softmax import finalize, init_state, update

    n, me, t = lax.psum(1, axis_name), lax.axis_index(axis_name), q.shape[1]
    perm = [(i, (i + 1) % n if forward else (i - 1) % n) for i in range(n)]
    q, k, v = heads_first(q) / np.sqrt(q.shape[-1]), heads_first(k), heads_first(v)
    q_pos = (0 if local_positions else me * t) + jnp.arange(t)[:, None]
    state = init_state(q.shape[:-1], v.shape[-1])
    for s in range(n - steps_short):
        scores = q @ jnp.swapaxes(k, -1, -2)
        if is_causal:
            k_pos = (0 if local_positions else ((me - s) % n) * t) + jnp.arange(t)[None, :]
            scores = jnp.where(k_pos <= q_pos, scores, HIDDEN_SCORE)
            visible = (me - s) % n <= me
            state = lax.cond(visible, lambda st: update(st, scores, v), lambda st: st, state)
        else:
            state = update(state, scores, v)
        k = lax.ppermute(k, axis_name, perm)
        v = lax.ppermute(v, axis_name, perm) if rotate_values else v
    return jnp.swapaxes(finalize(state)[0], 1, 2)


def _ring_unscaled(q, k, v, axis_name, is_causal=False):
    return _ring_with(q * np.sqrt(q.shape[-1]), k, v, axis_name, is_causal)


def _ring_local_only(q, k, v, axis_name, is_causal=False):
    return _ring_with(q, k, v, axis_name, is_causal, steps_short=lax.psum(1, axis_name) - 1)


RING_CASES = [
    _qkv_case("2 devices, seq 8, 1 head, dim 4", 0, 1, 8, 1, 4, 2),
    _qkv_case("4 devices, seq 16, 2 heads, value dim 3", 10, 1, 16, 2, 4, 4, hv=3),
    _qkv_case("1 device: the ring is one step", 20, 2, 4, 1, 4, 1),
    _qkv_case("8 devices, seq 16, batch 2", 30, 2, 16, 2, 4, 8),
    _qkv_case("large logits: 4 devices, scores up to ~1e3", 40, 1, 8, 1, 8, 4, logit_scale=12.0),
]

register(Exercise(
    id="lab09.ring_loop",
    description="ring attention: keep the queries, pass key/value blocks round the ring with ppermute",
    points=3,
    reference=ring_reference,
    fallback=lambda: functools.partial(_ring_with, is_causal=False),
    run=run_ring,
    cases=[*RING_CASES, hidden(_qkv_case("3 devices, seq 9, dim 2, value dim 5", 50, 2, 9, 1, 2, 3, hv=5))],
    mistakes=[
        Mistake("only the local block", _ring_local_only,
                "each query saw only the keys of its own device: the ring takes P steps, one for every block "
                "of keys"),
        Mistake("values not rotated", functools.partial(_ring_with, rotate_values=False),
                "the keys travel round the ring but the values stay put: after each step a device must hold "
                "the values that belong to the keys it holds"),
        Mistake("one step short", functools.partial(_ring_with, steps_short=1),
                "one block of keys is never used: with P devices the ring needs P steps (the device's own "
                "block plus P - 1 received ones)"),
        Mistake("missing scale", _ring_unscaled, "the scores are not divided by the square root of the head dim"),
    ],
    default_hint="after P steps every device must have folded every block of keys and values into its queries' "
                 "running softmax, its own block included, each exactly once",
    hints=(
        "the ring's size comes from a psum of 1 over the axis (see above); per step: scores of the local queries against the block "
        "held now, update() of the running state, then lax.ppermute of keys and values to the next device; "
        "finalize() at the end, and back to [B, t, N, Hv]",
        "n = lax.psum(1, axis_name)\n"
        "perm = [(i, (i + 1) % n) for i in range(n)]\n"
        "q, k, v = heads_first(q) / jnp.sqrt(q.shape[-1]), heads_first(k), heads_first(v)\n"
        "state = init_state(q.shape[:-1], v.shape[-1])\n"
        "for _ in range(n):\n"
        "    state = update(state, q @ jnp.swapaxes(k, -1, -2), v)\n"
        "    k, v = lax.ppermute(k, axis_name, perm), lax.ppermute(v, axis_name, perm)\n"
        "return jnp.swapaxes(finalize(state)[0], 1, 2)",
    ),
    answered_by=("labkit.attention.ring",),
))


# ---------------------------------------------------------------- 9.4 causal ring attention

register(Exercise(
    id="lab09.causal_ring",
    description="causal ring attention: global positions, the source of each block, blocks above the diagonal skipped",
    points=3,
    reference=causal_ring_reference,
    fallback=lambda: functools.partial(_ring_with, is_causal=True),
    run=run_ring,
    cases=[
        _qkv_case("causal, 2 devices, seq 8", 60, 1, 8, 1, 4, 2),
        _qkv_case("causal, 4 devices, seq 16, 2 heads, value dim 3", 70, 1, 16, 2, 4, 4, hv=3),
        _qkv_case("causal, 1 device", 80, 2, 4, 1, 4, 1),
        _qkv_case("causal, 8 devices, seq 16, batch 2", 90, 2, 16, 2, 4, 8),
        hidden(_qkv_case("causal, 3 devices, seq 12, value dim 5", 100, 1, 12, 1, 2, 3, hv=5)),
    ],
    mistakes=[
        Mistake("ppermute the other way", functools.partial(_ring_with, is_causal=True, forward=False),
                "the blocks travel the other way round the ring from what the code assumes: at step s a device "
                "holds the block of the device s places before it only if every device sends to the next one"),
        Mistake("positions inside the shard", functools.partial(_ring_with, is_causal=True, local_positions=True),
                "the causal mask compares positions inside each shard: compare global positions, which depend on "
                "which device the queries live on and which device the keys came from"),
    ],
    default_hint="for the block a device holds at step s, work out which device it came from, then the global "
                 "positions of its keys and of the local queries; hide later keys and skip blocks that are all later",
    hints=(
        "with every device sending to the next, at step s device me holds the block of device (me - s) mod P; "
        "global position = device * t + index in the shard; lax.cond(condition, true_fn, false_fn, state) runs "
        "the update only for blocks that are not entirely in the future",
        "n, me, t = lax.psum(1, axis_name), lax.axis_index(axis_name), q.shape[1]\n"
        "perm = [(i, (i + 1) % n) for i in range(n)]\n"
        "q, k, v = heads_first(q) / jnp.sqrt(q.shape[-1]), heads_first(k), heads_first(v)\n"
        "q_pos = me * t + jnp.arange(t)[:, None]\n"
        "state = init_state(q.shape[:-1], v.shape[-1])\n"
        "for s in range(n):\n"
        "    src = (me - s) % n\n"
        "    k_pos = src * t + jnp.arange(t)[None, :]\n"
        "    scores = jnp.where(k_pos <= q_pos, q @ jnp.swapaxes(k, -1, -2), -1e30)\n"
        "    state = lax.cond(src <= me, lambda st: update(st, scores, v), lambda st: st, state)\n"
        "    k, v = lax.ppermute(k, axis_name, perm), lax.ppermute(v, axis_name, perm)\n"
        "return jnp.swapaxes(finalize(state)[0], 1, 2)",
    ),
    answered_by=("labkit.attention.ring",),
))


# ---------------------------------------------------------------- 9.5 the zigzag layout

def zigzag_reference(seq_len, n_devices):
    """Positions `[T]` in device order for the zigzag layout: device d holds chunks d and 2P-1-d of 2P."""
    from labkit.attention.ring import layout_order

    return layout_order(seq_len, n_devices, "zigzag")


def run_order(candidate, args, kwargs):
    """The candidate's positions as an int64 array."""
    return np.asarray(candidate(*args), np.int64)


def _order_striped(seq_len, n_devices):
    return np.concatenate([np.arange(d, seq_len, n_devices) for d in range(n_devices)])


def _order_paired_halves(seq_len, n_devices):
    c = seq_len // (2 * n_devices)
    return np.concatenate([np.r_[d * c:(d + 1) * c, (d + n_devices) * c:(d + n_devices + 1) * c]
                           for d in range(n_devices)])


def _order_late_chunk_reversed(seq_len, n_devices):
    c = seq_len // (2 * n_devices)
    return np.concatenate([np.r_[d * c:(d + 1) * c, (2 * n_devices - d) * c - 1:(2 * n_devices - 1 - d) * c - 1:-1]
                           for d in range(n_devices)])


register(Exercise(
    id="lab09.zigzag_order",
    description="the zigzag layout: which positions each device holds so that causal work is balanced",
    points=2,
    reference=zigzag_reference,
    run=run_order,
    cases=[Case(f"seq {t} on {n} device{'s' * (n > 1)}", lambda t=t, n=n: ((t, n), {}))
           for t, n in ((8, 2), (16, 4), (4, 1), (24, 3))] + [hidden(Case("seq 32 on 8 devices",
                                                                          lambda: ((32, 8), {})))],
    mistakes=[
        Mistake("striped: every P-th position", _order_striped,
                "that is the striped layout (positions d, d+P, d+2P, ...): here each device gets two whole "
                "chunks of T/(2P) consecutive positions"),
        Mistake("chunks d and d+P", _order_paired_halves,
                "device d gets chunk d and chunk d+P: the last device still holds the two latest chunks of the "
                "first and second half; pair an early chunk with the matching late one counted from the end"),
        Mistake("late chunk reversed", _order_late_chunk_reversed,
                "the right chunks, but the second one is written backwards: keep positions in increasing order "
                "inside each chunk"),
    ],
    default_hint="cut the sequence into 2P chunks of T/(2P) positions; device d takes one chunk from the start "
                 "and one from the end, so that early (cheap) and late (expensive) queries pair up",
    hints=(
        "device d holds chunk d and chunk 2P-1-d, in that order; the answer lists the positions of device 0's "
        "two chunks, then device 1's, and so on (np.arange, np.concatenate)",
        "c = seq_len // (2 * n_devices)\n"
        "ids = [i for d in range(n_devices) for i in (d, 2 * n_devices - 1 - d)]\n"
        "return np.concatenate([np.arange(i * c, (i + 1) * c) for i in ids])",
    ),
    answered_by=("labkit.attention.ring",),
))


# ---------------------------------------------------------------- 9.6 gradients through the ring

@functools.lru_cache(maxsize=32)
def _jitted_grads(candidate, is_causal: bool):
    """`candidate(attend, q, k, v, cotangent)` jitted, with a ring on 4 simulated (vmapped) devices as `attend`.

    Cached per candidate: the cases share their shapes, so a check compiles once per value of `is_causal`.
    """
    # The written-out ring of Exercises 9.3/9.4 (a plain loop: it compiles faster than labkit's scanned one).
    ring = functools.partial(_ring_with, axis_name=AXIS, is_causal=is_causal)

    def attend(q, k, v):
        out = jax.vmap(ring, axis_name=AXIS)(shards(q, 4), shards(k, 4), shards(v, 4))
        return jnp.swapaxes(out, 0, 1).reshape(q.shape[0], -1, *out.shape[3:])

    return jax.jit(lambda *a: candidate(attend, *a))


def run_grads(candidate, args, kwargs):
    """The candidate's `(dq, dk, dv)` through the ring; the expected ones are dense attention's, in numpy."""
    if candidate is grads_reference:
        return _dense_grads_np(*args, is_causal=kwargs["is_causal"])
    return _jitted_grads(candidate, kwargs["is_causal"])(*(jnp.asarray(a, jnp.float32) for a in args))


def _dense_grads_np(q, k, v, cotangent, *, is_causal):
    """Dense attention's `(dq, dk, dv)` in float64 numpy, head by head (no compilation: a fast check)."""
    from labkit.grading.labs.lab03 import _attention_and_grads_np

    per_head = [[_attention_and_grads_np(q[b, :, n], k[b, :, n], v[b, :, n], cotangent[b, :, n],
                                         is_causal=is_causal)[1] for n in range(q.shape[2])] for b in range(q.shape[0])]
    return tuple(np.stack([np.stack([heads[n][i] for n in range(q.shape[2])], 1) for heads in per_head])
                 for i in range(3))


def grads_reference(attend, q, k, v, cotangent):
    """`(dq, dk, dv)` of the loss sum(attend(q, k, v) * cotangent)."""
    return jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v) * cotangent), argnums=(0, 1, 2))(q, k, v)


def _grads_no_cotangent(attend, q, k, v, cotangent):
    return jax.grad(lambda q, k, v: jnp.sum(attend(q, k, v)), argnums=(0, 1, 2))(q, k, v)


def _grads_query_only(attend, q, k, v, cotangent):
    dq = jax.grad(lambda q: jnp.sum(attend(q, k, v) * cotangent))(q)
    return dq, dq, dq


def _grads_case(name, seed, b, t, n_heads, h, causal):
    def inputs():
        return tuple(_normal(seed + i, b, t, n_heads, h) for i in range(4)), {"is_causal": causal}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


register(Exercise(
    id="lab09.ring_grads",
    description="gradients through the ring (autodiff through ppermute) equal dense attention's",
    points=2,
    reference=grads_reference,
    run=run_grads,
    cases=[
        _grads_case("batch 2, 2 heads, seq 8", 0, 2, 8, 2, 4, False),
        _grads_case("causal, batch 2, 2 heads, seq 8", 10, 2, 8, 2, 4, True),
        _grads_case("batch 2, 2 heads, seq 8, another seed", 20, 2, 8, 2, 4, False),
        _grads_case("causal, another seed", 30, 2, 8, 2, 4, True),
        hidden(_grads_case("causal, seq 20, dim 3", 40, 1, 20, 1, 3, True)),
    ],
    mistakes=[
        Mistake("loss without the cotangent", _grads_no_cotangent,
                "the loss is the sum of the outputs weighted by the cotangent, element by element: without it "
                "you get the gradient of a different loss"),
        Mistake("only the query's gradient", _grads_query_only,
                "the keys and values get gradients too: differentiate with respect to all three arguments"),
    ],
    default_hint="the gradients are those of the scalar loss sum(attend(q, k, v) * cotangent) with respect to "
                 "q, k and v, returned as a tuple of three arrays",
    hints=(
        "jax.grad of a function of (q, k, v) returning that scalar, with argnums naming all three arguments; "
        "JAX differentiates through ppermute (its transpose sends the gradients back round the ring)",
        "loss = lambda q, k, v: jnp.sum(attend(q, k, v) * cotangent)\n"
        "return jax.grad(loss, argnums=(0, 1, 2))(q, k, v)",
    ),
))
