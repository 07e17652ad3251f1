"""The block grid of exact chunked attention: chunked operands, one block's scores, and which blocks to compute.

Shared by the forward pass (`labkit.attention.chunked`) and its FlashAttention-2 style backward pass
(`labkit.attention.chunked_backward`), so both see the same scores, masks and skipped blocks. Arrays are kept
as `[n_chunks, B, N, chunk, H]` (B = the flattened batch dims); a bias or mask operand as
`[B or 1, N or 1, T' or 1, S' or 1]`, padded to whole chunks and never expanded along its broadcast axes.
"""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
from jax import lax

from labkit.attention.dense import LARGE_NEGATIVE

# Branches of the per-block switch.
SKIP, PLAIN, MASKED = 0, 1, 2


class Plan(NamedTuple):
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


def operand_block(x: jnp.ndarray | None, start_q, size_q: int, start_k, size_k: int):
    """The `[.., .., size_q or 1, size_k or 1]` block of a bias/mask operand starting at (start_q, start_k)."""
    if x is None:
        return None
    if x.shape[2] != 1:
        x = lax.dynamic_slice_in_dim(x, start_q, size_q, axis=2)
    if x.shape[3] != 1:
        x = lax.dynamic_slice_in_dim(x, start_k, size_k, axis=3)
    return x


