"""Lab 03 exercises: exact attention in chunks (Rabe & Staats): running max and sums, query chunks, the causal
block skip, and a memory-efficient `tl.SelfAttention`."""

from __future__ import annotations

import functools

import jax.numpy as jnp
import numpy as np

from labkit.attention.chunked import memory_efficient_attention
from labkit.attention.dense import dot_product_attention
from labkit.grading.exercise import Case, Exercise, Mistake, hidden, register
from labkit.grading.harness import LazyTraxLayer, run_with_weights_of, self_attention_with
from labkit.grading.inputs import layer_case as _layer_case, normal as _normal


def _chunks(n: int, size: int, drop_remainder: bool = False) -> list[slice]:
    stop = n - n % size if drop_remainder else n
    return [slice(start, min(start + size, n)) for start in range(0, stop, size)]


# ---------------------------------------------------------------- 1. one query, keys in chunks

def attend_one_query_reference(q, k, v, chunk_size):
    """One query `q [H]` against `k [S, H]`, `v [S, Hv]` -> `[Hv]` (the dense result; chunking is exact)."""
    del chunk_size
    return dot_product_attention(q[None, None], k[:, None], v[:, None])[0, 0]


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
                "when a chunk raises the running maximum from m to m', multiply the old running sums (both the "
                "weighted values and the normaliser) by exp(m - m') before adding the new chunk"),
        Mistake("no maximum subtracted", functools.partial(_one_query_with, subtract_max=False),
                "exp() of scores near 1e4 overflows: keep a running maximum and exponentiate s - max"),
        Mistake("last short chunk dropped", functools.partial(_one_query_with, drop_remainder=True),
                "when the chunk size does not divide the number of keys, the last chunk is shorter: "
                "loop over range(0, S, chunk_size) and slice k[start:start + chunk_size]"),
        Mistake("not normalised", functools.partial(_one_query_with, normalise=False),
                "return the weighted sum divided by the running normaliser sum(exp(s - max))"),
    ],
    default_hint="for each chunk: s = k_chunk @ q / sqrt(d); m' = max(m, max(s)); rescale old sums by "
                 "exp(m - m'); add exp(s - m') @ v_chunk and sum(exp(s - m')); finally divide",
))


# ---------------------------------------------------------------- 2. chunked queries and keys, one head

def chunked_attention_reference(q, k, v, query_chunk_size, key_chunk_size, causal=False):
    """One head: `q [T, H]`, `k [S, H]`, `v [S, Hv]` -> `[T, Hv]`, exact, in blocks."""
    return memory_efficient_attention(q[:, None], k[:, None], v[:, None], is_causal=causal,
                                      query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size)[:, 0]


