"""Linear attention: kernel feature maps instead of the softmax, in O(n) time and memory.

Katharopoulos, Vyas, Pappas & Fleuret 2020, "Transformers are RNNs: fast autoregressive transformers
with linear attention". Replace the similarity `exp(q . k)` by a kernel `phi(q) . phi(k)` with a positive
feature map (default `elu(x) + 1`). Then, by associativity,

    out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j) + eps)

and the `[H, Hv]` matrix `sum_j phi(k_j) v_j^T` is computed once instead of a `[T, S]` score matrix.
Causal attention sums only over `j <= i`; three equivalent forms are given:

- prefix sums: a cumulative sum of the outer products `phi(k_j) v_j^T` (`chunk_size=None`);
  O(T H Hv) time but O(T H Hv) memory, because every prefix state is materialised;
- chunkwise (`chunk_size=C`): inside a chunk, the quadratic masked form `(phi(Q) phi(K)^T * tril) V`;
  across chunks, a `[H, Hv]` state carried by `lax.scan`. O(T (C + H) Hv) time, O(T H + C^2 + H Hv)
  memory. Its gradient is a `jax.custom_vjp` that stores only the inputs and recomputes the states in a
  forward and a reverse scan (the paper's Algorithm 1), so gradient memory also stays O(T H);
- recurrent: `recurrent_step` updates the state one token at a time, O(H Hv) work and memory per token,
  which is what makes generation cheap (`generate`).

The normaliser rides along with the values: the code appends a column of ones to `v`, so the same sums
give both the numerator (first `dv` columns) and the denominator (last column).

Cost per head: non-causal O(T H Hv) time, O(T H + H Hv) memory; causal as listed above. No softmax, so
the result is not softmax attention: it is a different (cheaper, usually somewhat weaker) model.
"""

from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Union

import jax
import jax.numpy as jnp

from labkit.attention._validate import as_float_array, check_qkv, key_padding_mask, reject_bias
from labkit.attention.decoding import decode

FeatureMap = Union[str, Callable[[jnp.ndarray], jnp.ndarray]]


def elu_feature_map(x: jnp.ndarray) -> jnp.ndarray:
    """`elu(x) + 1`, positive everywhere (the paper's choice): `[..., H] -> [..., H]`."""
    return jax.nn.elu(x) + 1.0


def relu_feature_map(x: jnp.ndarray) -> jnp.ndarray:
    """`max(x, 0)`: non-negative, but rows can become all zero (the `eps` then keeps 0/0 away)."""
    return jax.nn.relu(x)


def identity_feature_map(x: jnp.ndarray) -> jnp.ndarray:
    """`x` itself: plain un-normalised dot products, which can be negative (denominators near 0)."""
    return x


FEATURE_MAPS: dict[str, Callable[[jnp.ndarray], jnp.ndarray]] = {
    "elu": elu_feature_map,
    "relu": relu_feature_map,
    "identity": identity_feature_map,
}


def get_feature_map(feature_map: FeatureMap) -> Callable[[jnp.ndarray], jnp.ndarray]:
    """A feature map by name (`"elu"`, `"relu"`, `"identity"`) or a callable `[..., H] -> [..., M]` as is."""
    if callable(feature_map):
        return feature_map
    if isinstance(feature_map, str) and feature_map in FEATURE_MAPS:
        return FEATURE_MAPS[feature_map]
    raise ValueError(f"feature_map must be one of {sorted(FEATURE_MAPS)} or a callable, got {feature_map!r}")


def _with_ones(value: jnp.ndarray) -> jnp.ndarray:
    """`[..., Hv] -> [..., Hv + 1]`: the extra column of ones turns the numerator sums into the normaliser."""
    return jnp.concatenate([value, jnp.ones(value.shape[:-1] + (1,), value.dtype)], axis=-1)


def _normalise(summed: jnp.ndarray, eps: float) -> jnp.ndarray:
    """`[..., Hv + 1]` (numerator, denominator) -> `[..., Hv]`."""
    return summed[..., :-1] / (summed[..., -1:] + eps)


# ---------------------------------------------------------------- chunkwise causal core, [B, N, T, D]

