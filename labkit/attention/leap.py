"""LEAP: linear explainable attention in parallel, made numerically stable, with an RNN form.

Tang Hu, "LEAP: Linear Explainable Attention in Parallel" (github.com/mtanghu/leap, 2022). Each head has
four projections: queries `q`, focus vectors `f`, keys `k` and values `v` (size d, scale `s = 1/sqrt(d)`).
Every position scores how much it deserves focus, `a_j = s f_j . k_j` (a scalar: no query is involved).
Keys and values are then averaged with softmax(a) weights over a causal window of the last `w` positions
(`w = None`: the whole prefix):

    K~_t = sum_{j in W(t)} e^{a_j} k_j / sum_{j in W(t)} e^{a_j},   V~_t likewise with v_j,
    W(t) = {j : t - w < j <= t},
    out_t = sigmoid(s q_t . K~_t) * V~_t.

Because the weights depend on `j` only, the sums are running (windowed) sums: no `[T, T]` matrix is ever
formed. This module makes them stable where the original is not:

- running softmax: the sums are kept as `(m, l, S)` = (running max, `sum e^{a-m}`, `sum e^{a-m} x`), combined
  by an associative operator (rescale both sides to the larger max), so logits of 1e4 never overflow;
- windowed sums are NOT a prefix sum minus a shifted prefix sum (that subtracts large, nearly equal numbers
  and loses all precision once `e^{a}` varies a lot): the sequence is cut into blocks of `w`, each window
  is one in-block suffix combined with one in-block prefix (van Herk / Gil-Werman), both associative scans;
- the gradient is a `jax.custom_vjp` that stores only its inputs and recomputes the sums backwards; the
  backward pass is itself a windowed `(max, sum)` scan (looking forward in time), stable for the same reason.

Options: `rescale` normalises q, f, k, v over the head dimension (zero mean, unit std) and uses the scale
`rescale / d` ("strong scaling" in the original); `mask` hides padding (hidden positions get no focus;
a position whose whole window is hidden outputs 0); `position_embedding` is "none", "rotary" (q, f, k rotated
by their absolute positions after `rescale`: `f_j . k_j` is unchanged, the gate `q_t . K~_t` sees only
position differences) or "alibi" (`slope * j` added to the focus logits, which is exactly ALiBi's distance
penalty `-slope (t - j)` because the `t` part cancels in the softmax; causal only).

Forms: `leap_attention(..., is_causal=True)` (parallel, causal), `leap_step` / `generate` (recurrent, O(1)
state: four running sums for global LEAP, a ring buffer of the last `w` logits, keys and values for windowed
LEAP, plus the absolute position that rotary and ALiBi need), `leap_attention(..., is_causal=False)` (encoder: one causal pass each way), `leap_explain` (the `[T, T]` weights
`sigmoid(.) e^{a_j} / sum e^{a}` with which each output mixes the values: out = explain @ v exactly),
`leap_logits` (the focus and gate logits themselves, e.g. to watch them grow during training).

Cost per head: O(T H) time and memory (the associative scans add a log T factor of parallel depth, not of
memory), O(1) path length between any two positions in global LEAP; decoding costs O(H) per token
(O(w H) with a window).
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from labkit.attention._validate import as_float_array, default_scale, key_padding_mask, reject_bias
from labkit.attention.decoding import decode
from labkit.attention.positional import position_options, rotary

NEG_INF = -jnp.inf


# ---------------------------------------------------------------- the (max, sum) monoid

def _combine(left, right):
    """Merge two `(m, l, S)` summaries: rescale both to the larger max. `m = -inf` means "nothing yet"."""
    m1, l1, s1 = left
    m2, l2, s2 = right
    m = jnp.maximum(m1, m2)
    safe = jnp.where(jnp.isfinite(m), m, 0.0)  # both empty: avoid -inf - -inf = NaN
    c1, c2 = jnp.exp(m1 - safe), jnp.exp(m2 - safe)
    return m, l1 * c1 + l2 * c2, s1 * c1[..., None] + s2 * c2[..., None]


def _leaves(logits: jnp.ndarray, x: jnp.ndarray):
    """One summary per position: `(a_j, 1, x_j)`, or the empty summary where `a_j = -inf` (hidden)."""
    live = jnp.isfinite(logits)
    return logits, live.astype(x.dtype), jnp.where(live[..., None], x, 0.0)


def window_scan(logits: jnp.ndarray, x: jnp.ndarray, window: int | None, *, reverse: bool = False):
    """Windowed softmax sums along axis 1: logits `[B, T, N]`, x `[B, T, N, D]` -> `(m, l, S)`.

    Forward: position t summarises j in (t - w, t]; `reverse=True`: j in [t, t + w). `window=None`: all of
    the prefix (suffix). `sum_j e^{a_j} x_j = e^m S`, `sum_j e^{a_j} = e^m l`; nothing is ever subtracted.
    """
    if reverse:
        m, l, s = window_scan(jnp.flip(logits, 1), jnp.flip(x, 1), window)
        return jnp.flip(m, 1), jnp.flip(l, 1), jnp.flip(s, 1)
    t = logits.shape[1]
    if window is None or window >= t:
        return jax.lax.associative_scan(_combine, _leaves(logits, x), axis=1)
    w = window
    # Pad w empty positions in front (so every window start exists) and the end to a multiple of w.
    back = -(t + w) % w
    logits = jnp.pad(logits, [(0, 0), (w, back), (0, 0)], constant_values=NEG_INF)
    x = jnp.pad(x, [(0, 0), (w, back), (0, 0), (0, 0)])
    b, p, n = logits.shape
    blocks = jax.tree_util.tree_map(lambda a: a.reshape((b, p // w, w) + a.shape[2:]), _leaves(logits, x))
    flat = lambda tree: jax.tree_util.tree_map(lambda a: a.reshape((b, p) + a.shape[3:]), tree)
    prefix = flat(jax.lax.associative_scan(_combine, blocks, axis=2))
    suffix = flat(jax.lax.associative_scan(_combine, blocks, axis=2, reverse=True))
    # Padded position t + w: its window starts at t + 1 (padded), in the previous block unless t + w ends a
    # block, in which case the window is exactly the in-block prefix.
    pre = jax.tree_util.tree_map(lambda a: a[:, w:w + t], prefix)
    suf = jax.tree_util.tree_map(lambda a: a[:, 1:t + 1], suffix)
    both = _combine(suf, pre)
    ends = ((jnp.arange(t) + 1) % w == 0)[None, :, None]
    return (jnp.where(ends, pre[0], both[0]), jnp.where(ends, pre[1], both[1]),
            jnp.where(ends[..., None], pre[2], both[2]))


def _averages(logits, k, v, window):
    """`K~, V~ [B, T, N, H]` and the log-normaliser `lse [B, T, N]` (-inf where the window is all hidden)."""
    d = k.shape[-1]
    m, l, s = window_scan(logits, jnp.concatenate([k, v], -1), window)
    live = l > 0
    avg = jnp.where(live[..., None], s / jnp.where(live, l, 1.0)[..., None], 0.0)
    lse = jnp.where(live, m + jnp.log(jnp.where(live, l, 1.0)), NEG_INF)
    return avg[..., :d], avg[..., d:], lse


def _core(logits, q, k, v, scale, window):
    """Gated output `sigmoid(scale q . K~) V~` on `[B, T, N, *]`, logits `[B, T, N]`."""
    k_avg, v_avg, _ = _averages(logits, k, v, window)
    gate = jax.nn.sigmoid(scale * jnp.einsum("btnd,btnd->btn", q, k_avg))
    return gate[..., None] * v_avg


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _core_recompute(logits, q, k, v, scale, window):
    """`_core` whose gradient keeps only the inputs and recomputes the sums (O(T H) memory)."""
    return _core(logits, q, k, v, scale, window)


def _core_fwd(logits, q, k, v, scale, window):
    return _core(logits, q, k, v, scale, window), (logits, q, k, v)


def _core_bwd(scale, window, residuals, g):
    logits, q, k, v = residuals
    d = k.shape[-1]
    k_avg, v_avg, lse = _averages(logits, k, v, window)
    gate = jax.nn.sigmoid(scale * jnp.einsum("btnd,btnd->btn", q, k_avg))
    dv_avg = gate[..., None] * g
    dz = jnp.einsum("btnd,btnd->btn", g, v_avg) * gate * (1.0 - gate) * scale
    dq = dz[..., None] * k_avg
    dk_avg = dz[..., None] * q
    # X~_t = sum_j p_tj x_j with p_tj = e^{a_j - lse_t}. Then dx_j = sum_{t in F(j)} p_tj dX~_t and
    # da_j = sum_{t in F(j)} p_tj (dK~_t . k_j + dV~_t . v_j - c_t), c_t = dK~_t . K~_t + dV~_t . V~_t,
    # F(j) = [j, j + w). So e^{a_j} times a forward-looking windowed sum with logits -lse_t: the same scan.
    live = jnp.isfinite(lse)
    c = jnp.einsum("btnd,btnd->btn", dk_avg, k_avg) + jnp.einsum("btnd,btnd->btn", dv_avg, v_avg)
    carried = jnp.concatenate([dk_avg, dv_avg, c[..., None]], -1) * live[..., None]
    m2, _, s2 = window_scan(jnp.where(live, -lse, NEG_INF), carried, window, reverse=True)
    # a_j + m2_j <= 0 (j lies in every window it is summed over), so this exp cannot overflow.
    weight = jnp.where(jnp.isfinite(logits) & jnp.isfinite(m2), jnp.exp(logits + jnp.where(jnp.isfinite(m2), m2, 0.0)), 0.0)
    sk, sv, sc = s2[..., :d] * weight[..., None], s2[..., d:-1] * weight[..., None], s2[..., -1] * weight
    dlogits = jnp.einsum("btnd,btnd->btn", sk, k) + jnp.einsum("btnd,btnd->btn", sv, v) - sc
    return dlogits, dq, sk, sv


_core_recompute.defvjp(_core_fwd, _core_bwd)


@functools.partial(jax.jit, static_argnums=(4, 5, 6))
def _run_core(logits, q, k, v, scale, window, recompute_grad):
    """Compiled once per shape and option: eager associative scans would dispatch hundreds of small ops."""
    core = _core_recompute if recompute_grad else _core
    return core(logits, q, k, v, scale, window)


# ---------------------------------------------------------------- shared preparation

def _standardise(x: jnp.ndarray, eps: float = 1e-5) -> jnp.ndarray:
    """Zero mean, unit standard deviation over the last (head) axis."""
    mean = jnp.mean(x, -1, keepdims=True)
    return (x - mean) * jax.lax.rsqrt(jnp.var(x, -1, keepdims=True) + eps)


def _prepare(query, focus, key, value, rescale, scale):
    """Promote to float32+, apply `rescale` (standardise, scale = rescale / d); return arrays and the scale."""
    dtype = jnp.promote_types(value.dtype, jnp.float32)
    q, f, k, v = (a.astype(dtype) for a in (query, focus, key, value))
    d = q.shape[-1]
    if rescale is not None:
        q, f, k, v = (_standardise(a) for a in (q, f, k, v))
        scale = rescale / d if scale is None else scale
    return q, f, k, v, default_scale(scale, d)


def _rotate(rotate: bool, q, f, k, positions=None):
    """Rotary embedding of q, f, k `[batch..., T, N, H]` at `positions [T]` (default 0..T-1), if `rotate`."""
    if not rotate:
        return q, f, k
    return tuple(rotary(a, positions) for a in (q, f, k))


def _check(query, focus, key, value):
    """Arrays `[batch..., T, N, H]` (value `[..., Hv]`) of one shape, else a ValueError naming them."""
    arrays = [as_float_array(n, a) for n, a in (("query", query), ("focus", focus), ("key", key), ("value", value))]
    q, f, k, v = arrays
    shapes = f"query {q.shape}, focus {f.shape}, key {k.shape}, value {v.shape}"
    if q.ndim < 3 or not (q.shape == f.shape == k.shape) or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"query, focus and key must be [batch..., seq, heads, d] of one shape and value "
                         f"[batch..., seq, heads, dv]; got {shapes}")
    return arrays


def _check_window(window, seq_len: int) -> int | None:
    if window is None:
        return None
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
        raise ValueError(f"window must be a positive int or None, got {window!r}")
    return None if window >= seq_len else window


def _positions_mask(mask, shape: tuple) -> jnp.ndarray | None:
    """Boolean mask broadcastable to `[batch..., N, 1, T]` (True = real position) -> `[batch..., T, N]`."""
    keep = key_padding_mask(mask, shape, "LEAP")
    return None if keep is None else jnp.swapaxes(keep[..., 0, :], -1, -2)


def focus_logits(focus, key, *, scale: float, mask=None, alibi=None) -> jnp.ndarray:
    """`a_j = scale f_j . k_j` `[batch..., T, N]`; hidden positions -inf; `alibi` `[N]` adds `slope * j`."""
    logits = scale * jnp.einsum("...tnd,...tnd->...tn", focus, key)
    if alibi is not None:
        positions = jnp.arange(logits.shape[-2], dtype=logits.dtype)
        logits = logits + positions[:, None] * jnp.asarray(alibi, logits.dtype)
    if mask is not None:
        logits = jnp.where(mask, logits, NEG_INF)
    return logits


def _flat(a: jnp.ndarray, trailing: int = 3) -> jnp.ndarray:
    """Merge the batch axes: `[batch..., T, N, *]` -> `[B, T, N, *]` (logits: trailing=2)."""
    return a.reshape((-1,) + a.shape[a.ndim - trailing:])


# ---------------------------------------------------------------- public functions

def leap_attention(query, key, value, bias=None, mask=None, *, focus, is_causal: bool = False,
                   scale: float | None = None, window: int | None = None, rescale: float | None = None,
                   position_embedding: str = "none", alibi=None, recompute_grad: bool = True,
                   combine: str = "mean") -> jnp.ndarray:
    """LEAP `[batch..., T, N, Hv]` from query/focus/key `[batch..., T, N, H]`, value `[batch..., T, N, Hv]`.

    Args:
      query, key, value: `[batch..., T, N, *]` (self-attention: one length).
      bias: must be None (LEAP never forms query-key scores).
      mask: optional boolean mask broadcastable to `[batch..., N, 1, T]` (True = real position); hidden
        positions get no focus. An output whose whole window is hidden is 0.
      focus: the focus vectors `[batch..., T, N, H]` (LEAP's fourth projection).
      is_causal: True is decoder LEAP (each position sees its prefix); False the encoder form: a causal pass
        each way (the second on the reversed sequence), combined by `combine`.
      scale: logit scale; default 1/sqrt(H) (or rescale / H with `rescale`).
      window: attend to the last `window` positions (including the current one); None = the whole prefix.
      rescale: None, or a constant c: standardise q, f, k, v over the head axis and use scale c / H.
      position_embedding: "none", "rotary" (rotate q, f, k by positions 0..T-1) or "alibi" (focus logits
        `+ slope * j`, causal only).
      alibi: optional custom ALiBi slopes `[N]` (>= 0 favours recent positions; default `alibi_slopes(N)`);
        passing them alone selects "alibi".
      recompute_grad: use the constant-memory custom gradient (True) or differentiate the scans (False).
      combine: encoder form only: "mean" of the two passes, or "concat" (`[batch..., T, N, 2 Hv]`, forward
        first).

    Returns:
      `[batch..., T, N, Hv]` in `value`'s dtype, computed in at least float32.
    """
    reject_bias(bias, "LEAP")
    query, focus, key, value = _check(query, focus, key, value)
    rotate, slopes = position_options(position_embedding, alibi, query.shape[-2])
    kw = dict(window=window, rescale=rescale, scale=scale, rotate=rotate, slopes=slopes,
              recompute_grad=recompute_grad)
    if is_causal:
        return _causal_leap(query, focus, key, value, mask=mask, **kw)
    if combine not in ("mean", "concat"):
        raise ValueError(f"combine must be 'mean' or 'concat', got {combine!r}")
    if slopes is not None:
        raise ValueError("alibi favours recent positions, which has no meaning for the encoder form "
                         "(is_causal=False): use position_embedding='none' or 'rotary'")
    fwd = _causal_leap(query, focus, key, value, mask=mask, **kw)
    flip = lambda a: jnp.flip(jnp.asarray(a), -3)
    rev_mask = None if mask is None else jnp.flip(jnp.asarray(mask), -1)
    bwd = jnp.flip(_causal_leap(flip(query), flip(focus), flip(key), flip(value), mask=rev_mask, **kw), -3)
    return (fwd + bwd) / 2 if combine == "mean" else jnp.concatenate([fwd, bwd], -1)


def _causal_leap(query, focus, key, value, *, mask, window, rescale, scale, rotate, slopes, recompute_grad):
    """Decoder LEAP on checked arrays: the parallel (scan) form of the recurrence."""
    window = _check_window(window, query.shape[-3])
    q, f, k, v, s = _prepare(query, focus, key, value, rescale, scale)
    q, f, k = _rotate(rotate, q, f, k)
    logits = focus_logits(f, k, scale=s, mask=_positions_mask(mask, query.shape), alibi=slopes)
    out = _run_core(_flat(logits, 2), _flat(q), _flat(k), _flat(v), float(s), window, bool(recompute_grad))
    return out.reshape(value.shape).astype(value.dtype)


def leap_explain(query, key, value=None, *, focus, window: int | None = None, rescale: float | None = None,
                 mask=None, scale: float | None = None, position_embedding: str = "none",
                 alibi=None) -> jnp.ndarray:
    """Explanation weights `[batch..., N, T, T]`: row t says how much of each `v_j` output t used.

    `E[t, j] = sigmoid(s q_t . K~_t) * e^{a_j} / sum_{i in W(t)} e^{a_i}` for j in t's window, else 0, so
    `leap_attention(..., is_causal=True) == einsum("...ntj,...jnv->...tnv", E, value)` exactly (with `rescale`, of the
    standardised values). Forms the `[T, T]` matrix: for inspection and plots, not for long sequences.
    `value` is only needed for its shape checks and may be None. `position_embedding` as in `leap_attention`.
    """
    value = key if value is None else value
    query, focus, key, value = _check(query, focus, key, value)
    rotate, slopes = position_options(position_embedding, alibi, query.shape[-2])
    t = query.shape[-3]
    window = _check_window(window, t)
    q, f, k, v, s = _prepare(query, focus, key, value, rescale, scale)
    q, f, k = _rotate(rotate, q, f, k)
    logits = focus_logits(f, k, scale=s, mask=_positions_mask(mask, query.shape), alibi=slopes)
    i, j = jnp.arange(t)[:, None], jnp.arange(t)[None, :]
    visible = (j <= i) & ((i - j < window) if window else True)
    scores = jnp.where(visible, jnp.swapaxes(logits, -1, -2)[..., None, :], NEG_INF)  # [batch..., N, T, T]
    row_max = jnp.max(scores, -1, keepdims=True)
    e = jnp.exp(scores - jnp.where(jnp.isfinite(row_max), row_max, 0.0))
    total = jnp.sum(e, -1, keepdims=True)
    probs = jnp.where(total > 0, e / jnp.where(total > 0, total, 1.0), 0.0)
    k_avg = jnp.einsum("...ntj,...jnd->...tnd", probs, k)
    gate = jax.nn.sigmoid(s * jnp.einsum("...tnd,...tnd->...nt", q, k_avg))
    return gate[..., None] * probs


def leap_logits(query, key, value=None, *, focus, window: int | None = None, rescale: float | None = None,
                mask=None, scale: float | None = None, position_embedding: str = "none",
                alibi=None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Causal LEAP's raw logits `(focus [batch..., T, N], gate [batch..., T, N])`, for measuring them.

    `focus` logits `a_j` go into the softmax (hidden positions: -inf); `gate` logits `s q_t . K~_t` into the
    sigmoid (0 where a window is all hidden). Same options as `leap_attention(..., is_causal=True)`; with
    `rescale=c` both are bounded by `c` in absolute value (standardised vectors have norm about sqrt(H)), the
    focus logits up to ALiBi's `slope * j`.
    """
    value = key if value is None else value
    query, focus, key, value = _check(query, focus, key, value)
    rotate, slopes = position_options(position_embedding, alibi, query.shape[-2])
    window = _check_window(window, query.shape[-3])
    q, f, k, v, s = _prepare(query, focus, key, value, rescale, scale)
    q, f, k = _rotate(rotate, q, f, k)
    logits = focus_logits(f, k, scale=s, mask=_positions_mask(mask, query.shape), alibi=slopes)
    gate = s * _query_key_dots(_flat(logits, 2), _flat(q), _flat(k), _flat(v), window)
    return logits, gate.reshape(logits.shape)


@functools.partial(jax.jit, static_argnums=(4,))
def _query_key_dots(logits, q, k, v, window):
    """`q_t . K~_t` `[B, T, N]` (compiled: eager associative scans dispatch hundreds of small ops)."""
    k_avg, _, _ = _averages(logits, k, v, window)
    return jnp.einsum("btnd,btnd->btn", q, k_avg)


# ---------------------------------------------------------------- recurrent form

class LEAPState(NamedTuple):
    """Global LEAP: running max `m [batch..., N]`, `l = sum e^{a-m}` `[batch..., N]`,
    `sums [batch..., N, H + Hv]` = `sum e^{a-m} [k, v]`, and the next position `pos` (int32 scalar)."""

    m: jnp.ndarray
    l: jnp.ndarray
    sums: jnp.ndarray
    pos: jnp.ndarray


class LEAPWindowState(NamedTuple):
    """Windowed LEAP: ring buffers of the last `w` logits `[batch..., w, N]` (-inf = empty) and
    `[k, v]` rows `[batch..., w, N, H + Hv]`, and the next write position `pos` (an int32 scalar)."""

    logits: jnp.ndarray
    rows: jnp.ndarray
    pos: jnp.ndarray


def init_state(batch_shape: tuple, num_heads: int, head_dim: int, value_dim: int, *, window: int | None = None,
               dtype=jnp.float32) -> LEAPState | LEAPWindowState:
    """Empty state for `leap_step`: O(N (H + Hv)) numbers, or O(w N (H + Hv)) with a window."""
    batch_shape = tuple(batch_shape)
    width = head_dim + value_dim
    if window is None:
        return LEAPState(jnp.full(batch_shape + (num_heads,), NEG_INF, dtype),
                         jnp.zeros(batch_shape + (num_heads,), dtype),
                         jnp.zeros(batch_shape + (num_heads, width), dtype), jnp.zeros((), jnp.int32))
    _check_window(window, window + 1)
    return LEAPWindowState(jnp.full(batch_shape + (window, num_heads), NEG_INF, dtype),
                           jnp.zeros(batch_shape + (window, num_heads, width), dtype),
                           jnp.zeros((), jnp.int32))


def _check_step(q_t, f_t, k_t, v_t):
    """One token's arrays: q/f/k `[batch..., N, H]` of one shape, v `[batch..., N, Hv]`, else a ValueError."""
    arrays = [as_float_array(n, a) for n, a in (("q_t", q_t), ("f_t", f_t), ("k_t", k_t), ("v_t", v_t))]
    q, f, k, v = arrays
    if not (q.shape == f.shape == k.shape) or v.shape[:-1] != q.shape[:-1]:
        raise ValueError(f"q_t, f_t, k_t must be [batch..., N, H] and v_t [batch..., N, Hv]; got q_t {q.shape}, "
                         f"f_t {f.shape}, k_t {k.shape}, v_t {v.shape}")
    return arrays


def _push(state: LEAPState | LEAPWindowState, leaf) -> tuple:
    """Add one token's summary `leaf = (a, live, [k, v])` -> `(new_state, (m, l, sums))` of its window."""
    if isinstance(state, LEAPWindowState):
        w = state.logits.shape[-2]
        slot = state.pos % w
        logits = jax.lax.dynamic_update_index_in_dim(state.logits, leaf[0], slot, axis=state.logits.ndim - 2)
        rows = jax.lax.dynamic_update_index_in_dim(state.rows, leaf[2], slot, axis=state.rows.ndim - 3)
        # Recompute the window's summary from the buffer: O(w) per step, exact, nothing subtracted.
        m = jnp.max(logits, -2)
        e = jnp.exp(logits - jnp.where(jnp.isfinite(m), m, 0.0)[..., None, :])
        summary = (m, jnp.sum(e, -2), jnp.einsum("...wn,...wnd->...nd", e, rows))
        return LEAPWindowState(logits, rows, state.pos + 1), summary
    m, l, sums = _combine((state.m, state.l, state.sums), leaf)
    return LEAPState(m, l, sums, state.pos + 1), (m, l, sums)


def leap_step(state: LEAPState | LEAPWindowState, q_t, f_t, k_t, v_t, *, mask_t=None,
              rescale: float | None = None, scale: float | None = None, position_embedding: str = "none",
              alibi=None) -> tuple[LEAPState | LEAPWindowState, jnp.ndarray]:
    """One token: q/f/k `[batch..., N, H]`, v `[batch..., N, Hv]` -> `(new_state, out_t [batch..., N, Hv])`.

    The new token joins the sums before they are read (position t sees j <= t), exactly as in
    `leap_attention`. `mask_t` (bool, broadcastable to `[batch..., N]`) False = padding: no focus.
    `position_embedding` and `alibi` as in `leap_attention`; the token's absolute position is `state.pos`
    (rotary rotates q, f, k by it, ALiBi adds `slope * pos`), so a state that starts at position p continues
    a sequence whose first p tokens it has summarised.
    """
    q_t, f_t, k_t, v_t = _check_step(q_t, f_t, k_t, v_t)
    rotate, slopes = position_options(position_embedding, alibi, q_t.shape[-2])
    dtype = state.rows.dtype if isinstance(state, LEAPWindowState) else state.sums.dtype
    q, f, k, v, s = _prepare(q_t.astype(dtype), f_t, k_t, v_t.astype(dtype), rescale, scale)
    # One position: add a length-1 sequence axis for the rotation, at the absolute position state.pos.
    q, f, k = (a[..., 0, :, :] for a in _rotate(rotate, q[..., None, :, :], f[..., None, :, :],
                                                  k[..., None, :, :], jnp.reshape(state.pos, (1,))))
    d = q.shape[-1]
    a = s * jnp.einsum("...nd,...nd->...n", f, k)
    if slopes is not None:
        a = a + state.pos.astype(dtype) * jnp.asarray(slopes, dtype)
    if mask_t is not None:
        a = jnp.where(jnp.asarray(mask_t, bool), a, NEG_INF)
    new_state, (m, l, sums) = _push(state, _leaves(a, jnp.concatenate([k, v], -1)))
    live = l > 0
    avg = jnp.where(live[..., None], sums / jnp.where(live, l, 1.0)[..., None], 0.0)
    gate = jax.nn.sigmoid(s * jnp.einsum("...nd,...nd->...n", q, avg[..., :d]))
    return new_state, (gate[..., None] * avg[..., d:]).astype(v_t.dtype)


def generate(project: Callable, readout: Callable, first_input, num_steps: int,
             state: LEAPState | LEAPWindowState, *, rescale: float | None = None,
             scale: float | None = None, position_embedding: str = "none", alibi=None):
    """Decode token by token with `lax.scan`; memory does not grow with `num_steps`.

    Args:
      project: `x_t -> (q_t, f_t, k_t, v_t)`, each `[batch..., N, *]` (e.g. embed a token, project).
      readout: `(x_t, out_t) -> x_{t+1}` (e.g. logits from the attention output, then argmax).
      first_input: `x_0`, any pytree of arrays.
      num_steps: how many steps to run.
      state: from `init_state(...)` (with `window=` for windowed LEAP) or an earlier call.
      rescale, scale, position_embedding, alibi: as in `leap_step` (the same as the parallel form's).

    Returns:
      `(final_state, inputs, outputs)`: `inputs` stacks `x_0 .. x_{num_steps-1}` on a new leading axis,
      `outputs [num_steps, batch..., N, Hv]` the attention outputs.
    """
    step = functools.partial(leap_step, rescale=rescale, scale=scale, position_embedding=position_embedding,
                             alibi=alibi)
    return decode(step, project, readout, first_input, num_steps, state)