def to_chunks(x: jnp.ndarray, chunk: int, factor: float | None = None) -> jnp.ndarray:
    """`[batch..., L, N, H]` -> `[n_chunks, B, N, chunk, H]` float32, L zero-padded to a multiple of `chunk`."""
    x = x.reshape((-1,) + x.shape[-3:]).astype(jnp.float32)  # [B, L, N, H]
    if factor is not None:
        x = x * factor  # the scale, folded into the (smaller) query side once
    n_chunks = -(-x.shape[1] // chunk)
    x = _pad_axis(x, 1, n_chunks * chunk, 0)
    # [B, n_chunks * chunk, N, H] -> [n_chunks, B, N, chunk, H]: the scans walk the leading axis.
    return x.reshape(x.shape[0], n_chunks, chunk, *x.shape[2:]).transpose(1, 0, 3, 2, 4)


def from_chunks(x: jnp.ndarray, length: int) -> jnp.ndarray:
    """`[n_chunks, B, N, chunk, ...]` -> `[B, N, length, ...]`: the chunks joined, the padding cut off."""
    x = jnp.moveaxis(x, 0, 2)
    return x.reshape(x.shape[:2] + (-1,) + x.shape[4:])[:, :, :length]


def make_plan(bias, mask, batch_shape: tuple, heads: int, q_len: int, kv_len: int, qc: int, kc: int,
              is_causal: bool, skip_blocks: bool) -> Plan:
    """Padded bias/mask operands and which blocks need masking."""
    q_pad, k_pad = -(-q_len // qc) * qc, -(-kv_len // kc) * kc
    bias_op = None if bias is None else _pad_axis(_pad_axis(
        _as_blocks_operand("bias", bias, batch_shape, heads, q_len, kv_len, jnp.float32), 2, q_pad, 0), 3, k_pad, 0)
    mask_op = None if mask is None else _pad_axis(_pad_axis(
        _as_blocks_operand("mask", mask, batch_shape, heads, q_len, kv_len, bool), 2, q_pad, True), 3, k_pad, False)
    keys_padded = k_pad != kv_len
    never_masked = mask_op is None and not is_causal and not keys_padded
    always_masked = not never_masked and (not skip_blocks or (mask_op is not None and not is_causal))
    return Plan(qc, kc, k_pad // kc, kv_len, is_causal, bias_op, mask_op, keys_padded, never_masked, always_masked)


def block_scores(plan: Plan, q_blk, k_blk, i, j, masked: bool, *, transposed: bool = False) -> jnp.ndarray:
    """Scores `[B, N, qc, kc]` of query chunk i against key chunk j; hidden ones `LARGE_NEGATIVE` if `masked`.

    `transposed=True` returns the same scores as `[B, N, kc, qc]`, computed in that layout (not transposed
    afterwards): the backward pass's products with them then all contract along a row (see chunked_backward).
    """
    spec = "bnkh,bnqh->bnkq" if transposed else "bnqh,bnkh->bnqk"
    s = jnp.einsum(spec, *((k_blk, q_blk) if transposed else (q_blk, k_blk)), preferred_element_type=jnp.float32)
    orient = (lambda x: jnp.swapaxes(x, -1, -2)) if transposed else (lambda x: x)
    b = operand_block(plan.bias, i * plan.qc, plan.qc, j * plan.kc, plan.kc)
    if b is not None:
        s = s + orient(b)
    if not masked:
        return s
    q_pos = i * plan.qc + jnp.arange(plan.qc)[:, None]
    k_pos = j * plan.kc + jnp.arange(plan.kc)[None, :]
    keep = k_pos < plan.kv_len
    if plan.is_causal:
        keep = keep & (k_pos <= q_pos)  # [qc, kc]
    m = operand_block(plan.mask, i * plan.qc, plan.qc, j * plan.kc, plan.kc)
    if m is not None:
        keep = keep & m
    return jnp.where(orient(keep), s, LARGE_NEGATIVE)


def block_kind(plan: Plan, i, j):
    """Which computation block (i, j) needs: `SKIP`, `PLAIN` or `MASKED`, from positions (traced ints)."""
    last_query, first_key, last_key = i * plan.qc + plan.qc - 1, j * plan.kc, j * plan.kc + plan.kc - 1
    needs_mask = plan.mask is not None
    if plan.keys_padded:
        needs_mask = jnp.logical_or(needs_mask, j == plan.nk - 1)
    if plan.is_causal:
        needs_mask = jnp.logical_or(needs_mask, last_key > i * plan.qc)
        return jnp.where(first_key > last_query, SKIP, jnp.where(needs_mask, MASKED, PLAIN))
    return jnp.where(needs_mask, MASKED, PLAIN)


def key_ranges(plan: Plan, i) -> tuple:
    """Causal query chunk i: `(n_plain, n_needed)`: key chunks `[0, n_plain)` need no mask, `[n_plain, n_needed)`
    are masked, the rest are above the diagonal (traced ints; the same kinds as `block_kind`)."""
    n_needed = jnp.minimum((i * plan.qc + plan.qc - 1) // plan.kc + 1, plan.nk)
    n_plain = 0 if plan.mask is not None else jnp.minimum((i * plan.qc + 1) // plan.kc, n_needed)
    if plan.keys_padded:
        n_plain = jnp.minimum(n_plain, plan.nk - 1)
    return n_plain, n_needed


def query_ranges(plan: Plan, j, nq: int) -> tuple:
    """Causal key chunk j: `(first, first_plain)`: query chunks `[first, first_plain)` see it masked,
    `[first_plain, nq)` plainly, those before `first` not at all (traced ints; as `block_kind`)."""
    first = jnp.minimum((j * plan.kc) // plan.qc, nq)
    first_plain = jnp.clip((j * plan.kc + plan.kc - 1 + plan.qc - 1) // plan.qc, first, nq)
    if plan.mask is not None:
        first_plain = nq
    if plan.keys_padded:
        first_plain = jnp.where(j == plan.nk - 1, nq, first_plain)
    return first, first_plain


def uses_ranges(plan: Plan) -> bool:
    """Whether causal loops can run over `key_ranges`/`query_ranges` instead of switching on every block."""
    return plan.is_causal and not plan.always_masked


def switch_on_block(plan: Plan, i, j, compute, carry):
    """`compute(carry, masked)` for block (i, j), skipped (carry unchanged), plain or masked as the plan says."""
    if plan.never_masked or plan.always_masked:
        return compute(carry, plan.always_masked)
    branches = [lambda c: c, lambda c: compute(c, False), lambda c: compute(c, True)]
    return lax.switch(block_kind(plan, i, j), branches, carry)
