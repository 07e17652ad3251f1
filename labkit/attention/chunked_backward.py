"""FlashAttention-2's backward pass for exact chunked attention: gradients from the saved log-sum-exp, block by block.

Dao 2023, "FlashAttention-2: Faster Attention with Better Parallelism and Work Partitioning" (arXiv:2307.08691),
Algorithm 2. The forward pass (`labkit.attention.chunked`) saves its output `O` and each row's log-sum-exp
`lse`, nothing per block. The softmax weights of any block are then `P = exp(S - lse)` (already normalised),
so the backward pass never differentiates the forward's running rescaling. With `D = rowsum(dO * O)`
(one number per query), per block (i, j):

    S = Q_i K_j^T + bias        P = exp(S - lse_i)           dV_j += P^T dO_i
    dP = dO_i V_j^T             dS = P * (dP - D_i)          dQ_i += dS K_j      dK_j += dS^T Q_i

and `dbias` gets `dS` (summed over the axes the bias broadcasts along). The queries arrive with the scale
already folded in (`chunked.to_chunks`), so autodiff of that fold applies it to `dQ`; `dK += dS^T (Q * scale)`.

Loops: a `lax.scan` over key chunks j (carrying `dQ`, and `dbias` if there is a bias) around a loop over
query chunks i (carrying `dK_j`, `dV_j`). Causal attention loops only over the query chunks that see key chunk j,
the masked ones then the plain ones (`chunked_blocks.query_ranges`, dynamic bounds), as the forward loops over
the key chunks each query chunk sees; otherwise a `lax.scan` visits every block, plain or masked as the
forward pass does (`chunked_blocks.switch_on_block`). Five block-sized
matrix products per computed block, against the forward's two. Memory: one block of scores and its gradient,
plus `dQ`, `dK`, `dV` (and `dbias`, the size of the bias): linear in the length.

Rows that saw no visible key output the mean of the values: their `lse` is +inf, so their weights are zero
here, and their gradient reaches the values directly (`dO / S` for each real key).
"""

from __future__ import annotations

import jax.numpy as jnp
from jax import lax

from labkit.attention.chunked_blocks import Plan, block_scores, query_ranges, switch_on_block, uses_ranges


def gradients(plan: Plan, q_chunks, k_chunks, v_chunks, out, lse, d_out) -> tuple:
    """`(dq [nq, B, N, qc, H], dk [nk, B, N, kc, H], dv [nk, B, N, kc, Hv], dbias or None)` of the chunked outputs.

    Args:
      plan: the forward pass's block plan, with its bias and mask operands.
      q_chunks: scaled queries `[nq, B, N, qc, H]`; `k_chunks` `[nk, B, N, kc, H]`, `v_chunks` `[nk, B, N, kc, Hv]`.
      out: the forward's output chunks `[nq, B, N, qc, Hv]`; `lse` its log-sum-exp `[nq, B, N, qc]`.
      d_out: the output's cotangent `[nq, B, N, qc, Hv]`.
    """
    delta = jnp.sum(d_out * out, axis=-1)  # D = rowsum(dO * O) [nq, B, N, qc]
    rows = (jnp.arange(q_chunks.shape[0]), q_chunks, d_out, lse, delta)

    def key_chunk(carry, xs):
        j, k_blk, v_blk = xs
        init = (*carry, jnp.zeros_like(k_blk), jnp.zeros_like(v_blk))
        if uses_ranges(plan):  # causal: only the query chunks that see key chunk j, masked ones then plain ones
            first, first_plain = query_ranges(plan, j, q_chunks.shape[0])
            grads = lax.fori_loop(first, first_plain, _row_step(plan, j, k_blk, v_blk, rows, True), init)
            dq, dbias, dk, dv = lax.fori_loop(first_plain, q_chunks.shape[0],
                                              _row_step(plan, j, k_blk, v_blk, rows, False), grads)
        else:
            (dq, dbias, dk, dv), _ = lax.scan(lambda c, r: (_block_step(plan, j, k_blk, v_blk, c, r), None), init,
                                              rows)
        return (dq, dbias), (dk, dv)

    dbias = None if plan.bias is None else jnp.zeros_like(plan.bias)
    (dq, dbias), (dk, dv) = lax.scan(key_chunk, (jnp.zeros_like(q_chunks), dbias),
                                     (jnp.arange(plan.nk), k_chunks, v_chunks))
    if plan.mask is not None:
        dv = dv + _mean_value_gradient(plan, lse, d_out)
    return dq, dk, dv, dbias


