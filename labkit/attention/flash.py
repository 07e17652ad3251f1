"""FlashAttention: exact attention as one fused kernel per block of queries, written in Pallas.

Dao et al. 2022, "FlashAttention: Fast and Memory-Efficient Exact Attention with IO-Awareness", and Dao 2023,
"FlashAttention-2". The algorithm is lab 03's online softmax (labkit.attention.online_softmax); what changes is
where it runs. One program instance owns a block of queries, walks the key/value blocks through fast on-chip
memory keeping the running maximum and sums in registers, and writes its output block and the log-sum-exp
(lse) of its rows once. The `[T, S]` scores never reach main memory: only q, k, v, the output and lse do.

The backward pass recomputes each block of probabilities from the stored lse (`p = exp(s - lse)`, no running
maximum needed) in two kernels: one program per key block accumulates dK and dV over the query blocks, one
program per query block accumulates dQ over the key blocks. `delta = rowsum(dO * O)` (an O(T H) array) replaces
the softmax's row sums. With `is_causal=True` blocks entirely above the diagonal are never visited.

`pl.pallas_call(..., interpret=True)` runs the same kernels on CPU as an emulator (for learning and
testing; its speed says nothing about a GPU); on a GPU they compile through Triton. Cost per head: O(T S H) time, like dense attention; extra memory
O(T) (lse and delta) beyond the inputs and outputs.

Not supported: `bias` and `mask` (a `ValueError` says so); use dense or memory-efficient attention for those.
Lengths the blocks do not divide are padded; padded keys are hidden and padded query rows cropped.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl

from labkit.attention import online_softmax
from labkit.attention._validate import check_qkv, default_scale
from labkit.attention.dense import LARGE_NEGATIVE

DEFAULT_BLOCK_Q = 64
DEFAULT_BLOCK_K = 64
MIN_COMPILED_TILE = 16  # Triton's matrix units need tiles of at least 16 along every axis


class Config(NamedTuple):
    """Everything static about one call (hashable: a `custom_vjp` non-differentiable argument)."""

    scale: float
    is_causal: bool
    block_q: int
    block_k: int
    kv_len: int      # the real number of keys; the arrays are padded to whole blocks
    kv_padded: int
    interpret: bool


def _visible(cfg: Config, q_block, k_block) -> jnp.ndarray:
    """`[block_q, block_k]` True where the query may see the key: a real key, and j <= i when causal."""
    q_pos = q_block * cfg.block_q + lax.broadcasted_iota(jnp.int32, (cfg.block_q, cfg.block_k), 0)
    k_pos = k_block * cfg.block_k + lax.broadcasted_iota(jnp.int32, (cfg.block_q, cfg.block_k), 1)
    keep = k_pos < cfg.kv_len
    return jnp.logical_and(keep, k_pos <= q_pos) if cfg.is_causal else keep


def _key_blocks_for(cfg: Config, q_block):
    """How many key blocks query block `q_block` visits: all of them, or up to the diagonal when causal."""
    n_k = cfg.kv_padded // cfg.block_k
    if not cfg.is_causal:
        return n_k
    last_query = (q_block + 1) * cfg.block_q - 1
    return jnp.minimum(last_query // cfg.block_k + 1, n_k)


def _first_query_block(cfg: Config, k_block):
    """The first query block that sees key block `k_block`: 0, or the one holding its first key when causal."""
    return (k_block * cfg.block_k) // cfg.block_q if cfg.is_causal else 0


def _dot(a, b, contract: tuple[int, int]) -> jnp.ndarray:
    """`a` and `b` contracted on axes `contract`, accumulated in float32 (a tile-sized matrix product)."""
    return lax.dot_general(a, b, (((contract[0],), (contract[1],)), ((), ())), preferred_element_type=jnp.float32)


def _scores(cfg: Config, q, k, q_block, k_block) -> jnp.ndarray:
    """Scaled scores of one `[block_q, block_k]` tile in float32, hidden entries `LARGE_NEGATIVE`."""
    s = _dot(q, k, (1, 1)) * cfg.scale
    if cfg.is_causal or cfg.kv_padded != cfg.kv_len:  # static: no mask arithmetic when nothing is hidden
        s = jnp.where(_visible(cfg, q_block, k_block), s, LARGE_NEGATIVE)
    return s


def _forward_kernel(q_ref, k_ref, v_ref, o_ref, lse_ref, *, cfg: Config):
    """One query block: loop over key blocks with the online softmax, write the output and lse once."""
    q_block, q = pl.program_id(1), q_ref[...]

    def body(k_block, state):
        keys = pl.ds(k_block * cfg.block_k, cfg.block_k)
        s = _scores(cfg, q, k_ref[keys, :], q_block, k_block)
        # The shared update lowers in Pallas as it is: elementwise ops, row reductions and one matrix product.
        return online_softmax.update(state, s, v_ref[keys, :])

    state = online_softmax.init_state((cfg.block_q,), v_ref.shape[-1])
    state = lax.fori_loop(0, _key_blocks_for(cfg, q_block), body, state)
    out, lse = online_softmax.finalize(state)
    o_ref[...] = out.astype(o_ref.dtype)
    lse_ref[...] = lse


def _forward(q, k, v, cfg: Config):
    """Padded `[BN, T, H]`, `[BN, S, H]`, `[BN, S, Hv]` -> `(out [BN, T, Hv], lse [BN, T] float32)`."""
    (bn, t, h), hv = q.shape, v.shape[-1]
    whole_kv = lambda dim: pl.BlockSpec((None, cfg.kv_padded, dim), lambda b, i: (b, 0, 0))  # noqa: E731
    return pl.pallas_call(
        functools.partial(_forward_kernel, cfg=cfg),
        grid=(bn, t // cfg.block_q),
        in_specs=[pl.BlockSpec((None, cfg.block_q, h), lambda b, i: (b, i, 0)), whole_kv(h), whole_kv(hv)],
        out_specs=[pl.BlockSpec((None, cfg.block_q, hv), lambda b, i: (b, i, 0)),
                   pl.BlockSpec((None, cfg.block_q), lambda b, i: (b, i))],
        out_shape=[jax.ShapeDtypeStruct((bn, t, hv), v.dtype), jax.ShapeDtypeStruct((bn, t), jnp.float32)],
        interpret=cfg.interpret,
        name="flash_forward",
    )(q, k, v)


def _dkdv_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, cfg: Config):
    """One key block: loop over the query blocks that see it, accumulate dK and dV from the stored lse."""
    k_block, k, v = pl.program_id(1), k_ref[...], v_ref[...]

    def body(q_block, carry):
        dk, dv = carry
        rows = pl.ds(q_block * cfg.block_q, cfg.block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        p = jnp.exp(_scores(cfg, q, k, q_block, k_block) - lse_ref[rows][:, None])  # exact probabilities
        ds = p * (_dot(do, v, (1, 1)) - delta_ref[rows][:, None])
        return dk + _dot(ds, q, (0, 0)) * cfg.scale, dv + _dot(p, do, (0, 0))

    zeros = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(_first_query_block(cfg, k_block), q_ref.shape[0] // cfg.block_q, body, zeros)
    dk_ref[...] = dk.astype(dk_ref.dtype)
    dv_ref[...] = dv.astype(dv_ref.dtype)


def _dq_kernel(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dq_ref, *, cfg: Config):
    """One query block: loop over the key blocks it sees, accumulate dQ from the stored lse."""
    q_block, q, do = pl.program_id(1), q_ref[...], do_ref[...]
    lse, delta = lse_ref[...][:, None], delta_ref[...][:, None]

    def body(k_block, dq):
        keys = pl.ds(k_block * cfg.block_k, cfg.block_k)
        k, v = k_ref[keys, :], v_ref[keys, :]
        p = jnp.exp(_scores(cfg, q, k, q_block, k_block) - lse)
        return dq + _dot(p * (_dot(do, v, (1, 1)) - delta), k, (1, 0)) * cfg.scale

    dq = lax.fori_loop(0, _key_blocks_for(cfg, q_block), body, jnp.zeros(q.shape, jnp.float32))
    dq_ref[...] = dq.astype(dq_ref.dtype)


def _backward_call(kernel, by_keys: bool, q, k, v, do, lse, delta, cfg: Config):
    """One backward `pallas_call`: programs over key blocks (`by_keys`, dK and dV) or query blocks (dQ)."""
    (bn, t, h), hv = q.shape, v.shape[-1]
    own, n = (cfg.block_k, cfg.kv_padded // cfg.block_k) if by_keys else (cfg.block_q, t // cfg.block_q)
    whole = lambda length, dim: pl.BlockSpec((None, length, dim), lambda b, i: (b, 0, 0))  # noqa: E731
    tile = lambda dim: pl.BlockSpec((None, own, dim), lambda b, i: (b, i, 0))  # noqa: E731
    rows = pl.BlockSpec((None, t), lambda b, i: (b, 0)) if by_keys else pl.BlockSpec((None, own), lambda b, i: (b, i))
    if by_keys:
        in_specs = [whole(t, h), tile(h), tile(hv), whole(t, hv), rows, rows]
        out_specs = [tile(h), tile(hv)]
        out_shape = [jax.ShapeDtypeStruct(k.shape, k.dtype), jax.ShapeDtypeStruct(v.shape, v.dtype)]
    else:
        in_specs = [tile(h), whole(cfg.kv_padded, h), whole(cfg.kv_padded, hv), tile(hv), rows, rows]
        out_specs, out_shape = tile(h), jax.ShapeDtypeStruct(q.shape, q.dtype)
    return pl.pallas_call(functools.partial(kernel, cfg=cfg), grid=(bn, n), in_specs=in_specs,
                          out_specs=out_specs, out_shape=out_shape, interpret=cfg.interpret,
                          name="flash_dkdv" if by_keys else "flash_dq")(q, k, v, do, lse, delta)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _flash(q, k, v, cfg: Config):
    """Padded `[BN, T, H]` inputs -> `[BN, T, Hv]`: the forward kernel, differentiated by the backward ones."""
    return _forward(q, k, v, cfg)[0]


def _flash_fwd(q, k, v, cfg: Config):
    out, lse = _forward(q, k, v, cfg)
    return out, (q, k, v, out, lse)  # the lse, not the [T, S] probabilities, is what the backward needs


def _flash_bwd(cfg: Config, residuals, d_out):
    q, k, v, out, lse = residuals
    # delta_i = sum_j p_ij dp_ij = dO_i . O_i: an O(T Hv) stand-in for the softmax's row sums.
    delta = jnp.sum(d_out.astype(jnp.float32) * out.astype(jnp.float32), axis=-1)
    dk, dv = _backward_call(_dkdv_kernel, True, q, k, v, d_out, lse, delta, cfg)
    dq = _backward_call(_dq_kernel, False, q, k, v, d_out, lse, delta, cfg)
    return dq, dk, dv


_flash.defvjp(_flash_fwd, _flash_bwd)


def _next_power_of_2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()


def _tile(requested: int, length: int, compiled: bool, name: str) -> int:
    """The block size used: `requested`, shrunk for short sequences (a power of 2, >= 16 when compiled)."""
    if not isinstance(requested, int) or isinstance(requested, bool) or requested < 1:
        raise ValueError(f"{name} must be a positive int, got {requested!r}")
    if compiled and (requested & (requested - 1) or requested < MIN_COMPILED_TILE):
        raise ValueError(f"{name}={requested}: compiled (GPU) kernels need a power of 2 >= {MIN_COMPILED_TILE}")
    shortest = max(MIN_COMPILED_TILE, _next_power_of_2(length)) if compiled else length
    return min(requested, shortest)


def _pad_to(x: jnp.ndarray, axis: int, size: int) -> jnp.ndarray:
    widths = [(0, 0)] * x.ndim
    widths[axis] = (0, size - x.shape[axis])
    return jnp.pad(x, widths) if size != x.shape[axis] else x


def _to_kernel_layout(x: jnp.ndarray, length: int, dim: int) -> jnp.ndarray:
    """`[batch..., L, N, D]` -> `[batch * N, length, dim]`, zero-padded (zeros change no product)."""
    x = jnp.moveaxis(x, -2, -3)
    x = x.reshape((-1,) + x.shape[-2:])
    return _pad_to(_pad_to(x, 1, length), 2, dim)


def _check_unsupported(bias, mask) -> None:
    for name, value in (("bias", bias), ("mask", mask)):
        if value is not None:
            raise ValueError(f"flash_attention does not support {name} (got an array of shape "
                             f"{jnp.shape(value)}); use labkit.attention.dense or memory_efficient_attention")


def _round_up(n: int, block: int) -> int:
    return -(-n // block) * block


def flash_attention(query, key, value, bias=None, mask=None, *, is_causal: bool = False,
                    scale: float | None = None, block_q: int = DEFAULT_BLOCK_Q, block_k: int = DEFAULT_BLOCK_K,
                    interpret: bool | None = None) -> jnp.ndarray:
    """Exact attention `[batch..., T, N, Hv]` by Pallas kernels (forward and backward), no `[T, S]` array.

    Args:
      query: `[batch..., T, N, H]`.
      key: `[batch..., S, N, H]`.
      value: `[batch..., S, N, Hv]`.
      bias, mask: not supported; anything but None raises ValueError.
      is_causal: hide keys j > i (query i and key i aligned at the start); blocks above the diagonal are skipped.
      scale: logit scale, default `1/sqrt(H)`.
      block_q, block_k: query/key rows per tile (shrunk for short sequences; lengths they do not divide are
        padded, padded keys hidden). Compiled kernels need powers of 2 >= 16.
      interpret: run the kernels in Pallas's interpreter; None: compiled on a GPU, interpreted elsewhere.

    Returns:
      `[batch..., T, N, Hv]` in `value`'s dtype; the softmax statistics are float32.
    """
    query, key, value = check_qkv(query, key, value)
    _check_unsupported(bias, mask)
    interpret = jax.default_backend() != "gpu" if interpret is None else bool(interpret)
    *batch, t, n, h = query.shape
    s, hv = key.shape[-3], value.shape[-1]
    bq, bk = _tile(block_q, t, not interpret, "block_q"), _tile(block_k, s, not interpret, "block_k")
    dim = (lambda d: max(MIN_COMPILED_TILE, _next_power_of_2(d))) if not interpret else (lambda d: d)
    cfg = Config(default_scale(scale, h), bool(is_causal), bq, bk, s, _round_up(s, bk), interpret)
    q = _to_kernel_layout(query, _round_up(t, bq), dim(h))
    k = _to_kernel_layout(key, cfg.kv_padded, dim(h))
    v = _to_kernel_layout(value, cfg.kv_padded, dim(hv))
    out = _flash(q, k, v, cfg)[:, :t, :hv]
    return jnp.moveaxis(out.reshape(*batch, n, t, hv), -3, -2).astype(value.dtype)


def memory_model(problem, options: dict) -> int:
    """Peak extra bytes of one call for a `labkit.attention.Problem`: kernel-layout copies, lse (and delta)."""
    rows = problem.batch * problem.heads * problem.seq_len * 4
    return 2 * problem.io_bytes + (1 + problem.backward) * rows
