"""Exact scaled dot-product attention: the reference every other family is compared with.

Vaswani et al. 2017, "Attention is all you need": `softmax(q k^T * scale + bias) v`, with masks.
Layout and argument names follow `jax.nn.dot_product_attention`, so either can replace the other
(this one also allows a value head dim that differs from the query/key head dim, as Trax does).

Cost per head: O(T S H) time and O(T S) memory, because the whole `[T, S]` score matrix is built.
That quadratic memory is what the rest of the course works to avoid.

Rows whose keys are all hidden (by `mask` and/or `is_causal`) give the plain mean of all values: every
logit becomes the same large negative number, so the softmax is uniform. This is exactly what
`jax.nn.dot_product_attention` does, and every exact family in labkit keeps the same convention.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from labkit.attention._validate import check_qkv, default_scale

# Finite, so a fully hidden row stays uniform instead of turning into NaN (jax's choice too).
LARGE_NEGATIVE = -0.7 * float(np.finfo(np.float32).max)


def causal_mask(q_len: int, kv_len: int) -> jnp.ndarray:
    """Boolean `[q_len, kv_len]` mask, True where query i may see key j (j <= i)."""
    return jnp.tril(jnp.ones((q_len, kv_len), dtype=bool))


def attention_logits(query, key, bias=None, mask=None, *, is_causal: bool = False,
                     scale: float | None = None) -> jnp.ndarray:
    """Scaled, biased and masked scores `[batch..., N, T, S]` in float32 (hidden entries very negative)."""
    scale = default_scale(scale, query.shape[-1])
    logits = jnp.einsum("...tnh,...snh->...nts", query, key,
                        preferred_element_type=jnp.float32) * scale
    if bias is not None:
        logits = logits + jnp.asarray(bias, jnp.float32)
    keep = None
    if mask is not None:
        keep = jnp.asarray(mask, bool)
    if is_causal:
        tri = causal_mask(query.shape[-3], key.shape[-3])
        keep = tri if keep is None else jnp.logical_and(keep, tri)
    if keep is not None:
        logits = jnp.where(keep, logits, LARGE_NEGATIVE)
    return logits


def attention_weights(query, key, bias=None, mask=None, *, is_causal: bool = False,
                      scale: float | None = None) -> jnp.ndarray:
    """Softmax attention probabilities `[batch..., N, T, S]` (float32), each row summing to 1.

    Args:
      query: `[batch..., T, N, H]`.
      key: `[batch..., S, N, H]`.
      bias: optional, broadcastable to `[batch..., N, T, S]`, added to the scaled logits.
      mask: optional boolean, broadcastable to `[batch..., N, T, S]`; False hides key j from query i.
      is_causal: hide keys j > i.
      scale: logit scale, default `1/sqrt(H)`.
    """
    return jax.nn.softmax(attention_logits(query, key, bias, mask, is_causal=is_causal, scale=scale), axis=-1)


def dot_product_attention(query, key, value, bias=None, mask=None, *, is_causal: bool = False,
                          scale: float | None = None) -> jnp.ndarray:
    """Exact attention `[batch..., T, N, Hv]`, a drop-in for `jax.nn.dot_product_attention`.

    Args:
      query: `[batch..., T, N, H]`.
      key: `[batch..., S, N, H]`.
      value: `[batch..., S, N, Hv]`.
      bias: optional, broadcastable to `[batch..., N, T, S]`, added to the scaled logits.
      mask: optional boolean, broadcastable to `[batch..., N, T, S]`; False hides key j from query i.
      is_causal: hide keys j > i (query i and key i are aligned at the start).
      scale: logit scale, default `1/sqrt(H)`.

    Returns:
      `[batch..., T, N, Hv]` in `value`'s dtype; the softmax is computed in float32.
    """
    query, key, value = check_qkv(query, key, value)
    probs = attention_weights(query, key, bias, mask, is_causal=is_causal, scale=scale)
    out = jnp.einsum("...nts,...snh->...tnh", probs, value.astype(jnp.float32))
    return out.astype(value.dtype)
