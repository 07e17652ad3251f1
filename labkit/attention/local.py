"""Chunked local attention, as Trax's `SelfAttention(chunk_len=...)` computes it.

Kitaev, Kaiser & Levskaya 2020 (Reformer) and Trax's `efficient_attention.attend`: split the sequence
into chunks of `chunk_len` positions; each query chunk attends to its own chunk plus `n_chunks_before`
earlier and `n_chunks_after` later chunks ("look-adjacent"). As in Trax the neighbouring chunks wrap
around the ends of the sequence, so with `is_causal=False` the first chunk also sees the last one;
causal masking hides the wrapped (future) positions.

Shared-QK attention (Reformer) attends with keys equal to the length-normalised queries; a query would
then always score highest against itself, so `exclude_self=True` subtracts 1e5 from the self score
(a soft mask: a token with nothing else to look at still attends to itself, exactly as in Trax).

Cost per head: O(T * W * H) time and O(T * W) memory, where W = chunk_len * (1 + before + after),
so linear in T for a fixed window. With `chunk_len=None` it is ordinary full attention.
Lengths that `chunk_len` does not divide are padded; padded keys are hidden and padded queries dropped.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from labkit.attention._validate import (check_qkv, default_scale, dropout_keep, key_padding_mask, positive_int,
                                       reject_bias)
from labkit.attention.dense import LARGE_NEGATIVE

SELF_PENALTY = 1e5  # Trax's soft self-mask for shared-QK attention


def length_normalized(x: jnp.ndarray, epsilon: float = 1e-6) -> jnp.ndarray:
    """Scale each vector of `x [..., dim]` to unit root-mean-square, as Trax does for shared-QK keys."""
    return x / jnp.sqrt(jnp.mean(x**2, axis=-1, keepdims=True) + epsilon)


def look_adjacent(x: jnp.ndarray, n_chunks_before: int, n_chunks_after: int) -> jnp.ndarray:
    """`[chunks, L, ...]` -> `[chunks, L * (1 + before + after), ...]`: each chunk with its neighbours.

    Neighbours wrap around: chunk 0's previous chunk is the last one (Trax's convention).
    """
    if n_chunks_before == 0 and n_chunks_after == 0:
        return x
    shifted = [jnp.roll(x, -i, axis=0) for i in range(-n_chunks_before, n_chunks_after + 1)]
    return jnp.concatenate(shifted, axis=1)


def _local_attention_one(q, k, v, key_valid, dropout_keep, *, is_causal, scale, chunk_len,
                         n_chunks_before, n_chunks_after, exclude_self):
    """One example: q `[T, N, H]`, k `[T, N, H]`, v `[T, N, Hv]`, key_valid `[T]` -> `[T, N, Hv]`."""
    seq_len = q.shape[0]
    chunk_len = chunk_len or seq_len
    n_chunks = -(-seq_len // chunk_len)
    pad = n_chunks * chunk_len - seq_len
    pad_seq = lambda a, fill=0: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1), constant_values=fill)
    positions = jnp.arange(n_chunks * chunk_len)
    key_valid = pad_seq(key_valid, False)

    # [T', N, H] -> [N, chunks, L, H]: one row of chunks per head.
    to_chunks = lambda a: pad_seq(a).reshape(n_chunks, chunk_len, *a.shape[1:]).transpose(2, 0, 1, 3)
    q_c, k_c, v_c = to_chunks(q), to_chunks(k), to_chunks(v)
    adjacent = lambda a: jax.vmap(look_adjacent, in_axes=(0, None, None))(a, n_chunks_before, n_chunks_after)
    k_w, v_w = adjacent(k_c), adjacent(v_c)  # [N, chunks, W, H]
    q_pos = positions.reshape(n_chunks, chunk_len)  # [chunks, L]
    kv_pos = look_adjacent(q_pos, n_chunks_before, n_chunks_after)  # [chunks, W]
    kv_valid = look_adjacent(key_valid.reshape(n_chunks, chunk_len), n_chunks_before, n_chunks_after)

    logits = jnp.einsum("nclh,ncwh->nclw", q_c, k_w, preferred_element_type=jnp.float32) * scale
    if exclude_self:
        logits = logits - SELF_PENALTY * (q_pos[:, :, None] == kv_pos[:, None, :])
    keep = jnp.broadcast_to(kv_valid[:, None, :], logits.shape[1:])
    if is_causal:
        keep = keep & (kv_pos[:, None, :] <= q_pos[:, :, None])
    probs = jax.nn.softmax(jnp.where(keep, logits, LARGE_NEGATIVE), axis=-1)
    if dropout_keep is not None:
        probs = probs * dropout_keep  # [L, W], broadcast over heads and chunks as in Trax
    out = jnp.einsum("nclw,ncwh->nclh", probs, v_w.astype(jnp.float32))
    out = out.reshape(out.shape[0], -1, out.shape[-1])[:, :seq_len]  # [N, T, Hv]
    return out.transpose(1, 0, 2).astype(v.dtype)


def local_attention(query, key, value, bias=None, mask=None, *, is_causal: bool = False,
                    scale: float | None = None, chunk_len: int | None = None, n_chunks_before: int = 0,
                    n_chunks_after: int = 0, exclude_self: bool = False, dropout_rate: float = 0.0,
                    prng_key: jax.Array | None = None) -> jnp.ndarray:
    """Chunked local self-attention `[batch..., T, N, Hv]`, matching Trax's `attend` with chunking.

    Args:
      query: `[batch..., T, N, H]`.
      key: `[batch..., T, N, H]` (self-attention: same length as the queries).
      value: `[batch..., T, N, Hv]`.
      bias: must be None (the windows never form the full `[T, S]` scores it would be sliced from).
      mask: optional boolean key-padding mask broadcastable to `[batch..., 1, 1, T]` (one row for all heads
        and queries); False hides that position as a key. A full `[T, S]` mask would defeat the purpose of
        local attention, so it is not accepted.
      is_causal: hide keys after the query.
      scale: logit scale, default `1/sqrt(H)`.
      chunk_len: positions per chunk; None attends over the whole sequence.
      n_chunks_before: earlier chunks each chunk also sees (wrapping around the start).
      n_chunks_after: later chunks each chunk also sees (wrapping around the end).
      exclude_self: subtract 1e5 from each query's score against its own position (shared-QK).
      dropout_rate: attention dropout probability; needs `prng_key`.
      prng_key: dropout's key; the keep mask has shape `[chunk_len, W]` and is shared by all chunks,
        heads and examples, exactly as Trax draws it.
    """
    query, key, value = check_qkv(query, key, value)
    reject_bias(bias, "local_attention")
    seq_len = query.shape[-3]
    if key.shape[-3] != seq_len:
        raise ValueError(f"local_attention is self-attention: query length {seq_len} != key length {key.shape[-3]}")
    if chunk_len is None and (n_chunks_before or n_chunks_after):
        raise ValueError(f"n_chunks_before={n_chunks_before} and n_chunks_after={n_chunks_after} need a chunk_len")
    positive_int("chunk_len", chunk_len, allow_none=True)
    if n_chunks_before < 0 or n_chunks_after < 0:
        raise ValueError(f"n_chunks_before/after must be >= 0, got {n_chunks_before}, {n_chunks_after}")
    batch_shape = query.shape[:-3]
    valid = key_padding_mask(mask, key.shape, "local_attention", per_head=False)
    valid = jnp.ones(batch_shape + (seq_len,), bool) if valid is None else valid
    window = (chunk_len or seq_len) * (1 + n_chunks_before + n_chunks_after)
    keep = dropout_keep(prng_key, dropout_rate, (chunk_len or seq_len, window))

    fn = lambda q, k, v, m: _local_attention_one(
        q, k, v, m, keep, is_causal=is_causal, scale=default_scale(scale, query.shape[-1]),
        chunk_len=chunk_len, n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after,
        exclude_self=exclude_self)
    for _ in batch_shape:
        fn = jax.vmap(fn)
    return fn(query, key, value, valid)
