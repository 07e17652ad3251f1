"""Exact attention without the quadratic score matrix: memory-efficient attention (Rabe & Staats).

Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory" (arXiv:2112.05682). The softmax over keys
can be accumulated chunk by chunk: for each query keep a running maximum `m`, a running normaliser
`l = sum_j exp(s_j - m)` and a running weighted sum `acc = sum_j exp(s_j - m) v_j`. When a new chunk of
keys raises the maximum to `m'`, the old sums are rescaled by `exp(m - m')` before the chunk's own terms
are added; at the end `out = acc / l`. The result is exact (the same numbers as the dense softmax up to
float rounding), and only one `[query_chunk, key_chunk]` block of scores per head exists at a time.

Here queries are split into chunks with `lax.map` and keys into chunks with `lax.scan`, arrays are kept
as `[batch, heads, seq, dim]` inside, the scale is folded into the queries, and blocks that need no mask
do no mask arithmetic. With `is_causal=True` key chunks entirely above the diagonal are skipped (`lax.switch`
runs no computation for them), so causal attention costs about half. With `checkpoint=True`
(`jax.checkpoint` on the key-chunk step and on each query chunk) the backward pass recomputes the blocks
instead of storing them, so gradients also take memory linear in the sequence length.

Cost per head: O(T S H) time, like dense attention; extra memory O(query_chunk * key_chunk) for the
scores plus O(T H) for the running sums (O(sqrt n) scores when the chunks are ~sqrt(n), the paper's setting).

Rows whose keys are all hidden by `mask` get the plain mean of all values: the same convention as
`labkit.attention.dense.dot_product_attention` and `jax.nn.dot_product_attention`.

Default chunk sizes 512 x 512 come from a sweep on the course's 2-core CPU (4 heads, dim 64, forward, each point
a fresh process, two interleaved rounds on a busy shared machine). Seconds per call at seq 16384:
512x512 4.5 / 8.2, 256x256 8.8 / 9.3, 1024x1024 9.4 / 8.9, 512x1024 6.8 / 11.7, 1024x512 6.8 / 25.8, and the
paper's 1024x4096 8.8 / 16.0 (with twice the peak memory, 236 vs 116-131 MiB). At seq 4096 256x256 and 512x512
were within noise (0.30-0.36 s) and 1024x4096 slower (0.37 / 0.57 s). 512x512 was the fastest at 16384 in
both rounds, and agrees with quieter measurements where it matched torch's flash kernel.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

from labkit.attention._validate import check_qkv, default_scale
from labkit.attention.dense import LARGE_NEGATIVE

DEFAULT_QUERY_CHUNK_SIZE = 512
DEFAULT_KEY_CHUNK_SIZE = 512

# Branches of the per-block switch.
_SKIP, _PLAIN, _MASKED = 0, 1, 2


def _as_blocks_operand(name: str, x, batch_shape: tuple, heads: int, q_len: int, kv_len: int,
                       dtype) -> jnp.ndarray:
    """Bias/mask broadcastable to `[batch..., N, T, S]` -> `[B or 1, N or 1, T or 1, S or 1]` (not expanded)."""
    x = jnp.asarray(x, dtype)
    target = (*batch_shape, heads, q_len, kv_len)
    if x.ndim > len(target):
        raise ValueError(f"{name} must be broadcastable to [batch..., N, T, S] = {target}, got shape {x.shape}")
    x = x.reshape((1,) * (len(target) - x.ndim) + x.shape)
    for have, want in zip(x.shape, target):
        if have not in (1, want):
            raise ValueError(f"{name} must be broadcastable to [batch..., N, T, S] = {target}, got shape {x.shape}")
    n_batch = len(batch_shape)
    if all(d == 1 for d in x.shape[:n_batch]):
        return x.reshape((1,) + x.shape[n_batch:])
    return jnp.broadcast_to(x, target[:n_batch] + x.shape[n_batch:]).reshape((-1,) + x.shape[n_batch:])


def _pad_axis(x: jnp.ndarray, axis: int, size: int, fill) -> jnp.ndarray:
    if x.shape[axis] in (1, size):
        return x
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths, constant_values=fill)


def _block(x: jnp.ndarray | None, start_q, size_q: int, start_k, size_k: int):
    """The `[.., .., size_q or 1, size_k or 1]` block of a bias/mask operand starting at (start_q, start_k)."""
    if x is None:
        return None
    if x.shape[2] != 1:
        x = lax.dynamic_slice_in_dim(x, start_q, size_q, axis=2)
    if x.shape[3] != 1:
        x = lax.dynamic_slice_in_dim(x, start_k, size_k, axis=3)
    return x


def memory_efficient_attention(query, key, value, bias=None, mask=None, *, is_causal: bool = False,
                               scale: float | None = None, query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
                               key_chunk_size: int = DEFAULT_KEY_CHUNK_SIZE,
                               checkpoint: bool = True, skip_blocks: bool = True) -> jnp.ndarray:
    """Exact attention `[batch..., T, N, Hv]` computed block by block, a drop-in for `dot_product_attention`.

    Args:
      query: `[batch..., T, N, H]`.
      key: `[batch..., S, N, H]`.
      value: `[batch..., S, N, Hv]`.
      bias: optional, broadcastable to `[batch..., N, T, S]`, added to the scaled logits (sliced per block).
      mask: optional boolean, broadcastable to `[batch..., N, T, S]`; False hides key j from query i.
      is_causal: hide keys j > i; key chunks entirely above the diagonal are not computed.
      scale: logit scale, default `1/sqrt(H)`.
      query_chunk_size: queries per block (clipped to T); T need not be a multiple.
      key_chunk_size: keys per block (clipped to S); S need not be a multiple.
      checkpoint: recompute blocks in the backward pass instead of storing them (linear gradient memory).
      skip_blocks: choose per block between skipping it (causal, above the diagonal), computing it without
        masks, and computing it masked (`lax.switch`). False masks every block that may need it and skips
        none: slower, but free of conditionals, which TFLite's interpreter cannot run inside loops.

    Returns:
      `[batch..., T, N, Hv]` in `value`'s dtype; softmax statistics are kept in float32. Rows whose keys
      are all hidden by `mask` return the mean of the values (as the dense reference does).
    """
    query, key, value = check_qkv(query, key, value)
    for name, size in (("query_chunk_size", query_chunk_size), ("key_chunk_size", key_chunk_size)):
        if not isinstance(size, int) or isinstance(size, bool) or size < 1:
            raise ValueError(f"{name} must be a positive int, got {size!r}")
    *batch_shape, q_len, heads, head_dim = query.shape
    kv_len, v_dim = key.shape[-3], value.shape[-1]
    batch_shape = tuple(batch_shape)
    scale = default_scale(scale, head_dim)
    qc, kc = min(query_chunk_size, q_len), min(key_chunk_size, kv_len)
    nq, nk = -(-q_len // qc), -(-kv_len // kc)
    q_pad, k_pad = nq * qc, nk * kc

    # [batch..., T, N, H] -> [B, N, T, H], scale folded into the (smaller) query side once.
    def to_bnth(x, padded, factor=None):
        x = x.reshape((-1,) + x.shape[-3:]).astype(jnp.float32)
        if factor is not None:
            x = x * factor
        x = jnp.swapaxes(x, 1, 2)
        return _pad_axis(x, 2, padded, 0)

    q = to_bnth(query, q_pad, scale)
    k = to_bnth(key, k_pad)
    v = to_bnth(value, k_pad)
    n_batch = q.shape[0]
    # [n_chunks, B, N, chunk, H]: the scans walk the leading axis.
    q_chunks = q.reshape(n_batch, heads, nq, qc, head_dim).transpose(2, 0, 1, 3, 4)
    k_chunks = k.reshape(n_batch, heads, nk, kc, head_dim).transpose(2, 0, 1, 3, 4)
    v_chunks = v.reshape(n_batch, heads, nk, kc, v_dim).transpose(2, 0, 1, 3, 4)

    bias_op = None if bias is None else _pad_axis(_pad_axis(
        _as_blocks_operand("bias", bias, batch_shape, heads, q_len, kv_len, jnp.float32), 2, q_pad, 0), 3, k_pad, 0)
    mask_op = None if mask is None else _pad_axis(_pad_axis(
        _as_blocks_operand("mask", mask, batch_shape, heads, q_len, kv_len, bool), 2, q_pad, True), 3, k_pad, False)
    keys_padded = k_pad != kv_len

    def scores(q_blk, k_blk, i, j, masked):
        s = jnp.einsum("bnqh,bnkh->bnqk", q_blk, k_blk, preferred_element_type=jnp.float32)
        b = _block(bias_op, i * qc, qc, j * kc, kc)
        if b is not None:
            s = s + b
        if not masked:
            return s
        q_pos = i * qc + jnp.arange(qc)[:, None]
        k_pos = j * kc + jnp.arange(kc)[None, :]
        keep = k_pos < kv_len
        if is_causal:
            keep = keep & (k_pos <= q_pos)
        m = _block(mask_op, i * qc, qc, j * kc, kc)
        if m is not None:
            keep = keep & m
        return jnp.where(keep, s, LARGE_NEGATIVE)

    def update(carry, q_blk, k_blk, v_blk, i, j, masked):
        acc, row_max, row_sum = carry
        s = scores(q_blk, k_blk, i, j, masked)
        new_max = jnp.maximum(row_max, jnp.max(s, axis=-1))
        p = jnp.exp(s - new_max[..., None])
        correction = jnp.exp(row_max - new_max)  # rescales the old sums to the new maximum
        acc = acc * correction[..., None] + jnp.einsum("bnqk,bnkh->bnqh", p, v_blk)
        row_sum = row_sum * correction + jnp.sum(p, axis=-1)
        return acc, new_max, row_sum

    def branch_of(i, j):
        """Which computation block (i, j) needs, decided from positions (traced ints)."""
        last_query, first_key, last_key = i * qc + qc - 1, j * kc, j * kc + kc - 1
        needs_mask = mask_op is not None
        if keys_padded:
            needs_mask = jnp.logical_or(needs_mask, j == nk - 1)
        if is_causal:
            needs_mask = jnp.logical_or(needs_mask, last_key > i * qc)
            return jnp.where(first_key > last_query, _SKIP, jnp.where(needs_mask, _MASKED, _PLAIN))
        return jnp.where(needs_mask, _MASKED, _PLAIN)

    never_masked = mask_op is None and not is_causal and not keys_padded
    always_masked = not never_masked and (not skip_blocks or (mask_op is not None and not is_causal))

    def key_step(q_blk, i, carry, xs):
        j, k_blk, v_blk = xs
        if never_masked or always_masked:
            return update(carry, q_blk, k_blk, v_blk, i, j, always_masked), None
        branches = [lambda c: c,
                    lambda c: update(c, q_blk, k_blk, v_blk, i, j, False),
                    lambda c: update(c, q_blk, k_blk, v_blk, i, j, True)]
        return lax.switch(branch_of(i, j), branches, carry), None

    if checkpoint:
        key_step = jax.checkpoint(key_step, prevent_cse=False)

    def query_chunk(xs):
        i, q_blk = xs
        init = (jnp.zeros(q_blk.shape[:-1] + (v_dim,), jnp.float32),
                jnp.full(q_blk.shape[:-1], LARGE_NEGATIVE, jnp.float32),
                jnp.zeros(q_blk.shape[:-1], jnp.float32))
        (acc, row_max, row_sum), _ = lax.scan(lambda c, x: key_step(q_blk, i, c, x), init,
                                              (jnp.arange(nk), k_chunks, v_chunks))
        out = acc / row_sum[..., None]
        if mask_op is not None:
            # A row that saw no visible key has max LARGE_NEGATIVE: give it the dense convention's mean.
            out = jnp.where((row_max > 0.5 * LARGE_NEGATIVE)[..., None], out, mean_v[:, :, None, :])
        return out

    if mask_op is not None:
        mean_v = jnp.mean(v[:, :, :kv_len], axis=2)  # [B, N, Hv]
    if checkpoint:
        query_chunk = jax.checkpoint(query_chunk, prevent_cse=False)

    out = lax.map(query_chunk, (jnp.arange(nq), q_chunks))  # [nq, B, N, qc, Hv]
    out = out.transpose(1, 2, 0, 3, 4).reshape(n_batch, heads, q_pad, v_dim)[:, :, :q_len]
    out = jnp.swapaxes(out, 1, 2).reshape(batch_shape + (q_len, heads, v_dim))
    return out.astype(value.dtype)
