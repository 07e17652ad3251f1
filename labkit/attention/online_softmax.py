"""The online softmax: attention accumulated over blocks of keys, exact, one block of scores at a time.

Milakov & Gimelshein 2018, "Online normalizer calculation for softmax"; used by Rabe & Staats 2021
(memory-efficient attention), FlashAttention and ring attention. For each query keep a running maximum `m`,
a running normaliser `l = sum_j exp(s_j - m)` and a running weighted sum `acc = sum_j exp(s_j - m) v_j`.
A new block of scores that raises the maximum to `m'` rescales the old sums by `exp(m - m')` before adding
its own terms; two partial results over disjoint key sets merge the same way. At the end `out = acc / l`.

The functions work on any leading axes: scores `[..., T, S]`, values `[..., S, Hv]`, a state's `m` and `l`
`[..., T]` and `acc` `[..., T, Hv]`. Hidden scores must be a large negative number (`LARGE_NEGATIVE`), not
-inf: a row that has seen only hidden keys then stays finite, and `seen_a_key` tells it apart.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp

from labkit.attention.dense import LARGE_NEGATIVE


class SoftmaxState(NamedTuple):
    """Running statistics of one softmax per query: `acc [..., T, Hv]`, `m [..., T]`, `l [..., T]` (float32)."""

    acc: jnp.ndarray
    m: jnp.ndarray
    l: jnp.ndarray


def init_state(rows: tuple, value_dim: int) -> SoftmaxState:
    """The state before any key: `rows` is `(..., T)`; nothing accumulated, maximum `LARGE_NEGATIVE`."""
    rows = tuple(rows)
    return SoftmaxState(jnp.zeros(rows + (value_dim,), jnp.float32), jnp.full(rows, LARGE_NEGATIVE, jnp.float32),
                        jnp.zeros(rows, jnp.float32))


def update(state: SoftmaxState, scores: jnp.ndarray, value: jnp.ndarray) -> SoftmaxState:
    """Add one block: scores `[..., T, S]` (hidden = `LARGE_NEGATIVE`), value `[..., S, Hv]`."""
    new_max = jnp.maximum(state.m, jnp.max(scores, axis=-1))
    p = jnp.exp(scores - new_max[..., None])
    correction = jnp.exp(state.m - new_max)  # rescales the old sums to the new maximum
    acc = state.acc * correction[..., None] + jnp.einsum("...qk,...kh->...qh", p, value.astype(jnp.float32),
                                                         preferred_element_type=jnp.float32)
    return SoftmaxState(acc, new_max, state.l * correction + jnp.sum(p, axis=-1))


def merge(a: SoftmaxState, b: SoftmaxState) -> SoftmaxState:
    """Two partial results over disjoint sets of keys -> the result over their union (order does not matter)."""
    m = jnp.maximum(a.m, b.m)
    ca, cb = jnp.exp(a.m - m), jnp.exp(b.m - m)
    return SoftmaxState(a.acc * ca[..., None] + b.acc * cb[..., None], m, a.l * ca + b.l * cb)


def seen_a_key(state: SoftmaxState) -> jnp.ndarray:
    """`[..., T]` True where the row has seen at least one visible key."""
    return state.m > 0.5 * LARGE_NEGATIVE


def finalize(state: SoftmaxState) -> tuple[jnp.ndarray, jnp.ndarray]:
    """`(out [..., T, Hv], logsumexp [..., T])`. Rows that saw no visible key hold the mean of what they saw."""
    return state.acc / state.l[..., None], state.m + jnp.log(state.l)