def _to_chunks(x: jnp.ndarray, chunk: int) -> jnp.ndarray:
    """`[B, N, T, D]` (T a multiple of chunk) -> `[T / chunk, B, N, chunk, D]` for `lax.scan`."""
    b, n, t, d = x.shape
    return jnp.moveaxis(x.reshape(b, n, t // chunk, chunk, d), 2, 0)


def _from_chunks(x: jnp.ndarray) -> jnp.ndarray:
    """Inverse of `_to_chunks`."""
    c, b, n, l, d = x.shape
    return jnp.moveaxis(x, 0, 2).reshape(b, n, c * l, d)


def _causal_chunkwise(q: jnp.ndarray, k: jnp.ndarray, v: jnp.ndarray, chunk: int) -> jnp.ndarray:
    """`tril(q k^T) v` for `[B, N, T, H]`, `[B, N, T, H]`, `[B, N, T, Hv]`, one chunk at a time."""
    tri = jnp.tril(jnp.ones((chunk, chunk), q.dtype))

    def step(state, qkv):
        qc, kc, vc = qkv
        scores = jnp.einsum("bnid,bnjd->bnij", qc, kc) * tri
        out = jnp.einsum("bnij,bnjv->bniv", scores, vc) + jnp.einsum("bnid,bndv->bniv", qc, state)
        return state + jnp.einsum("bnjd,bnjv->bndv", kc, vc), out

    state = jnp.zeros(q.shape[:2] + (q.shape[-1], v.shape[-1]), q.dtype)
    _, out = jax.lax.scan(step, state, (_to_chunks(q, chunk), _to_chunks(k, chunk), _to_chunks(v, chunk)))
    return _from_chunks(out)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _causal_chunkwise_recompute(q, k, v, chunk):
    """`_causal_chunkwise` whose gradient keeps only q, k, v and recomputes the states (Algorithm 1)."""
    return _causal_chunkwise(q, k, v, chunk)


def _recompute_fwd(q, k, v, chunk):
    return _causal_chunkwise(q, k, v, chunk), (q, k, v)


def _recompute_bwd(chunk, residuals, g):
    q, k, v = residuals
    tri = jnp.tril(jnp.ones((chunk, chunk), q.dtype))
    qc, kc, vc, gc = (_to_chunks(a, chunk) for a in (q, k, v, g))

    # dq_i = S_i g_i with S_i = sum_{j<=i} k_j v_j^T: rebuild S going forwards.
    def forward(state, kvg):
        kc, vc, gc = kvg
        gv = jnp.einsum("bniv,bnjv->bnij", gc, vc) * tri
        dq = jnp.einsum("bniv,bndv->bnid", gc, state) + jnp.einsum("bnij,bnjd->bnid", gv, kc)
        return state + jnp.einsum("bnjd,bnjv->bndv", kc, vc), dq

    # dk_j = R_j v_j and dv_j = R_j^T k_j with R_j = sum_{i>=j} q_i g_i^T: build R going backwards.
    def backward(rev, qkvg):
        qc, kc, vc, gc = qkvg
        gv = jnp.einsum("bniv,bnjv->bnij", gc, vc) * tri
        qk = jnp.einsum("bnid,bnjd->bnij", qc, kc) * tri
        dk = jnp.einsum("bnij,bnid->bnjd", gv, qc) + jnp.einsum("bnjv,bndv->bnjd", vc, rev)
        dv = jnp.einsum("bnij,bniv->bnjv", qk, gc) + jnp.einsum("bnjd,bndv->bnjv", kc, rev)
        return rev + jnp.einsum("bnid,bniv->bndv", qc, gc), (dk, dv)

    zeros = jnp.zeros(q.shape[:2] + (q.shape[-1], v.shape[-1]), q.dtype)
    _, dq = jax.lax.scan(forward, zeros, (kc, vc, gc))
    _, (dk, dv) = jax.lax.scan(backward, zeros, (qc, kc, vc, gc), reverse=True)
    return _from_chunks(dq), _from_chunks(dk), _from_chunks(dv)


_causal_chunkwise_recompute.defvjp(_recompute_fwd, _recompute_bwd)


def _heads_first(x: jnp.ndarray) -> jnp.ndarray:
    """`[batch..., T, N, D]` -> `[B, N, T, D]`: contiguous per-head rows make XLA:CPU's matmuls ~2x faster."""
    return x.reshape((-1,) + x.shape[-3:]).transpose(0, 2, 1, 3)


def _causal_chunkwise_padded(phi_q, phi_k, v1, chunk: int, recompute_grad: bool) -> jnp.ndarray:
    """`[B, N, T, *]` in and out; pads T to a multiple of `chunk` (padded keys come last, so causality
    already hides them from every real query) and drops the padded rows again."""
    t = phi_q.shape[2]
    pad = [(0, 0), (0, 0), (0, -t % chunk), (0, 0)]
    core = _causal_chunkwise_recompute if recompute_grad else _causal_chunkwise
    return core(jnp.pad(phi_q, pad), jnp.pad(phi_k, pad), jnp.pad(v1, pad), chunk)[:, :, :t]


# ---------------------------------------------------------------- public functions

def _key_weights(mask, key_shape: tuple) -> jnp.ndarray | None:
    """Boolean mask broadcastable to `[batch..., N, 1, S]` -> float `[batch..., S, N, 1]` (1 = keep)."""
    keep = key_padding_mask(mask, key_shape, "linear attention")
    return None if keep is None else jnp.swapaxes(keep[..., 0, :], -1, -2)[..., None].astype(jnp.float32)


def linear_attention(query, key, value, bias=None, mask=None, *, is_causal: bool = False,
                     scale: float | None = None, feature_map: FeatureMap = "elu",
                     chunk_size: int | None = None, eps: float = 1e-6,
                     recompute_grad: bool = True) -> jnp.ndarray:
    """Linear attention `[batch..., T, N, Hv]` from query `[batch..., T, N, H]`, key/value `[batch..., S, N, *]`.

    Args:
      query: `[batch..., T, N, H]`.
      key: `[batch..., S, N, H]`.
      value: `[batch..., S, N, Hv]`.
      bias: must be None: an additive bias on the scores has no place in the factorised sums.
      mask: optional boolean key mask broadcastable to `[batch..., N, 1, S]` (True = may attend); hidden keys
        are left out of every sum. A query whose keys are all hidden gets 0 (not the mean of the values).
      is_causal: query i sees keys j <= i (needs T == S).
      scale: multiplies the queries before the feature map. Default None = 1: the paper uses no scale,
        and for positively homogeneous maps (relu, identity) the normaliser cancels any scale anyway.
      feature_map: "elu" (elu + 1, default), "relu", "identity", or a callable `[..., H] -> [..., M]`.
      chunk_size: causal only. None: prefix sums (O(T H Hv) memory); an int: the chunkwise scan.
        Lengths it does not divide are padded. Ignored when not causal (that form needs no chunks).
      eps: added to the denominator, so all-zero features (relu, padding, hidden keys) give 0, not NaN.
      recompute_grad: chunkwise form only: use the constant-memory custom gradient (True) or let JAX
        differentiate through the scan (False; stores per-chunk intermediates).

    Returns:
      `[batch..., T, N, Hv]` in `value`'s dtype; sums are computed in at least float32.
    """
    query, key, value = check_qkv(query, key, value)
    reject_bias(bias, "linear attention")
    if is_causal and query.shape[-3] != key.shape[-3]:
        raise ValueError(f"is_causal=True needs as many queries as keys; got query {query.shape}, key {key.shape}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    phi = get_feature_map(feature_map)
    dtype = jnp.promote_types(value.dtype, jnp.float32)
    q = query.astype(dtype) * (1.0 if scale is None else scale)
    phi_q, phi_k = phi(q), phi(key.astype(dtype))
    if phi_q.shape[:-1] != query.shape[:-1] or phi_k.shape[:-1] != key.shape[:-1]:
        raise ValueError(f"feature_map must keep every axis but the last; query {query.shape} -> {phi_q.shape}, "
                         f"key {key.shape} -> {phi_k.shape}")
    weights = _key_weights(mask, key.shape)
    if weights is not None:
        phi_k = phi_k * weights
    phi_q, phi_k, v1 = _heads_first(phi_q), _heads_first(phi_k), _heads_first(_with_ones(value.astype(dtype)))
    if not is_causal:
        kv = jnp.einsum("bnsd,bnsv->bndv", phi_k, v1)
        summed = jnp.einsum("bntd,bndv->bntv", phi_q, kv)
    elif chunk_size is None:
        # Inclusive prefix sums (j <= i). associative_scan: jnp.cumsum lowers ~3x slower on XLA:CPU here.
        prefix = jax.lax.associative_scan(jnp.add, jnp.einsum("bnsd,bnsv->bnsdv", phi_k, v1), axis=2)
        summed = jnp.einsum("bntd,bntdv->bntv", phi_q, prefix)
    else:
        summed = _causal_chunkwise_padded(phi_q, phi_k, v1, chunk_size, recompute_grad)
    out = _normalise(summed, eps).transpose(0, 2, 1, 3)
    return out.reshape(query.shape[:-1] + value.shape[-1:]).astype(value.dtype)


class LinearState(NamedTuple):
    """Recurrent state: `kv [batch..., N, H, Hv]` = sum phi(k) v^T and `k_sum [batch..., N, H]` = sum phi(k)."""

    kv: jnp.ndarray
    k_sum: jnp.ndarray


def init_state(batch_shape: tuple, num_heads: int, feature_dim: int, value_dim: int,
               dtype=jnp.float32) -> LinearState:
    """All-zero state: nothing seen yet. `feature_dim` is the feature map's output size (d for elu/relu)."""
    batch_shape = tuple(batch_shape)
    return LinearState(jnp.zeros(batch_shape + (num_heads, feature_dim, value_dim), dtype),
                       jnp.zeros(batch_shape + (num_heads, feature_dim), dtype))


def recurrent_step(state: LinearState, query_t, key_t, value_t, *, feature_map: FeatureMap = "elu",
                   scale: float | None = None, eps: float = 1e-6) -> tuple[LinearState, jnp.ndarray]:
    """One token: `query_t, key_t [batch..., N, H]`, `value_t [batch..., N, Hv]` -> `(state, out_t [batch..., N, Hv])`.

    O(H Hv) work and memory per token, whatever the position: the RNN view of causal linear attention.
    The new token is added to the state before it is read, so position i sees keys j <= i.
    """
    query_t = as_float_array("query_t", query_t)
    key_t = as_float_array("key_t", key_t)
    value_t = as_float_array("value_t", value_t)
    if query_t.shape != key_t.shape or query_t.shape[:-1] != value_t.shape[:-1]:
        raise ValueError("query_t/key_t must be [batch..., N, H] and value_t [batch..., N, Hv]; got "
                         f"query_t {query_t.shape}, key_t {key_t.shape}, value_t {value_t.shape}")
    phi = get_feature_map(feature_map)
    dtype = state.kv.dtype
    phi_q = phi(query_t.astype(dtype) * (1.0 if scale is None else scale))
    phi_k = phi(key_t.astype(dtype))
    if state.kv.shape != phi_k.shape + value_t.shape[-1:]:
        raise ValueError(f"state.kv has shape {state.kv.shape}; expected {phi_k.shape + value_t.shape[-1:]} for "
                         f"key_t {key_t.shape} and value_t {value_t.shape}")
    kv = state.kv + phi_k[..., :, None] * value_t.astype(dtype)[..., None, :]
    k_sum = state.k_sum + phi_k
    num = jnp.einsum("...d,...dv->...v", phi_q, kv)
    den = jnp.einsum("...d,...d->...", phi_q, k_sum)[..., None]
    return LinearState(kv, k_sum), (num / (den + eps)).astype(value_t.dtype)


def generate(project: Callable, readout: Callable, first_input, num_steps: int, state: LinearState, *,
             feature_map: FeatureMap = "elu", scale: float | None = None, eps: float = 1e-6):
    """Decode token by token with `lax.scan`: memory does not grow with `num_steps`.

    Args:
      project: `x_t -> (query_t, key_t, value_t)`, each `[batch..., N, *]` (e.g. embed a token, project).
      readout: `(x_t, out_t) -> x_{t+1}` (e.g. logits from the attention output, then argmax).
      first_input: `x_0`, any pytree of arrays (e.g. token ids `[batch]`).
      num_steps: how many steps to run.
      state: starting `LinearState` (`init_state(...)`, or the state returned by an earlier call).

    Returns:
      `(final_state, inputs, outputs)`: `inputs` stacks `x_0 .. x_{num_steps-1}` on a new leading time axis;
      `outputs [num_steps, batch..., N, Hv]` are the attention outputs; `readout(inputs[-1], outputs[-1])`
      is the next input.
    """
    step = functools.partial(recurrent_step, feature_map=feature_map, scale=scale, eps=eps)
    return decode(step, project, readout, first_input, num_steps, state)