def _chunked_with(q, k, v, query_chunk_size, key_chunk_size, causal=False, *, rescale=True, hide_padding=True,
                  ignore_causal=False, scale=True):
    """Blockwise attention written with Python loops, with one step done wrong."""
    q, k, v = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
    t, s = q.shape[0], k.shape[0]
    kc = key_chunk_size
    n_keys = -(-s // kc) * kc
    if not hide_padding:  # pads the keys to whole chunks and lets the zero keys take part
        k = jnp.pad(k, ((0, n_keys - s), (0, 0)))
        v = jnp.pad(v, ((0, n_keys - s), (0, 0)))
        s = n_keys
    q = q / np.sqrt(q.shape[-1]) if scale else q
    outs = []
    for qs in _chunks(t, query_chunk_size):
        q_pos = jnp.arange(t)[qs][:, None]
        acc = jnp.zeros((q_pos.shape[0], v.shape[-1]), jnp.float32)
        total = jnp.zeros((q_pos.shape[0], 1), jnp.float32)
        m = jnp.full((q_pos.shape[0], 1), -1e30, jnp.float32)
        for ks in _chunks(s, kc):
            sc = q[qs] @ k[ks].T
            if causal and not ignore_causal:
                sc = jnp.where(jnp.arange(s)[ks][None, :] <= q_pos, sc, -1e30)
            new_m = jnp.maximum(m, sc.max(-1, keepdims=True))
            corr = jnp.exp(m - new_m) if rescale else 1.0
            p = jnp.exp(sc - new_m)
            acc, total, m = acc * corr + p @ v[ks], total * corr + p.sum(-1, keepdims=True), new_m
        outs.append(acc / total)
    return jnp.concatenate(outs, axis=0)


def _chunked_case(name, seed, t, s, h, qc, kc, causal=False, *, logit_scale=1.0, hv=None):
    def inputs():
        q = _normal(seed, t, h, scale=logit_scale)
        k = _normal(seed + 1, s, h, scale=logit_scale) + np.linspace(0, 2, s, dtype=np.float32)[:, None]
        return (q + 1.0, k, _normal(seed + 2, s, hv or h), qc, kc), {"causal": causal}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


register(Exercise(
    id="lab03.chunked_attention",
    description="exact attention in [query_chunk, key_chunk] blocks with lax.map over queries, lax.scan over keys",
    points=3,
    reference=chunked_attention_reference,
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
        Mistake("old sums not rescaled", functools.partial(_chunked_with, rescale=False),
                "in the scan over key chunks, multiply the carried sums by exp(old_max - new_max) before adding "
                "the new chunk's terms"),
        Mistake("padded keys not hidden", functools.partial(_chunked_with, hide_padding=False),
                "when you pad the keys to whole chunks, the padded keys must be hidden (score -> very negative) "
                "or they take part in the softmax"),
        Mistake("causal ignored", functools.partial(_chunked_with, ignore_causal=True),
                "with causal=True hide key j from query i when j > i (compare global positions: chunk start "
                "+ offset), before the running maximum"),
        Mistake("missing scale", functools.partial(_chunked_with, scale=False),
                "scale the queries by 1/sqrt(d) (once, before the loops)"),
    ],
    default_hint="pad q and k/v to whole chunks, lax.map over query chunks, inside it lax.scan over key chunks "
                 "carrying (acc, row_sum, row_max); hide padded (and, if causal, future) keys; crop the output",
))


# ---------------------------------------------------------------- 3. which blocks causal attention needs

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
                "compare positions, not chunk numbers: query chunk i covers i*qc .. (i+1)*qc - 1 and key chunk j "
                "covers j*kc .. (j+1)*kc - 1; they differ when qc != kc"),
        Mistake("skips a block the last query needs", _block_skip_touching,
                "a query sees keys at its own position: skip only when the first key is AFTER the last query "
                "(first_key > last_query, not >=)"),
        Mistake("diagonal block not masked", _block_no_mask_on_diagonal,
                "a block is fully visible only when its LAST key is at or before its FIRST query; any other "
                "block that is not skipped needs the causal mask"),
    ],
    default_hint="skip if j*kc > (i+1)*qc - 1; full if (j+1)*kc - 1 <= i*qc; otherwise masked",
))


# ---------------------------------------------------------------- 4. the Trax layer

def _layer_mistake(**options):
    """A SelfAttention subclass built on the chunked loops above, with one mistake."""
    return self_attention_with(lambda q, k, v, causal: _chunked_with(q, k, v, 4, 4, causal, **options))


register(Exercise(
    id="lab03.memory_efficient_layer",
    description="a tl.SelfAttention subclass whose forward_unbatched uses chunked attention; matches Trax",
    points=3,
    reference=LazyTraxLayer("SelfAttention"),
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
                "when self._causal is True, pass causal=True to your chunked attention"),
        Mistake("old sums not rescaled", _layer_mistake(rescale=False),
                "your chunked attention does not rescale the running sums by exp(old_max - new_max): fix it "
                "in exercise 2 first"),
    ],
    default_hint="per head: q, k, v = x @ w_q, x @ w_k, x @ w_v; o = chunked_attention(q, k, v, ...); "
                 "return (o @ w_o, state)",
))
