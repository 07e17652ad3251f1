"""Sliding-window attention: each query sees only the keys less than `window` positions away (Longformer).

Beltagy, Peters & Cohan 2020, "Longformer: The Long-Document Transformer" (its local attention; Mistral 7B
uses the causal form); Child, Gray, Radford & Sutskever 2019, "Generating Long Sequences with Sparse
Transformers", for fixed sparsity patterns in general. Query i attends to the keys j with
`i - window < j <= i` when causal and `|i - j| < window` when not: a band around the diagonal of the score
matrix, exact softmax attention inside the band.

Computed blockwise so the band's scores are the only ones formed: the queries are cut into blocks of
`block_size` positions and each block meets the keys from `block_start - window + 1` to
`block_end + window - 1` (only up to `block_end` when causal). The sequence is padded with zeros on both
sides rather than wrapped around (unlike `local.py`'s Trax-style chunks); padded keys are hidden like masked
ones and out-of-band keys by their distance from the query. Lengths the block size does not divide are
padded; padded queries are dropped.

Cost per head: O(T (b + 2w) H) = O(T w H) time and O(T w) memory for block size b ~ w, linear in T for a
fixed window. A query whose window holds no visible key (all of them masked) returns zeros.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from labkit.attention._validate import check_qkv, default_scale, key_padding_mask, positive_int, reject_bias
from labkit.attention.dense import LARGE_NEGATIVE


def _in_band(offset: jnp.ndarray, window: int, is_causal: bool) -> jnp.ndarray:
    """True where a query-minus-key position `offset` lies in the band."""
    return (offset >= 0) & (offset < window) if is_causal else jnp.abs(offset) < window


def band_mask(q_len: int, kv_len: int, window: int, *, is_causal: bool) -> jnp.ndarray:
    """Boolean `[q_len, kv_len]`, True where query i sees key j: `i - window < j <= i` or `|i - j| < window`."""
    return _in_band(jnp.arange(q_len)[:, None] - jnp.arange(kv_len)[None, :], window, is_causal)


def window_span(block_size: int, window: int, *, is_causal: bool) -> int:
    """How many key positions one query block meets: `block + window - 1` (causal) or `block + 2 window - 2`."""
    return block_size + (window - 1) * (1 if is_causal else 2)


def _windows(x: jnp.ndarray, starts: jnp.ndarray, span: int, left: int, right: int) -> jnp.ndarray:
    """`x [B, T, ...]` zero-padded by `left`/`right` positions -> `[B, blocks, span, ...]` from each start."""
    padded = jnp.pad(x, [(0, 0), (left, right)] + [(0, 0)] * (x.ndim - 2))
    return jnp.take(padded, starts[:, None] + jnp.arange(span)[None, :], axis=1)


def _blockwise(q, k, v, valid, *, window, block_size, is_causal, scale):
    """Flat batch: q, k `[B, T, N, H]`, v `[B, T, N, Hv]`, valid `[B, N, T]` -> `[B, T, N, Hv]`."""
    seq_len = q.shape[1]
    n_blocks = -(-seq_len // block_size)
    span = window_span(block_size, window, is_causal=is_causal)
    starts = jnp.arange(n_blocks) * block_size  # padded coordinates: key window of block c starts at c * b
    left = window - 1
    right = n_blocks * block_size - seq_len + (0 if is_causal else window - 1)

    q_blocks = jnp.pad(q, [(0, 0), (0, n_blocks * block_size - seq_len), (0, 0), (0, 0)])
    q_blocks = q_blocks.reshape(q.shape[0], n_blocks, block_size, *q.shape[2:])  # [B, C, b, N, H]
    k_w, v_w = _windows(k, starts, span, left, right), _windows(v, starts, span, left, right)  # [B, C, L, N, *]
    valid_w = _windows(valid.transpose(0, 2, 1), starts, span, left, right)  # [B, C, L, N], False in the padding

    q_pos = starts[:, None] + jnp.arange(block_size)[None, :]  # [C, b], original coordinates
    k_pos = starts[:, None] - left + jnp.arange(span)[None, :]  # [C, L]
    in_band = _in_band(q_pos[:, :, None] - k_pos[:, None, :], window, is_causal)  # [C, b, L]
    keep = in_band[None, :, None] & valid_w.transpose(0, 1, 3, 2)[:, :, :, None, :]  # [B, C, N, b, L]

    logits = jnp.einsum("bcqnh,bcknh->bcnqk", q_blocks, k_w, preferred_element_type=jnp.float32) * scale
    probs = jax.nn.softmax(jnp.where(keep, logits, LARGE_NEGATIVE), axis=-1)
    probs = jnp.where(jnp.any(keep, axis=-1, keepdims=True), probs, 0.0)  # nothing visible: a zero output
    out = jnp.einsum("bcnqk,bcknh->bcqnh", probs, v_w.astype(jnp.float32))
    return out.reshape(q.shape[0], n_blocks * block_size, *out.shape[3:])[:, :seq_len]


def sliding_window_attention(query, key, value, bias=None, mask=None, *, is_causal: bool = False,
                             scale: float | None = None, window: int, block_size: int | None = None) -> jnp.ndarray:
    """Sliding-window self-attention `[batch..., T, N, Hv]`: query i sees keys within `window` positions.

    Args:
      query: `[batch..., T, N, H]`.
      key: `[batch..., T, N, H]` (self-attention: as long as the queries).
      value: `[batch..., T, N, Hv]`.
      bias: must be None (the full `[T, S]` scores a bias would be sliced from are never formed).
      mask: optional boolean key-padding mask broadcastable to `[batch..., N, 1, T]`; False hides that key
        from every query.
      is_causal: keys `i - window < j <= i`; otherwise `|i - j| < window`.
      scale: logit scale, default `1/sqrt(H)`.
      window: band width (>= 1); `window >= T` is full (causal) attention.
      block_size: queries per block, default `window`; memory grows as `block_size + 2 window` per query block.
    """
    query, key, value = check_qkv(query, key, value)
    reject_bias(bias, "sliding_window_attention")
    positive_int("window", window)
    positive_int("block_size", block_size, allow_none=True)
    seq_len = query.shape[-3]
    if key.shape[-3] != seq_len:
        raise ValueError(f"sliding_window_attention is self-attention: query {query.shape} and key {key.shape} "
                         "must have the same length")
    window = min(window, seq_len)  # a wider band sees nothing more: keep the padding small
    block_size = min(block_size or window, seq_len)
    batch_shape, heads = query.shape[:-3], query.shape[-2]
    valid = key_padding_mask(mask, key.shape, "sliding_window_attention")  # [batch..., N, 1, T]
    valid = jnp.ones(batch_shape + (heads, seq_len), bool) if valid is None else valid[..., 0, :]
    flat = lambda a: a.reshape((-1,) + a.shape[len(batch_shape):])
    out = _blockwise(flat(query), flat(key), flat(value), flat(valid), window=window, block_size=block_size,
                     is_causal=is_causal, scale=default_scale(scale, query.shape[-1]))
    return out.reshape(batch_shape + out.shape[1:]).astype(value.dtype)


def memory_model(problem, options: dict) -> int:
    """Peak extra bytes of one call for a `labkit.attention.Problem`: the band's scores and windowed k, v.

    Per head and query block: `[block, span]` logits and probabilities (and their gradients with backward),
    plus the gathered key and value windows, `span / block` times the size of k and v.
    """
    t = problem.seq_len
    window = min(options["window"], t)
    block = min(options.get("block_size") or window, t)
    span = window_span(block, window, is_causal=problem.causal)
    padded = -(-t // block) * block
    scores = (2 + 2 * problem.backward) * problem.batch * problem.heads * padded * span * 4
    return scores + (1 + span // block) * problem.io_bytes