def _block_step(plan: Plan, j, k_blk, v_blk, carry, row):
    """Block (query chunk i, key chunk j) added to `(dq, dbias, dk_j, dv_j)`: skipped, plain or masked."""
    return switch_on_block(plan, row[0], j, lambda grads, masked: _add_block(plan, j, k_blk, v_blk, grads, row, masked),
                           carry)


def _row_step(plan: Plan, j, k_blk, v_blk, rows, masked: bool):
    """`fori_loop` body: query chunk i's block against key chunk j, `masked` or plain, added to the gradients."""
    def body(i, grads):
        row = tuple(lax.dynamic_index_in_dim(x, i, keepdims=False) for x in rows)
        return _add_block(plan, j, k_blk, v_blk, grads, row, masked)
    return body


def _add_block(plan: Plan, j, k_blk, v_blk, grads, row, masked: bool):
    """`(dq, dbias, dk_j, dv_j)` plus block (i, j)'s share, from its recomputed softmax weights."""
    i, q_blk, do_blk, lse_blk, delta_blk = row
    dq, dbias, dk, dv = grads
    s = block_scores(plan, q_blk, k_blk, i, j, masked)
    p = jnp.exp(s - lse_blk[..., None])  # the normalised weights, recomputed: no running rescaling
    dv = dv + jnp.einsum("bnqk,bnqh->bnkh", p, do_blk, preferred_element_type=jnp.float32)
    dp = jnp.einsum("bnqh,bnkh->bnqk", do_blk, v_blk, preferred_element_type=jnp.float32)
    ds = p * (dp - delta_blk[..., None])
    dq_i = lax.dynamic_index_in_dim(dq, i, keepdims=False)  # an in-place update of the carry, not a scatter
    dq_i = dq_i + jnp.einsum("bnqk,bnkh->bnqh", ds, k_blk, preferred_element_type=jnp.float32)
    dq = lax.dynamic_update_index_in_dim(dq, dq_i, i, 0)
    dk = dk + jnp.einsum("bnqk,bnqh->bnkh", ds, q_blk, preferred_element_type=jnp.float32)
    if dbias is not None:
        dbias = _add_bias_block(plan, dbias, ds, i, j)
    return dq, dbias, dk, dv


def _add_bias_block(plan: Plan, dbias, ds, i, j):
    """`dbias [B or 1, N or 1, T' or 1, S' or 1]` plus block (i, j)'s `dS`, summed over the broadcast axes."""
    axes = tuple(a for a in range(4) if dbias.shape[a] == 1 and ds.shape[a] != 1)
    part = jnp.sum(ds, axis=axes, keepdims=True)
    start = (0, 0, i * plan.qc if dbias.shape[2] != 1 else 0, j * plan.kc if dbias.shape[3] != 1 else 0)
    return lax.dynamic_update_slice(dbias, lax.dynamic_slice(dbias, start, part.shape) + part, start)


def _mean_value_gradient(plan: Plan, lse, d_out):
    """`[nk, 1 or B, N, kc, Hv]`: rows that saw no key output the mean of the real values, `dO / S` to each."""
    unseen = (lse == jnp.inf)[..., None]
    total = jnp.sum(jnp.where(unseen, d_out, 0.0), axis=(0, 3))  # [B, N, Hv]
    key_pos = jnp.arange(plan.nk)[:, None] * plan.kc + jnp.arange(plan.kc)[None, :]  # [nk, kc]
    real = (key_pos < plan.kv_len)[:, None, None, :, None]
    return jnp.where(real, total[None, :, :, None, :] / plan.kv_len, 0.0)
