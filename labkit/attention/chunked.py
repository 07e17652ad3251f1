"""Exact attention without the quadratic score matrix: memory-efficient attention (Rabe & Staats).

Rabe & Staats 2021, "Self-attention Does Not Need O(n^2) Memory" (arXiv:2112.05682). The softmax over keys
can be accumulated chunk by chunk: for each query keep a running maximum `m`, a running normaliser
`l = sum_j exp(s_j - m)` and a running weighted sum `acc = sum_j exp(s_j - m) v_j`. When a new chunk of
keys raises the maximum to `m'`, the old sums are rescaled by `exp(m - m')` before the chunk's own terms
are added; at the end `out = acc / l`. The result is exact (the same numbers as the dense softmax up to
float rounding), and only one `[query_chunk, key_chunk]` block of scores per head exists at a time.

Here queries are split into chunks with `lax.map` and keys into chunks with `lax.scan`, arrays are kept
as `[batch, heads, seq, dim]` inside, the scale is folded into the queries, and blocks that need no mask
do no mask arithmetic (the block grid: `labkit.attention.chunked_blocks`). With `is_causal=True` key chunks
entirely above the diagonal are skipped, so causal attention costs about half: the default path (custom
backward) loops only over the key chunks each query chunk sees, plain ones then masked ones (`lax.fori_loop`
with bounds computed from the chunk index), and never visits the others; the autodiff path
(`custom_backward=False`), which needs loops of fixed length, switches per block (`lax.switch`). Measured on
a 2-core AMD EPYC (4 heads, dim 64, 512 x 512 blocks, seq 4,096, best of 5 interleaved calls), causal time
over non-causal went from 0.65 to 0.58 (forward) and from 0.66 to 0.57 (forward + backward) with the loops;
with 8 x 8 blocks, 36 of 64 are computed (0.56).

Gradients (`custom_backward=True`, the default): FlashAttention-2's backward (Dao 2023), a `jax.custom_vjp`
in `labkit.attention.chunked_backward`. The forward pass saves only its output and each row's log-sum-exp
`lse = m + log l`; the backward pass recomputes every block's softmax weights as `exp(s - lse)`, exactly, with
no running rescaling to differentiate, and skips the same causal blocks. With `custom_backward=False` JAX
differentiates through the scan instead (`checkpoint=True` wraps the key-chunk step and each query chunk in
`jax.checkpoint`, so it recomputes blocks rather than storing them): the comparison lab 03 measures.

Cost per head: O(T S H) time, like dense attention (the backward runs 2.5x the forward's matrix products and
took 2.2-2.3x its time at 4,096 tokens); extra memory O(query_chunk * key_chunk) for the scores plus O(T H)
for the running sums, the saved output and the gradients (O(sqrt n) scores when the chunks are ~sqrt(n), the
paper's setting).

Rows whose keys are all hidden by `mask` get the plain mean of all values: the same convention as
`labkit.attention.dense.dot_product_attention` and `jax.nn.dot_product_attention`.

Concurrency on CPU: XLA runs a loop's iterations one after another, so independent work inside the loop body
was tried as a way to keep both cores of a 2-core AMD EPYC busy (forward, 4 heads, dim 64, 512 x 512 blocks,
best of 3-5 interleaved calls in one process, ms at seq 4096 / 8192): this loop 112 / 457; heads split into 2
or 4 independent chains inside the scan body 116 / 459 and 123 / 484; two query chunks per `lax.map` step,
unrolled 115 / 457; `lax.map(batch_size=2)` 128 / 515; two independent loops over half the heads each
119 / 512. XLA's threading inside each block's operations already kept ~1.9 of the 2 cores busy in every
variant (process CPU time / wall time, the backward too), so none helped and the plain loop stays. Spreading
heads over several devices does help: `devices=2` runs the heads in halves, one `shard_map` program per
device, at the same time (`labkit.attention.head_devices`: 0.84-0.95x the time on a 2-core AMD EPYC Zen 5). A
CPU has several devices only if JAX was told before it started (`jax_num_cpu_devices`), so it is an opt-in.

Chunk sizes: what `python -m labkit bench --tune` cached for this CPU (`labkit.attention.chunk_sizes`), else
512 x 512, from a sweep on the course's 2-core CPU (4 heads, dim 64, forward, each point a fresh process, two
interleaved rounds on a busy shared machine). Seconds per call at seq 16384: 512x512 4.5 / 8.2, 256x256
8.8 / 9.3, 1024x1024 9.4 / 8.9, 512x1024 6.8 / 11.7, 1024x512 6.8 / 25.8, and the paper's 1024x4096 8.8 / 16.0
(with twice the peak memory, 236 vs 116-131 MiB). On a 2-core Xeon with AVX-512, 1024x1024 was faster (1.44x
torch's time against 1.60x for 512x512): the reason for tuning per machine.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence

import jax
import jax.numpy as jnp
from jax import lax

from labkit.attention import chunked_backward, online_softmax
from labkit.attention._validate import check_qkv, default_scale, positive_int
from labkit.attention.chunk_sizes import tuned_chunk_sizes
from labkit.attention.chunked_blocks import (MASKED, PLAIN, SKIP, Plan, block_kind, block_scores, from_chunks,
                                             key_ranges, make_plan, switch_on_block, to_chunks, uses_ranges)
from labkit.attention.head_devices import resolve_devices, spread_over_heads
from labkit.attention.online_softmax import SoftmaxState

DEFAULT_QUERY_CHUNK_SIZE = 512
DEFAULT_KEY_CHUNK_SIZE = 512

__all__ = ["DEFAULT_KEY_CHUNK_SIZE", "DEFAULT_QUERY_CHUNK_SIZE", "MASKED", "PLAIN", "SKIP", "block_kind",
           "block_scores", "chunk_sizes_for", "memory_efficient_attention", "to_chunks"]


def memory_efficient_attention(query, key, value, bias=None, mask=None, *, is_causal: bool = False,
                               scale: float | None = None, query_chunk_size: int | None = None,
                               key_chunk_size: int | None = None, checkpoint: bool = True,
                               skip_blocks: bool = True, custom_backward: bool = True,
                               devices: int | Sequence | None = None) -> jnp.ndarray:
    """Exact attention `[batch..., T, N, Hv]` computed block by block, a drop-in for `dot_product_attention`.

    Args:
      query: `[batch..., T, N, H]`.
      key: `[batch..., S, N, H]`.
      value: `[batch..., S, N, Hv]`.
      bias: optional, broadcastable to `[batch..., N, T, S]`, added to the scaled logits (sliced per block).
      mask: optional boolean, broadcastable to `[batch..., N, T, S]`; False hides key j from query i.
      is_causal: hide keys j > i; key chunks entirely above the diagonal are not computed.
      scale: logit scale, default `1/sqrt(H)`.
      query_chunk_size: queries per block (clipped to T); T need not be a multiple. None: the size tuned for
        this CPU (`python -m labkit bench --tune`), else `DEFAULT_QUERY_CHUNK_SIZE`.
      key_chunk_size: keys per block (clipped to S); S need not be a multiple. None: as `query_chunk_size`.
      checkpoint: with `custom_backward=False`, recompute blocks in the backward pass instead of storing them
        (linear gradient memory). The custom backward always recomputes.
      skip_blocks: choose per block between skipping it (causal, above the diagonal), computing it without
        masks, and computing it masked (`lax.switch`). False masks every block that may need it and skips
        none: slower, but free of conditionals, which TFLite's interpreter cannot run inside loops.
      custom_backward: gradients by FlashAttention-2's backward from the saved log-sum-exp (a
        `jax.custom_vjp`); False differentiates through the scan (see the module docstring).
      devices: spread the heads over these devices (an int: the first n local ones), each running its own loop
        at the same time (`jax.shard_map`); N must be a multiple of their number. On a CPU, set
        `jax_num_cpu_devices` before JAX starts to have several (`labkit.attention.head_devices`).

    Returns:
      `[batch..., T, N, Hv]` in `value`'s dtype; softmax statistics are kept in float32. Rows whose keys
      are all hidden by `mask` return the mean of the values (as the dense reference does).
    """
    query, key, value = check_qkv(query, key, value)
    *batch_shape, q_len, heads, head_dim = query.shape
    kv_len = key.shape[-3]
    query_chunk_size, key_chunk_size = chunk_sizes_for(q_len, kv_len, head_dim, query_chunk_size, key_chunk_size)
    qc, kc = min(query_chunk_size, q_len), min(key_chunk_size, kv_len)
    q_chunks = to_chunks(query, qc, default_scale(scale, head_dim))  # [nq, B, N, qc, H]
    k_chunks, v_chunks = to_chunks(key, kc), to_chunks(value, kc)     # [nk, B, N, kc, H|Hv]
    plan = make_plan(bias, mask, tuple(batch_shape), heads, q_len, kv_len, qc, kc, is_causal, skip_blocks)
    # The plan's flags are static; its bias and mask travel as (differentiable / integer) arguments.
    attend = functools.partial(_attend if custom_backward else _autodiff_attend(checkpoint),
                               plan._replace(bias=None, mask=None))
    spread = resolve_devices(devices)
    if spread:
        attend = spread_over_heads(attend, spread, heads, plan.bias, plan.mask)
    out = attend(q_chunks, k_chunks, v_chunks, plan.bias, plan.mask)  # [nq, B, N, qc, Hv]
    out = from_chunks(out, q_len)  # [B, N, T, Hv]
    out = jnp.swapaxes(out, 1, 2).reshape(tuple(batch_shape) + (q_len, heads, value.shape[-1]))
    return out.astype(value.dtype)


def _autodiff_attend(checkpoint: bool):
    """`attend(plan, q_chunks, k_chunks, v_chunks, bias, mask)` -> output chunks, differentiated through the scan."""
    def attend(plan: Plan, q_chunks, k_chunks, v_chunks, bias, mask):
        return forward(plan._replace(bias=bias, mask=mask), q_chunks, k_chunks, v_chunks, checkpoint)[0]
    return attend


def chunk_sizes_for(q_len: int, kv_len: int, head_dim: int, query_chunk_size: int | None = None,
                    key_chunk_size: int | None = None) -> tuple[int, int]:
    """`(query_chunk_size, key_chunk_size)`: the caller's, else this CPU's tuned choice, else the defaults."""
    if query_chunk_size is None or key_chunk_size is None:
        tuned = tuned_chunk_sizes(q_len, kv_len, head_dim) or (DEFAULT_QUERY_CHUNK_SIZE, DEFAULT_KEY_CHUNK_SIZE)
        query_chunk_size = tuned[0] if query_chunk_size is None else query_chunk_size
        key_chunk_size = tuned[1] if key_chunk_size is None else key_chunk_size
    positive_int("query_chunk_size", query_chunk_size)
    positive_int("key_chunk_size", key_chunk_size)
    return query_chunk_size, key_chunk_size


def forward(plan: Plan, q_chunks, k_chunks, v_chunks, checkpoint: bool = False, differentiable: bool = True):
    """`(out [nq, B, N, qc, Hv], lse [nq, B, N, qc])` of all query chunks; `lse` is +inf where no key was seen.

    `differentiable=False` (the custom backward's forward, never differentiated by JAX) lets causal attention
    loop over only the key chunks each query chunk needs, plain ones then masked ones, with no per-block switch.
    """
    mean_v = None if plan.mask is None else jnp.mean(from_chunks(v_chunks, plan.kv_len), axis=2)  # [B, N, Hv]
    step = jax.checkpoint(_key_step, prevent_cse=False, static_argnums=(0,)) if checkpoint else _key_step
    keys = _needed_keys if not differentiable and uses_ranges(plan) else functools.partial(_all_keys, step=step)
    one_chunk = functools.partial(_query_chunk, plan, keys, k_chunks, v_chunks, mean_v)
    if checkpoint:
        one_chunk = jax.checkpoint(one_chunk, prevent_cse=False)
    return lax.map(one_chunk, (jnp.arange(q_chunks.shape[0]), q_chunks))


def _key_step(plan: Plan, q_blk, i, state: SoftmaxState, xs) -> tuple[SoftmaxState, None]:
    """One key chunk j folded into the running softmax of query chunk i (skipped, plain or masked)."""
    j, k_blk, v_blk = xs
    add = lambda st, masked: online_softmax.update(st, block_scores(plan, q_blk, k_blk, i, j, masked), v_blk)
    return switch_on_block(plan, i, j, add, state), None


def _all_keys(plan: Plan, q_blk, i, k_chunks, v_chunks, state: SoftmaxState, *, step) -> SoftmaxState:
    """Every key chunk folded into query chunk i's softmax: a scan, each block skipped, plain or masked."""
    state, _ = lax.scan(lambda st, x: step(plan, q_blk, i, st, x), state, (jnp.arange(plan.nk), k_chunks, v_chunks))
    return state


def _needed_keys(plan: Plan, q_blk, i, k_chunks, v_chunks, state: SoftmaxState) -> SoftmaxState:
    """Causal: only the key chunks query chunk i sees, the plain ones then the masked ones (dynamic bounds)."""
    def fold(masked):
        def body(j, st):
            k_blk, v_blk = (lax.dynamic_index_in_dim(x, j, keepdims=False) for x in (k_chunks, v_chunks))
            return online_softmax.update(st, block_scores(plan, q_blk, k_blk, i, j, masked), v_blk)
        return body

    n_plain, n_needed = key_ranges(plan, i)
    state = lax.fori_loop(0, n_plain, fold(False), state)
    return lax.fori_loop(n_plain, n_needed, fold(True), state)


def _query_chunk(plan: Plan, keys, k_chunks, v_chunks, mean_v, xs):
    """`(out [B, N, qc, Hv], lse [B, N, qc])` of query chunk i: its key chunks folded in, then the normalisation."""
    i, q_blk = xs
    init = online_softmax.init_state(q_blk.shape[:-1], v_chunks.shape[-1])
    state = keys(plan, q_blk, i, k_chunks, v_chunks, init)
    out, lse = online_softmax.finalize(state)
    if mean_v is None:
        return out, lse
    # A row that saw no visible key: the dense convention's mean of the values; its lse of +inf makes every
    # recomputed weight exp(s - lse) zero in the backward pass, which adds the mean's own gradient instead.
    seen = online_softmax.seen_a_key(state)
    return jnp.where(seen[..., None], out, mean_v[:, :, None, :]), jnp.where(seen, lse, jnp.inf)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _attend(plan: Plan, q_chunks, k_chunks, v_chunks, bias, mask) -> jnp.ndarray:
    """Output chunks `[nq, B, N, qc, Hv]`; differentiated by `chunked_backward.gradients`."""
    return forward(plan._replace(bias=bias, mask=mask), q_chunks, k_chunks, v_chunks, differentiable=False)[0]


def _attend_fwd(plan: Plan, q_chunks, k_chunks, v_chunks, bias, mask):
    out, lse = forward(plan._replace(bias=bias, mask=mask), q_chunks, k_chunks, v_chunks, differentiable=False)
    return out, (q_chunks, k_chunks, v_chunks, bias, mask, out, lse)  # all linear in the length


def _attend_bwd(plan: Plan, saved, d_out):
    q_chunks, k_chunks, v_chunks, bias, mask, out, lse = saved
    grads = chunked_backward.gradients(plan._replace(bias=bias, mask=mask), q_chunks, k_chunks, v_chunks, out, lse,
                                       d_out)
    return (*grads, None)  # the mask gets no gradient


_attend.defvjp(_attend_fwd, _attend_bwd)
