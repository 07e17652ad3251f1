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

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax

from labkit.attention import online_softmax
from labkit.attention._validate import check_qkv, default_scale, positive_int
from labkit.attention.dense import LARGE_NEGATIVE
from labkit.attention.online_softmax import SoftmaxState

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


class _Plan(NamedTuple):
    """What every block step needs to know: chunk sizes, lengths, masking and the bias/mask operands."""

    qc: int  # queries per chunk
    kc: int  # keys per chunk
    nk: int  # key chunks
    kv_len: int  # real keys (S), before padding
    is_causal: bool
    bias: jnp.ndarray | None  # [B or 1, N or 1, T' or 1, S' or 1], padded
    mask: jnp.ndarray | None  # same layout, bool
    keys_padded: bool
    never_masked: bool  # no block needs a mask: every block is computed plainly
    always_masked: bool  # every computed block is masked: no per-block choice


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
    positive_int("query_chunk_size", query_chunk_size)
    positive_int("key_chunk_size", key_chunk_size)
    *batch_shape, q_len, heads, head_dim = query.shape
    kv_len = key.shape[-3]
    qc, kc = min(query_chunk_size, q_len), min(key_chunk_size, kv_len)
    q_chunks = to_chunks(query, qc, default_scale(scale, head_dim))  # [nq, B, N, qc, H]
    k_chunks, v_chunks = to_chunks(key, kc), to_chunks(value, kc)     # [nk, B, N, kc, H|Hv]
    plan = _plan(bias, mask, tuple(batch_shape), heads, q_len, kv_len, qc, kc, is_causal, skip_blocks)
    mean_v = None if mask is None else jnp.mean(jnp.moveaxis(v_chunks, 0, 2).reshape(
        v_chunks.shape[1:3] + (-1, v_chunks.shape[-1]))[:, :, :kv_len], axis=2)  # [B, N, Hv]
    step = jax.checkpoint(_key_step, prevent_cse=False, static_argnums=(0,)) if checkpoint else _key_step
    one_chunk = functools.partial(_query_chunk, plan, step, k_chunks, v_chunks, mean_v)
    if checkpoint:
        one_chunk = jax.checkpoint(one_chunk, prevent_cse=False)
    out = lax.map(one_chunk, (jnp.arange(q_chunks.shape[0]), q_chunks))  # [nq, B, N, qc, Hv]
    out = jnp.moveaxis(out, 0, 2).reshape(out.shape[1:3] + (-1, out.shape[-1]))[:, :, :q_len]  # [B, N, T, Hv]
    out = jnp.swapaxes(out, 1, 2).reshape(tuple(batch_shape) + (q_len, heads, value.shape[-1]))
    return out.astype(value.dtype)


