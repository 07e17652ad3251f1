"""Lab 01 exercises: dot-product attention, the causal mask, a Trax layer, local attention, memory."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from labkit.attention.dense import causal_mask as dense_causal_mask
from labkit.attention.dense import dot_product_attention
from labkit.attention.local import local_attention as labkit_local_attention
from labkit.grading.exercise import Case, Exercise, Mistake, hidden, register
from labkit.grading.harness import LazyTraxLayer, run_jitted, run_with_weights_of, self_attention_with
from labkit.grading.inputs import layer_case as _layer_case, normal as _normal


# ---------------------------------------------------------------- 1. attention for one head

def attention_reference(q, k, v, mask=None):
    """One head: q `[T, H]`, k `[S, H]`, v `[S, Hv]`, mask bool `[T, S]` (True = may attend) -> `[T, Hv]`."""
    return dot_product_attention(q[:, None], k[:, None], v[:, None], mask=mask)[:, 0]


def _softmax_stable(s, axis=-1):
    s = s - jnp.max(s, axis=axis, keepdims=True)
    e = jnp.exp(s)
    return e / jnp.sum(e, axis=axis, keepdims=True)


def _attention_with(q, k, v, mask=None, *, scale=True, axis=-1, softmax=_softmax_stable, fill=-1e9,
                    mask_after=False):
    scores = q @ k.T / (np.sqrt(q.shape[-1]) if scale else 1.0)
    if mask is not None and not mask_after:
        scores = jnp.where(mask, scores, fill)
    probs = softmax(scores, axis=axis)
    if mask is not None and mask_after:
        probs = probs * mask
    return probs @ v


def _logsumexp_softmax(s, axis=-1):
    return jnp.exp(s - jax.scipy.special.logsumexp(s, axis=axis, keepdims=True))


def _naive_softmax(s, axis=-1):
    e = jnp.exp(s)
    return e / jnp.sum(e, axis=axis, keepdims=True)


def _qkv_case(name, seed, t, s, h, hv=None, *, logit_scale=1.0, mask=None):
    def inputs():
        q = _normal(seed, t, h, scale=logit_scale)
        k = _normal(seed + 1, s, h, scale=logit_scale)
        v = _normal(seed + 2, s, hv or h)
        return (q, k, v, mask() if mask else None), {}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


def _random_mask(t, s, seed):
    def make():
        m = np.random.default_rng(seed).random((t, s)) > 0.4
        m[np.arange(t), np.random.default_rng(seed + 1).integers(0, s, t)] = True  # every row sees a key
        return m
    return make


def _mask_with_hidden_row():
    m = _random_mask(5, 5, 7)()
    m[2] = False
    return m


register(Exercise(
    id="lab01.attention",
    run=run_jitted,
    description="scaled dot-product attention for one head, stable softmax, optional mask",
    points=3,
    reference=attention_reference,
    cases=[
        _qkv_case("tiny: seq 4, dim 2", 0, 4, 4, 2),
        _qkv_case("3 queries, 5 keys, dim 4, value dim 6", 10, 3, 5, 4, 6),
        _qkv_case("with a mask: seq 6, dim 4", 20, 6, 6, 4, mask=_random_mask(6, 6, 21)),
        _qkv_case("large logits: seq 8, dim 4, logits up to ~1e4", 30, 8, 8, 4, logit_scale=60.0),
        _qkv_case("length 1", 40, 1, 1, 3),
        _qkv_case("a row whose keys are all hidden: seq 5 (expect the mean of the values)", 50, 5, 5, 4,
                  mask=_mask_with_hidden_row),
        hidden(_qkv_case("7 queries, 5 keys, dim 3, value dim 2, with a mask", 60, 7, 5, 3, 2,
                         mask=_random_mask(7, 5, 61))),
    ],
    mistakes=[
        Mistake("missing scale", functools.partial(_attention_with, scale=False),
                "the scores are not scaled: divide them by sqrt(d), d being the query/key dimension, before "
                "the softmax"),
        Mistake("softmax over queries", functools.partial(_attention_with, axis=0),
                "the softmax runs over the keys, i.e. along each row of scores (one row per query), so that "
                "every row of weights sums to 1"),
        Mistake("-inf mask", functools.partial(_attention_with, fill=-jnp.inf),
                "a row whose keys are all hidden turns into 0/0 = NaN: give hidden scores a large finite "
                "negative value (the text above suggests one), not minus infinity"),
        Mistake("naive softmax", functools.partial(_attention_with, softmax=_naive_softmax),
                "exp() of scores near 1e4 overflows float32: shift each row by its maximum before "
                "exponentiating (the softmax does not change)"),
        Mistake("logsumexp of a hidden row", functools.partial(_attention_with, softmax=_logsumexp_softmax),
                "in float32, -1e9 minus the logsumexp of a row that is entirely -1e9 rounds to 0, so every "
                "weight of that row becomes 1: normalise by dividing by the row's sum instead"),
        Mistake("mask after softmax", functools.partial(_attention_with, mask_after=True),
                "hide keys before the softmax (set their scores very negative); zeroing probabilities "
                "afterwards leaves rows that no longer sum to 1"),
    ],
    default_hint="compare your steps with the four in the text: scale the scores, hide the masked ones, a "
                 "stable softmax over the keys, then the weighted sum of the values; print the shape after "
                 "each step",
    hints=(
        "the scores are the queries' dot products with the keys, [T, S], divided by sqrt(d); hidden ones get "
        "a large negative value before the softmax; the stable softmax subtracts each row's maximum, "
        "exponentiates and divides by the row's sum (axis -1); the output is the weights times v",
        "scores = q @ k.T / jnp.sqrt(q.shape[-1])\n"
        "if mask is not None:\n"
        "    scores = jnp.where(mask, scores, -1e9)\n"
        "scores = scores - jnp.max(scores, axis=-1, keepdims=True)\n"
        "weights = jnp.exp(scores)\n"
        "return (weights / jnp.sum(weights, axis=-1, keepdims=True)) @ v",
    ),
    nan_hint="NaN or inf means exp() overflowed, or a row had no visible key and became 0/0: shift each row by "
             "its maximum before exponentiating, and give hidden scores a large finite negative value",
    answered_by=("labkit.attention.dense.dot_product_attention", "labkit.attention.dense.attention_weights",
                 "labkit.layers.DotProductSelfAttention"),
))


# ---------------------------------------------------------------- 2. causal mask

def causal_mask_reference(n):
    """Boolean `[n, n]`, True where query i may see key j, i.e. j <= i."""
    return dense_causal_mask(n, n)


register(Exercise(
    id="lab01.causal_mask",
    run=run_jitted,
    description="the boolean causal mask: position i may attend to j <= i",
    points=1,
    reference=causal_mask_reference,
    cases=[Case(f"n = {n}", functools.partial(lambda n: ((n,), {}), n)) for n in (1, 3, 8, 33)]
    + [hidden(Case("n = 17", lambda: ((17,), {})))],
    mistakes=[
        Mistake("float mask", lambda n: jnp.tril(jnp.ones((n, n), jnp.float32)),
                "the mask holds the right pattern as numbers: return booleans (True = may attend), i.e. build "
                "the array with dtype bool"),
        Mistake("upper triangle", lambda n: jnp.triu(jnp.ones((n, n), bool)),
                "rows are queries, columns are keys: keep the lower triangle (j <= i), not the upper one"),
        Mistake("diagonal excluded", lambda n: jnp.tril(jnp.ones((n, n), bool), k=-1),
                "a position may attend to itself: keep the diagonal (j <= i, not j < i)"),
    ],
    default_hint="row i is query i and column j is key j: True exactly where j <= i (the diagonal included), "
                 "as a boolean array of shape [n, n]",
    hints=(
        "that pattern is the lower triangle of an n x n matrix of ones; jnp.tril keeps it, and the dtype "
        "argument of jnp.ones makes it boolean",
        "return jnp.tril(jnp.ones((n, n), dtype=bool))",
    ),
    answered_by=("labkit.attention.dense.causal_mask",),
))


# ---------------------------------------------------------------- 3. a tl.SelfAttention subclass

run_layer = run_with_weights_of("SelfAttention")


def _layer_mistake(*, ignore_causal=False, scale=True):
    """A SelfAttention subclass whose per-head attention makes a mistake."""

    def attend(q, k, v, causal):
        mask = causal_mask_reference(q.shape[0]) if causal and not ignore_causal else None
        return _attention_with(q, k, v, mask, scale=scale)

    return self_attention_with(attend)


register(Exercise(
    id="lab01.self_attention_layer",
    description="subclass tl.SelfAttention and override forward_unbatched; match Trax with the same weights",
    points=3,
    reference=LazyTraxLayer("SelfAttention"),
    fallback=LazyTraxLayer("SelfAttention").load,
    run=run_layer,
    expects_class=True,
    cases=[
        _layer_case("one head, seq 4, d_model 8", 0, 1, 4, 8, n_heads=1, d_qk=4, d_v=4),
        _layer_case("causal, 2 heads, seq 8", 1, 2, 8, 8, n_heads=2, d_qk=4, d_v=4, causal=True),
        _layer_case("d_qk 4, d_v 6, d_model 10, batch 3", 2, 3, 6, 10, n_heads=2, d_qk=4, d_v=6),
        _layer_case("use_reference_code=True, causal, 4 heads, seq 16", 3, 2, 16, 8, n_heads=4, d_qk=4, d_v=4,
                    causal=True, use_reference_code=True),
        _layer_case("mode='eval', seq 1", 4, 2, 1, 8, n_heads=2, d_qk=4, d_v=4, mode="eval"),
        hidden(_layer_case("causal, 3 heads, d_qk 2, d_v 3, seq 7, d_model 6", 6, 1, 7, 6, n_heads=3, d_qk=2,
                           d_v=3, causal=True)),
    ],
    mistakes=[
        Mistake("ignores causal", _layer_mistake(ignore_causal=True),
                "when self._causal is True, pass the causal mask to your attention"),
        Mistake("missing scale", _layer_mistake(scale=False),
                "your attention must scale the scores by 1/sqrt(d_qk), as Trax does"),
    ],
    default_hint="forward_unbatched sees one example and one head: project x to the head's queries, keys and "
                 "values, attend (causally when self._causal is set), map back with w_o, and return the pair "
                 "(output, state)",
    hints=(
        "unpack weights into w_q, w_k, w_v, w_o; each projection is x times one of them; build the mask with "
        "`causal` only when self._causal is True (None otherwise); call `attend`; multiply its result by w_o; "
        "return it together with the state you were given",
        "w_q, w_k, w_v, w_o = weights\n"
        "q, k, v = x @ w_q, x @ w_k, x @ w_v\n"
        "mask = causal(x.shape[0]) if self._causal else None\n"
        "return attend(q, k, v, mask) @ w_o, state",
    ),
    answered_by=("labkit.layers.DotProductSelfAttention",),
))


# ---------------------------------------------------------------- 4. chunked local attention

def local_attention_reference(q, k, v, chunk_len, n_chunks_before=1, is_causal=True):
    """One head `[T, H]`: attend within each chunk and `n_chunks_before` previous ones (wrapping), as Trax."""
    return labkit_local_attention(q[:, None], k[:, None], v[:, None], is_causal=is_causal, chunk_len=chunk_len,
                                  n_chunks_before=n_chunks_before)[:, 0]


def _local_with(q, k, v, chunk_len, n_chunks_before=1, is_causal=True, *, before=None, after=0, scale=None,
                wrap_mask=False):
    """A wrong local attention: other chunk offsets, scale, or a causal mask that misses wrapped chunks."""
    before = n_chunks_before if before is None else before
    out = labkit_local_attention(q[:, None], k[:, None], v[:, None], is_causal=is_causal and not wrap_mask,
                                 chunk_len=chunk_len, n_chunks_before=before, n_chunks_after=after,
                                 scale=scale)[:, 0]
    if not wrap_mask:
        return out
    # Causal only inside each chunk: the wrapped "previous" chunk of chunk 0 stays visible.
    t, l = q.shape[0], chunk_len
    n = t // l
    qc, kc, vc = (a.reshape(n, l, -1) for a in (q, k, v))
    kw = jnp.concatenate([jnp.roll(kc, 1, axis=0), kc], axis=1)
    vw = jnp.concatenate([jnp.roll(vc, 1, axis=0), vc], axis=1)
    s = jnp.einsum("clh,cwh->clw", qc, kw) / np.sqrt(q.shape[-1])
    own = jnp.concatenate([jnp.ones((l, l), bool), jnp.tril(jnp.ones((l, l), bool))], axis=1)
    s = jnp.where(own, s, -1e9)
    return jnp.einsum("clw,cwh->clh", jax.nn.softmax(s, -1), vw).reshape(t, -1)


def _local_case(name, seed, t, h, chunk_len, n_chunks_before=1, is_causal=True):
    def inputs():
        q, k, v = _normal(seed, t, h), _normal(seed + 1, t, h), _normal(seed + 2, t, h)
        return (q, k, v, chunk_len), {"n_chunks_before": n_chunks_before, "is_causal": is_causal}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


register(Exercise(
    id="lab01.local_attention",
    run=run_jitted,
    description="chunked local attention with look-adjacent chunks, matching tl.SelfAttention(chunk_len=...)",
    points=3,
    reference=local_attention_reference,
    cases=[
        _local_case("seq 8, chunks of 4, causal, one chunk back", 0, 8, 4, 4),
        _local_case("seq 12, chunks of 3, causal, two chunks back", 10, 12, 4, 3, 2),
        _local_case("one chunk holds the whole sequence (seq 6)", 20, 6, 4, 6),
        _local_case("chunk_len 1: each position sees itself and the one before", 30, 5, 2, 1),
        _local_case("not causal, seq 8, chunks of 2: chunk 0 wraps around to the last chunk", 40, 8, 4, 2,
                    is_causal=False),
        _local_case("seq 32, chunks of 8, dim 16", 50, 32, 16, 8),
        hidden(_local_case("seq 15, chunks of 5, causal, two chunks back, dim 3", 60, 15, 3, 5, 2)),
    ],
    mistakes=[
        Mistake("no look-back", functools.partial(_local_with, before=0),
                "each chunk must also attend to the n_chunks_before chunks before it, not only to itself"),
        Mistake("looks ahead", functools.partial(_local_with, before=0, after=1),
                "the extra chunks are the previous ones (chunk c sees chunk c-1), not the next ones: check the "
                "direction of your roll"),
        Mistake("causal only inside the chunk", functools.partial(_local_with, wrap_mask=True),
                "mask by position, not by place in the window: chunk 0's 'previous' chunk wraps around to the "
                "end of the sequence and must be hidden when causal"),
    ],
    default_hint="each query chunk scores its own chunk and the n_chunks_before chunks before it (wrapping "
                 "around), and with is_causal hides keys whose true position is after the query's",
    hints=(
        "follow the recipe's three steps: reshape q, k, v and the positions 0..T-1 into chunks; build each "
        "chunk's window of keys, values and key positions with jnp.roll along the chunk axis and a "
        "concatenation along the position axis (oldest chunk first); score, mask by position, softmax, "
        "weight the values and reshape back",
        "n_chunks = q.shape[0] // chunk_len\n"
        "positions = jnp.arange(q.shape[0]).reshape(n_chunks, chunk_len)\n"
        "def with_previous(a):  # [n_chunks, chunk_len, ...] -> [n_chunks, (1 + n_before) * chunk_len, ...]\n"
        "    return jnp.concatenate([jnp.roll(a, i, axis=0) for i in range(n_chunks_before, 0, -1)] + [a], axis=1)\n"
        "k_window = with_previous(k.reshape(n_chunks, chunk_len, -1))   # v_window, k_positions alike\n"
        "scores = jnp.einsum('cld,cwd->clw', q.reshape(n_chunks, chunk_len, -1), k_window) / jnp.sqrt(q.shape[-1])\n"
        "if is_causal:\n"
        "    scores = jnp.where(k_positions[:, None, :] <= positions[:, :, None], scores, -1e9)\n"
        "out = jnp.einsum('clw,cwd->cld', jax.nn.softmax(scores, axis=-1), v_window).reshape(q.shape[0], -1)",
    ),
    answered_by=("labkit.attention.local.local_attention",),
))


# ---------------------------------------------------------------- 5. predicting the score matrix's memory

def score_matrix_bytes_reference(batch, heads, seq_len, bytes_per_value=4):
    """Bytes of the `[batch, heads, seq, seq]` score matrix dense attention materialises."""
    return int(batch * heads * seq_len * seq_len * bytes_per_value)


register(Exercise(
    id="lab01.score_memory",
    run=run_jitted,
    description="predict the bytes of the attention score matrix from batch, heads and length",
    points=1,
    reference=score_matrix_bytes_reference,
    cases=[
        # No registered mistake gives the right number on a case a learner sees, so a right count of the
        # wrong type (a float) is never taken for one of them.
        Case("batch 1, 2 heads, seq 1024", lambda: ((1, 2, 1024), {})),
        Case("batch 8, 4 heads, seq 4096", lambda: ((8, 4, 4096), {})),
        Case("batch 2, 8 heads, seq 16384, float16", lambda: ((2, 8, 16384), {"bytes_per_value": 2})),
        Case("batch 4, 3 heads, seq 100, float64", lambda: ((4, 3, 100), {"bytes_per_value": 8})),
        hidden(Case("batch 3, 6 heads, seq 1000, float64", lambda: ((3, 6, 1000), {"bytes_per_value": 8}))),
    ],
    mistakes=[
        Mistake("length not squared", lambda b, h, n, bytes_per_value=4: b * h * n * bytes_per_value,
                "every query has a score for every key: the matrix is seq_len by seq_len, not seq_len long"),
        Mistake("per example and head", lambda b, h, n, bytes_per_value=4: n * n * bytes_per_value,
                "there is one score matrix per example and per head: multiply by batch and heads"),
        Mistake("bits", lambda b, h, n, bytes_per_value=4: b * h * n * n * bytes_per_value * 8,
                "count bytes, not bits: a float32 value takes 4 bytes"),
    ],
    default_hint="count the values first (how many score matrices, and how many scores in each), then the "
                 "bytes each value takes; if only the large cases fail, your count may have wrapped around "
                 "(an int32 holds at most 2**31 - 1, about 2.1e9; Python ints never wrap)",
    hints=(
        "there is one [seq_len, seq_len] matrix per example and per head, and each value takes "
        "bytes_per_value bytes: multiply those counts with integer arithmetic",
        "return batch * heads * seq_len * seq_len * bytes_per_value",
    ),
))