def to_chunks(x: jnp.ndarray, chunk: int, factor: float | None = None) -> jnp.ndarray:
    """`[batch..., L, N, H]` -> `[n_chunks, B, N, chunk, H]` float32, L zero-padded to a multiple of `chunk`."""
    x = x.reshape((-1,) + x.shape[-3:]).astype(jnp.float32)  # [B, L, N, H]
    if factor is not None:
        x = x * factor  # the scale, folded into the (smaller) query side once
    n_chunks = -(-x.shape[1] // chunk)
    x = _pad_axis(x, 1, n_chunks * chunk, 0)
    # [B, n_chunks * chunk, N, H] -> [n_chunks, B, N, chunk, H]: the scans walk the leading axis.
    return x.reshape(x.shape[0], n_chunks, chunk, *x.shape[2:]).transpose(1, 0, 3, 2, 4)


def _plan(bias, mask, batch_shape: tuple, heads: int, q_len: int, kv_len: int, qc: int, kc: int,
          is_causal: bool, skip_blocks: bool) -> _Plan:
    """Padded bias/mask operands and which blocks need masking."""
    q_pad, k_pad = -(-q_len // qc) * qc, -(-kv_len // kc) * kc
    bias_op = None if bias is None else _pad_axis(_pad_axis(
        _as_blocks_operand("bias", bias, batch_shape, heads, q_len, kv_len, jnp.float32), 2, q_pad, 0), 3, k_pad, 0)
    mask_op = None if mask is None else _pad_axis(_pad_axis(
        _as_blocks_operand("mask", mask, batch_shape, heads, q_len, kv_len, bool), 2, q_pad, True), 3, k_pad, False)
    keys_padded = k_pad != kv_len
    never_masked = mask_op is None and not is_causal and not keys_padded
    always_masked = not never_masked and (not skip_blocks or (mask_op is not None and not is_causal))
    return _Plan(qc, kc, k_pad // kc, kv_len, is_causal, bias_op, mask_op, keys_padded, never_masked, always_masked)


def block_scores(plan: _Plan, q_blk, k_blk, i, j, masked: bool) -> jnp.ndarray:
    """Scores `[B, N, qc, kc]` of query chunk i against key chunk j; hidden ones `LARGE_NEGATIVE` if `masked`."""
    s = jnp.einsum("bnqh,bnkh->bnqk", q_blk, k_blk, preferred_element_type=jnp.float32)
    b = _block(plan.bias, i * plan.qc, plan.qc, j * plan.kc, plan.kc)
    if b is not None:
        s = s + b
    if not masked:
        return s
    q_pos = i * plan.qc + jnp.arange(plan.qc)[:, None]
    k_pos = j * plan.kc + jnp.arange(plan.kc)[None, :]
    keep = k_pos < plan.kv_len
    if plan.is_causal:
        keep = keep & (k_pos <= q_pos)
    m = _block(plan.mask, i * plan.qc, plan.qc, j * plan.kc, plan.kc)
    if m is not None:
        keep = keep & m
    return jnp.where(keep, s, LARGE_NEGATIVE)


def block_kind(plan: _Plan, i, j):
    """Which computation block (i, j) needs: `_SKIP`, `_PLAIN` or `_MASKED`, from positions (traced ints)."""
    last_query, first_key, last_key = i * plan.qc + plan.qc - 1, j * plan.kc, j * plan.kc + plan.kc - 1
    needs_mask = plan.mask is not None
    if plan.keys_padded:
        needs_mask = jnp.logical_or(needs_mask, j == plan.nk - 1)
    if plan.is_causal:
        needs_mask = jnp.logical_or(needs_mask, last_key > i * plan.qc)
        return jnp.where(first_key > last_query, _SKIP, jnp.where(needs_mask, _MASKED, _PLAIN))
    return jnp.where(needs_mask, _MASKED, _PLAIN)


def _key_step(plan: _Plan, q_blk, i, state: SoftmaxState, xs) -> tuple[SoftmaxState, None]:
    """One key chunk j folded into the running softmax of query chunk i (skipped, plain or masked)."""
    j, k_blk, v_blk = xs
    add = lambda st, masked: online_softmax.update(st, block_scores(plan, q_blk, k_blk, i, j, masked), v_blk)
    if plan.never_masked or plan.always_masked:
        return add(state, plan.always_masked), None
    branches = [lambda st: st, lambda st: add(st, False), lambda st: add(st, True)]
    return lax.switch(block_kind(plan, i, j), branches, state), None


def _query_chunk(plan: _Plan, step, k_chunks, v_chunks, mean_v, xs) -> jnp.ndarray:
    """Output `[B, N, qc, Hv]` of query chunk i: a scan over the key chunks, then the normalisation."""
    i, q_blk = xs
    init = online_softmax.init_state(q_blk.shape[:-1], v_chunks.shape[-1])
    state, _ = lax.scan(lambda st, x: step(plan, q_blk, i, st, x), init,
                        (jnp.arange(plan.nk), k_chunks, v_chunks))
    out, _ = online_softmax.finalize(state)
    if mean_v is None:
        return out
    # A row that saw no visible key: the dense convention's mean of the values.
    return jnp.where(online_softmax.seen_a_key(state)[..., None], out, mean_v[:, :, None, :])
