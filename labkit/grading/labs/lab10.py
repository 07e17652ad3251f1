"""Lab 10 exercises: FlashAttention as Pallas kernels. Bytes moved by dense vs tiled attention, a first tiled
kernel, the forward kernel body (online softmax, log-sum-exp), the causal block skip, and the dK/dV kernel of
the backward pass. Registered in the order the notebook asks them.

Kernels run in Pallas's interpret mode (an emulator on CPU). Expected values come from float64 numpy dense
attention (fast: nothing to compile). A kernel returns nothing (it writes into its output refs), so each kernel
exercise registers a dense per-tile reference that returns its tiles, and, as its `fallback`, labkit's
blockwise solution kernel, which later notebook cells use through `labkit.use`; tests/test_flash.py runs both
as kernels against dense attention.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl

from labkit.attention import online_softmax
from labkit.grading.exercise import Case, Exercise, Mistake, hidden, register
from labkit.grading.inputs import normal as _normal

FLOAT_BYTES = 4
HIDDEN_SCORE = -1e30  # finite, so exp(HIDDEN - HIDDEN) is 1, not NaN
ANSWERED_BY_FLASH = ("labkit.attention.flash", "labkit.attention.flash_attention",
                     "jax.experimental.pallas.ops.gpu.attention")


# ---------------------------------------------------------------- 10.1 bytes moved

def hbm_bytes_reference(seq_len: int, head_dim: int, block_q: int) -> tuple[int, int]:
    """Main-memory bytes read + written by one head's forward pass, float32: `(dense, tiled)`.

    Dense: S = QK^T reads Q, K and writes S; the softmax reads S and writes P; O = PV reads P, V and writes O.
    Tiled: each query block reads its Q tile and all of K and V once, and writes its O tile and lse rows.
    """
    n, d = seq_len, head_dim
    dense = 4 * n * d + 4 * n * n
    blocks = -(-n // block_q)
    tiled = 2 * n * d + blocks * 2 * n * d + n
    return dense * FLOAT_BYTES, tiled * FLOAT_BYTES


def _hbm_with(seq_len, head_dim, block_q, *, kv_once=False, no_lse=False, scores_once=False):
    n, d = seq_len, head_dim
    dense = 4 * n * d + (2 if scores_once else 4) * n * n
    reads = 1 if kv_once else -(-n // block_q)
    tiled = 2 * n * d + reads * 2 * n * d + (0 if no_lse else n)
    return dense * FLOAT_BYTES, tiled * FLOAT_BYTES


def _bytes_case(name, n, d, bq):
    return Case(name, lambda: ((n, d, bq), {}), atol=0, rtol=0)


register(Exercise(
    id="lab10.hbm_bytes",
    description="bytes read and written by dense attention and by a tiled kernel, as a function of block size",
    points=2,
    reference=hbm_bytes_reference,
    cases=[
        _bytes_case("seq 256, dim 16, blocks of 64", 256, 16, 64),
        _bytes_case("seq 1024, dim 64, blocks of 128", 1024, 64, 128),
        _bytes_case("one block holds every query: seq 128, dim 32, blocks of 128", 128, 32, 128),
        _bytes_case("blocks that do not divide: seq 100, dim 8, blocks of 32", 100, 8, 32),
        _bytes_case("seq 16384, dim 128, blocks of 64 (big numbers: stay in Python ints)", 16384, 128, 64),
        hidden(_bytes_case("seq 300, dim 24, blocks of 7", 300, 24, 7)),
    ],
    mistakes=[
        Mistake("K and V read once", functools.partial(_hbm_with, kv_once=True),
                "the tiled count is too small: every query block walks all the keys and values, so K and V "
                "are read once per query block, not once in all"),
        Mistake("lse not written", functools.partial(_hbm_with, no_lse=True),
                "the kernel writes one more thing than the output: the log-sum-exp of every row, kept for the "
                "backward pass"),
        Mistake("score matrix counted once", functools.partial(_hbm_with, scores_once=True),
                "dense attention moves the T x T matrix four times: S is written, read by the softmax, P is "
                "written, and read again by the product with V"),
    ],
    default_hint="count floats per array and per pass, then multiply by 4 bytes: which arrays does each step "
                 "read from main memory, and which does it write back?",
    hints=(
        "dense: three steps, each reading its inputs and writing its output (S, then P, then O); tiled: "
        "ceil(seq_len / block_q) query blocks, each reading its Q rows, all of K and V, and writing its O rows "
        "and one lse value per row",
        "n, d = seq_len, head_dim\n"
        "dense = 4 * n * d + 4 * n * n\n"
        "tiled = 2 * n * d + -(-n // block_q) * 2 * n * d + n\n"
        "return dense * 4, tiled * 4",
    ),
))


# ---------------------------------------------------------------- 10.2 a first kernel: tiled add

def _add_kernel(x_ref, y_ref, o_ref):
    o_ref[...] = x_ref[...] + y_ref[...]


def _tiled_add_with(x, y, block_rows, *, offset_index=False, one_block=False):
    rows = x.shape[0] if one_block else block_rows
    index = (lambda i: (i * rows, 0)) if offset_index else (lambda i: (i, 0))
    spec = pl.BlockSpec((rows, x.shape[1]), index)
    return pl.pallas_call(_add_kernel, grid=(x.shape[0] // rows,), in_specs=[spec, spec], out_specs=spec,
                          out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype), interpret=True)(x, y)


def tiled_add_reference(x, y, block_rows):
    """`x + y` for `[M, D]` arrays, by a Pallas kernel with one program per `block_rows` rows."""
    return _tiled_add_with(x, y, block_rows)


def programs_in(fn, *args) -> int:
    """How many program instances the `pallas_call`s traced by `fn(*args)` launch (0 when there are none)."""
    jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
    return sum(int(np.prod(e.params["grid_mapping"].grid)) for e in jaxpr.eqns if e.primitive.name == "pallas_call")


def run_tiled_add(candidate, args, kwargs):
    """`(candidate's output, programs it launches)`: the values and the grid are both graded."""
    x, y, block_rows = args
    fn = lambda x, y: candidate(x, y, block_rows)  # noqa: E731
    return np.asarray(jax.jit(fn)(x, y)), programs_in(fn, x, y)


def _add_case(name, seed, m, d, block_rows):
    def inputs():
        return (jnp.asarray(_normal(seed, m, d)), jnp.asarray(_normal(seed + 1, m, d)), block_rows), {}
    return Case(name, inputs)


register(Exercise(
    id="lab10.tiled_add",
    description="a first Pallas kernel: x + y in row blocks, one program instance per block (interpret mode)",
    points=2,
    reference=tiled_add_reference,
    run=run_tiled_add,
    cases=[
        _add_case("8 x 4 in blocks of 2 rows: 4 programs", 0, 8, 4, 2),
        _add_case("16 x 8 in blocks of 4 rows", 10, 16, 8, 4),
        _add_case("one block of 6 rows: 1 program", 20, 6, 3, 6),
        _add_case("12 x 5 in blocks of 3 rows", 30, 12, 5, 3),
        _add_case("blocks of 1 row: 7 programs", 40, 7, 2, 1),
        hidden(_add_case("20 x 16 in blocks of 5 rows", 50, 20, 16, 5)),
    ],
    mistakes=[
        Mistake("index map returns row offsets", functools.partial(_tiled_add_with, offset_index=True),
                "the index map returns a block's position counted in blocks, not in rows: Pallas multiplies "
                "by the block shape itself (rows that no program wrote hold NaN in interpret mode)"),
        Mistake("one program for everything", functools.partial(_tiled_add_with, one_block=True),
                "the values are right but one program does all the work: the grid should launch one program "
                "per block of rows, each owning only its block"),
        Mistake("not a Pallas kernel", lambda x, y, block_rows: x + y,
                "the values are right but no pallas_call runs: write the addition as a kernel on refs and "
                "launch it with pl.pallas_call"),
    ],
    default_hint="the output second in the report is how many programs ran: one per block of block_rows rows, "
                 "each reading and writing only its own block",
    hints=(
        "the kernel gets refs (x_ref, y_ref, o_ref) already cut to one block: read them with [...] and write "
        "the sum into o_ref[...]; pl.pallas_call takes the kernel, grid=(number of blocks,), one BlockSpec per "
        "input and for the output (block shape, index map from the program id to a block index), out_shape, "
        "and interpret=True",
        "def kernel(x_ref, y_ref, o_ref):\n"
        "    o_ref[...] = x_ref[...] + y_ref[...]\n"
        "spec = pl.BlockSpec((block_rows, x.shape[1]), lambda i: (i, 0))\n"
        "return pl.pallas_call(kernel, grid=(x.shape[0] // block_rows,), in_specs=[spec, spec],\n"
        "                      out_specs=spec, out_shape=jax.ShapeDtypeStruct(x.shape, x.dtype),\n"
        "                      interpret=True)(x, y)",
    ),
))


# ---------------------------------------------------------------- the forward kernel's harness and references

def forward_with_kernel(kernel, q, k, v, block_q: int, block_k: int):
    """One head: `q [T, H]`, `k [S, H]`, `v [S, Hv]` -> `(out [T, Hv], lse [T])`, `kernel` per query block.

    The kernel gets `(q_ref [block_q, H], k_ref [S, H], v_ref [S, Hv], o_ref [block_q, Hv], lse_ref [block_q])`
    and the keywords `block_k` and `scale`; the blocks must divide the lengths.
    """
    (t, h), (s, hv) = q.shape, v.shape
    whole = lambda dim: pl.BlockSpec((s, dim), lambda i: (0, 0))  # noqa: E731
    return pl.pallas_call(
        functools.partial(kernel, block_k=block_k, scale=1.0 / float(np.sqrt(h))), grid=(t // block_q,),
        in_specs=[pl.BlockSpec((block_q, h), lambda i: (i, 0)), whole(h), whole(hv)],
        out_specs=[pl.BlockSpec((block_q, hv), lambda i: (i, 0)), pl.BlockSpec((block_q,), lambda i: (i,))],
        out_shape=[jax.ShapeDtypeStruct((t, hv), jnp.float32), jax.ShapeDtypeStruct((t,), jnp.float32)],
        interpret=True)(q, k, v)


def dense_np(q, k, v, *, causal=False) -> tuple[np.ndarray, np.ndarray]:
    """Float64 numpy dense attention of one head: `(out [T, Hv], lse [T])`, as float32."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    if causal:  # keys after the last query are seen by no one (and may hold NaN in the cases)
        k, v = k[:q.shape[0]], v[:q.shape[0]]
    s = q @ k.T / np.sqrt(q.shape[-1])
    if causal:
        s = np.where(np.tril(np.ones(s.shape, bool)), s, -np.inf)
    m = s.max(-1, keepdims=True)
    w = np.exp(s - m)
    lse = m[:, 0] + np.log(w.sum(-1))
    return (w / w.sum(-1, keepdims=True) @ v).astype(np.float32), lse.astype(np.float32)


def _forward_body(q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_k, scale, causal=False, rescale=True,
                  store_max=False, blocks_short=0, visit_all=False, skip_diagonal=False, mask_diagonal=True, write=True):
    """labkit's forward kernel body for the exercises (causal or not), or one with a step done wrong."""
    block_q, i = q_ref.shape[0], pl.program_id(0)
    q = q_ref[...] * scale
    rows = i * block_q + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)

    def body(j, state):
        keys = pl.ds(j * block_k, block_k)
        s = q @ k_ref[keys, :].T
        if causal and mask_diagonal:
            s = jnp.where(j * block_k + lax.broadcasted_iota(jnp.int32, s.shape, 1) <= rows, s, HIDDEN_SCORE)
        new = online_softmax.update(state, s, v_ref[keys, :])
        if rescale:
            return new
        p = jnp.exp(s - new.m[:, None])  # the new block's terms, added to sums left at the old maximum
        return online_softmax.SoftmaxState(state.acc + p @ v_ref[keys, :], new.m, state.l + p.sum(-1))

    n_k = k_ref.shape[0] // block_k
    if causal and not visit_all:
        last = (i + 1) * block_q - 1 - (block_k if skip_diagonal else 0)
        n_k = jnp.minimum(last // block_k + 1, n_k)
    init = online_softmax.init_state((block_q,), v_ref.shape[-1])
    state = lax.fori_loop(0, n_k - blocks_short, body, init)
    out, lse = online_softmax.finalize(state)
    if write:
        o_ref[...] = out
        lse_ref[...] = state.m if store_max else lse


def forward_kernel_solution(q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_k, scale):
    """The forward kernel body (not causal): online softmax over key blocks, output and lse written once."""
    _forward_body(q_ref, k_ref, v_ref, o_ref, lse_ref, block_k=block_k, scale=scale)


def causal_kernel_solution(q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_k, scale):
    """The causal forward kernel body: key blocks above the diagonal never visited, the diagonal ones masked."""
    _forward_body(q_ref, k_ref, v_ref, o_ref, lse_ref, block_k=block_k, scale=scale, causal=True)


def _tile_softmax(q_ref, k_ref, v_ref, scale, causal):
    """Dense softmax of this program's query tile against every key: `(out, lse)` tiles."""
    s = q_ref[...] @ k_ref[...].T * scale
    if causal:
        rows = pl.program_id(0) * q_ref.shape[0] + lax.broadcasted_iota(jnp.int32, s.shape, 0)
        s = jnp.where(lax.broadcasted_iota(jnp.int32, s.shape, 1) <= rows, s, HIDDEN_SCORE)
    lse = jax.nn.logsumexp(s, axis=-1)
    return jnp.exp(s - lse[:, None]) @ v_ref[...], lse


# The exercises' references: a dense softmax per query tile that returns its tiles instead of writing them
# (`tiles_writer` writes them). The grader takes their values from float64 numpy dense attention (no compiling),
# and tests/test_flash.py runs them as kernels against dense attention.
def forward_tiles_reference(q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_k, scale):
    """Reference for 10.3: `(out [block_q, Hv], lse [block_q])` of this query tile by a dense softmax."""
    return _tile_softmax(q_ref, k_ref, v_ref, scale, causal=False)


def causal_tiles_reference(q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_k, scale):
    """Reference for 10.4: the causal `(out, lse)` tiles by a dense softmax."""
    return _tile_softmax(q_ref, k_ref, v_ref, scale, causal=True)


def tiles_writer(reference):
    """A kernel that writes what `reference(*refs)` returns into the output refs (the last ones, in order)."""
    def kernel(*refs, **options):
        tiles = reference(*refs, **options)
        for ref, tile in zip(refs[len(refs) - len(tiles):], tiles):
            ref[...] = tile.astype(ref.dtype)
    return kernel


_FORWARD_REFERENCES = {forward_tiles_reference: False, causal_tiles_reference: True}


def run_forward_kernel(candidate, args, kwargs):
    """`(out, lse)` of the candidate kernel body run by `forward_with_kernel` (numpy dense for the reference)."""
    q, k, v, block_q, block_k = args
    if candidate in _FORWARD_REFERENCES:
        return dense_np(q, k, v, causal=_FORWARD_REFERENCES[candidate])
    run = jax.jit(forward_with_kernel, static_argnums=(0, 4, 5))
    return tuple(np.asarray(a) for a in run(candidate, jnp.asarray(q), jnp.asarray(k), jnp.asarray(v),
                                            block_q, block_k))


def _forward_case(name, seed, t, s, h, block_q, block_k, *, hv=None, logit_scale=1.0, nan_after=None):
    def inputs():
        q = _normal(seed, t, h, scale=logit_scale) + 0.3
        # Scores rise along the keys, so the running maximum moves from block to block: a missing rescale shows.
        k = _normal(seed + 1, s, h, scale=logit_scale) + np.linspace(0, 2, s, dtype=np.float32)[:, None]
        v = _normal(seed + 2, s, hv or h)
        if nan_after is not None:
            v[nan_after:] = np.nan  # keys no query may see: a kernel that visits their blocks returns NaN
        return (q, k, v, block_q, block_k), {}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


# ---------------------------------------------------------------- 10.3 the forward kernel body

register(Exercise(
    id="lab10.forward_kernel",
    description="the forward kernel body: a loop over key blocks with the online softmax, output and lse",
    points=3,
    reference=forward_tiles_reference,
    fallback=lambda: forward_kernel_solution,
    run=run_forward_kernel,
    cases=[
        _forward_case("16 queries in blocks of 8, 16 keys in blocks of 8, dim 4", 0, 16, 16, 4, 8, 8),
        hidden(_forward_case("one key block: 8 queries, 8 keys", 10, 8, 8, 4, 8, 8)),
        _forward_case("32 queries, 16 keys in blocks of 4, value dim 6", 20, 32, 16, 4, 16, 4, hv=6),
        _forward_case("8 queries, 24 keys in blocks of 8, dim 8", 30, 8, 24, 8, 4, 8),
        _forward_case("large logits: scores up to ~1e4", 40, 16, 32, 8, 8, 8, logit_scale=30.0),
        hidden(_forward_case("24 queries in blocks of 8, 40 keys in blocks of 8, dim 3, value dim 5", 50, 24, 40,
                             3, 8, 8, hv=5)),
    ],
    mistakes=[
        Mistake("accumulator not rescaled", functools.partial(_forward_body, rescale=False),
                "when a key block raises a row's running maximum, the weighted sum and the normaliser built so "
                "far were exponentiated against the old maximum: both must be brought to the new one"),
        Mistake("max stored instead of lse", functools.partial(_forward_body, store_max=True),
                "the output is right, the second output is not: the backward pass needs log(sum_j exp(s_j)) of "
                "each row, which is the running maximum plus the log of the normaliser, not the maximum alone"),
        Mistake("outputs never written", functools.partial(_forward_body,  write=False),
                "NaN everywhere: in interpret mode an output nobody wrote holds NaN; a kernel returns nothing, "
                "it stores its results into the output refs (both of them)"),
        Mistake("last key block missed", functools.partial(_forward_body, blocks_short=1),
                "the last keys get no weight: the loop over key blocks must run S / block_k times, one per "
                "block, the last one included"),
    ],
    default_hint="the kernel sees one block of queries: walk every key block, keep a running maximum, normaliser "
                 "and weighted sum per row, and write both outputs once at the end",
    hints=(
        "read the query tile with q_ref[...]; lax.fori_loop(lower, upper, body, carry) walks the key blocks and "
        "pl.ds(start, size) selects the rows of block j from k_ref and v_ref; the carry is the online softmax's "
        "state (your own three arrays, or online_softmax.init_state and update); finalize gives out and lse",
        "q = q_ref[...] * scale\n"
        "def body(j, state):\n"
        "    keys = pl.ds(j * block_k, block_k)\n"
        "    return online_softmax.update(state, q @ k_ref[keys, :].T, v_ref[keys, :])\n"
        "init = online_softmax.init_state((q.shape[0],), v_ref.shape[-1])\n"
        "state = lax.fori_loop(0, k_ref.shape[0] // block_k, body, init)\n"
        "o_ref[...], lse_ref[...] = online_softmax.finalize(state)",
    ),
    answered_by=ANSWERED_BY_FLASH,
))


# ---------------------------------------------------------------- 10.4 causal: skip blocks above the diagonal

register(Exercise(
    id="lab10.causal_kernel",
    description="the causal forward kernel: blocks above the diagonal never visited, diagonal blocks masked",
    points=3,
    reference=causal_tiles_reference,
    fallback=lambda: causal_kernel_solution,
    run=run_forward_kernel,
    cases=[
        _forward_case("16 queries, 16 keys, blocks of 8 x 8", 0, 16, 16, 4, 8, 8),
        _forward_case("blocks of 4 queries x 8 keys", 10, 16, 16, 4, 4, 8),
        _forward_case("blocks of 8 queries x 4 keys", 20, 16, 16, 4, 8, 4, hv=6),
        _forward_case("16 queries, 32 keys: keys 16.. hold NaN values and must never be visited", 30, 16, 32, 4,
                      8, 8, nan_after=16),
        hidden(_forward_case("one block of each: 8 x 8", 40, 8, 8, 8, 8, 8)),
        hidden(_forward_case("24 queries in blocks of 8, 40 keys in blocks of 4, NaN from key 24", 50, 24, 40, 3,
                             8, 4, hv=5, nan_after=24)),
    ],
    mistakes=[
        Mistake("every block visited", functools.partial(_forward_body, causal=True, visit_all=True),
                "NaN comes from key blocks above the diagonal: masking their scores is not enough (a zero weight "
                "times NaN is NaN, and the work is wasted); stop the loop after the last block this query block "
                "can see"),
        Mistake("diagonal block skipped", functools.partial(_forward_body, causal=True, skip_diagonal=True),
                "a block index off by one: the key block that holds the block's own positions (the diagonal) "
                "must be visited too, with the mask"),
        Mistake("outputs never written", functools.partial(_forward_body, causal=True, write=False),
                "NaN everywhere: in interpret mode an output nobody wrote holds NaN; a kernel returns nothing, "
                "it stores its results into the output refs (both of them)"),
        Mistake("no mask on the diagonal", functools.partial(_forward_body, causal=True, mask_diagonal=False),
                "queries see later keys inside the diagonal block: the blocks that are visited still need j <= i "
                "applied to their scores"),
    ],
    default_hint="two things make the kernel causal: how many key blocks the loop visits (depends on the program "
                 "id), and which scores inside a visited block are hidden",
    hints=(
        "query block i covers rows i*block_q .. (i+1)*block_q - 1; key block j is needed while its first key "
        "j*block_k is not after the last row; inside a block compare global positions (broadcasted iota or "
        "jnp.arange plus the block's start) and hide with jnp.where before the update",
        "i, block_q = pl.program_id(0), q_ref.shape[0]\n"
        "q = q_ref[...] * scale\n"
        "rows = i * block_q + jnp.arange(block_q)[:, None]\n"
        "def body(j, state):\n"
        "    keys = pl.ds(j * block_k, block_k)\n"
        "    cols = j * block_k + jnp.arange(block_k)[None, :]\n"
        "    s = jnp.where(cols <= rows, q @ k_ref[keys, :].T, -1e30)\n"
        "    return online_softmax.update(state, s, v_ref[keys, :])\n"
        "n = jnp.minimum(((i + 1) * block_q - 1) // block_k + 1, k_ref.shape[0] // block_k)\n"
        "state = lax.fori_loop(0, n, body, online_softmax.init_state((block_q,), v_ref.shape[-1]))\n"
        "o_ref[...], lse_ref[...] = online_softmax.finalize(state)",
    ),
    answered_by=ANSWERED_BY_FLASH,
))


# ---------------------------------------------------------------- 10.5 the backward: dK and dV from the lse

def dkdv_with_kernel(kernel, q, k, v, d_out, lse, delta, block_q: int, block_k: int):
    """One head: `(dk [S, H], dv [S, Hv])` by `kernel`, one program per key block.

    The kernel gets `(q_ref [T, H], k_ref [block_k, H], v_ref [block_k, Hv], do_ref [T, Hv], lse_ref [T],
    delta_ref [T], dk_ref [block_k, H], dv_ref [block_k, Hv])` and the keywords `block_q` and `scale`.
    """
    (t, h), (s, hv) = q.shape, v.shape
    whole = lambda *shape: pl.BlockSpec(shape, lambda j: (0,) * len(shape))  # noqa: E731
    tile = lambda dim: pl.BlockSpec((block_k, dim), lambda j: (j, 0))  # noqa: E731
    return pl.pallas_call(
        functools.partial(kernel, block_q=block_q, scale=1.0 / float(np.sqrt(h))), grid=(s // block_k,),
        in_specs=[whole(t, h), tile(h), tile(hv), whole(t, hv), whole(t), whole(t)],
        out_specs=[tile(h), tile(hv)],
        out_shape=[jax.ShapeDtypeStruct((s, h), jnp.float32), jax.ShapeDtypeStruct((s, hv), jnp.float32)],
        interpret=True)(q, k, v, d_out, lse, delta)


def _dkdv_body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, block_q, scale,
               use_delta=True, scale_dk=True, dv_from_ds=False, write=True):
    """labkit's dK/dV kernel body for one key block, or one with a step done wrong."""
    k, v = k_ref[...], v_ref[...]

    def body(i, carry):
        dk, dv = carry
        rows = pl.ds(i * block_q, block_q)
        q, do = q_ref[rows, :], do_ref[rows, :]
        p = jnp.exp(q @ k.T * scale - lse_ref[rows][:, None])  # the probabilities, recomputed from the lse
        dp = do @ v.T
        ds = p * (dp - delta_ref[rows][:, None]) if use_delta else p * dp
        return dk + ds.T @ q * (scale if scale_dk else 1.0), dv + (ds if dv_from_ds else p).T @ do

    init = (jnp.zeros(k.shape, jnp.float32), jnp.zeros(v.shape, jnp.float32))
    dk, dv = lax.fori_loop(0, q_ref.shape[0] // block_q, body, init)
    if write:
        dk_ref[...] = dk
        dv_ref[...] = dv


def dkdv_kernel_solution(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, block_q, scale):
    """dK and dV of one key block, accumulated over the query blocks from the stored lse and delta."""
    _dkdv_body(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, block_q=block_q, scale=scale)


def dkdv_tiles_reference(q_ref, k_ref, v_ref, do_ref, lse_ref, delta_ref, dk_ref, dv_ref, *, block_q, scale):
    """Reference for 10.5: `(dk, dv)` tiles of this key block against all queries at once (returned, not written)."""
    q, do = q_ref[...], do_ref[...]
    p = jnp.exp(q @ k_ref[...].T * scale - lse_ref[...][:, None])
    ds = p * (do @ v_ref[...].T - delta_ref[...][:, None])
    return ds.T @ q * scale, p.T @ do


def grads_np(q, k, v, d_out) -> tuple[np.ndarray, np.ndarray]:
    """`(dk, dv)` of `sum(attention(q, k, v) * d_out)` for one head, float64 numpy, as float32."""
    q, k, v, d_out = (np.asarray(a, np.float64) for a in (q, k, v, d_out))
    scale = 1 / np.sqrt(q.shape[-1])
    s = q @ k.T * scale
    p = np.exp(s - s.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dp = d_out @ v.T
    ds = p * (dp - (dp * p).sum(-1, keepdims=True))
    return (ds.T @ q * scale).astype(np.float32), (p.T @ d_out).astype(np.float32)


def run_dkdv_kernel(candidate, args, kwargs):
    """`(dk, dv)` from the candidate kernel, given lse and delta from dense numpy (numpy grads for the reference)."""
    q, k, v, d_out, block_q, block_k = args
    if candidate is dkdv_tiles_reference:
        return grads_np(q, k, v, d_out)
    out, lse = dense_np(q, k, v)
    delta = np.sum(out * d_out, axis=-1)
    run = jax.jit(dkdv_with_kernel, static_argnums=(0, 7, 8))
    return tuple(np.asarray(a) for a in run(candidate, *(jnp.asarray(a) for a in (q, k, v, d_out, lse, delta)),
                                            block_q, block_k))


def _dkdv_case(name, seed, t, s, h, block_q, block_k, *, hv=None, logit_scale=1.0):
    def inputs():
        q = _normal(seed, t, h, scale=logit_scale)
        k = _normal(seed + 1, s, h, scale=logit_scale)
        return (q, k, _normal(seed + 2, s, hv or h), _normal(seed + 3, t, hv or h), block_q, block_k), {}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


register(Exercise(
    id="lab10.dkdv_kernel",
    description="the backward kernel for dK and dV: probabilities recomputed from the lse, one key block each",
    points=3,
    reference=dkdv_tiles_reference,
    fallback=lambda: dkdv_kernel_solution,
    run=run_dkdv_kernel,
    cases=[
        _dkdv_case("16 queries in blocks of 8, 16 keys in blocks of 8, dim 4", 0, 16, 16, 4, 8, 8),
        _dkdv_case("one query block: 8 queries, 16 keys in blocks of 4", 10, 8, 16, 4, 8, 4),
        _dkdv_case("32 queries in blocks of 4, 8 keys, value dim 6", 20, 32, 8, 4, 4, 8, hv=6),
        _dkdv_case("24 queries, 24 keys, dim 8, blocks of 8", 30, 24, 24, 8, 8, 8),
        hidden(_dkdv_case("large logits: scores up to ~100", 40, 16, 16, 8, 8, 8, logit_scale=3.0)),
        hidden(_dkdv_case("20 queries in blocks of 5, 12 keys in blocks of 4, dim 3, value dim 5", 50, 20, 12, 3,
                          5, 4, hv=5)),
    ],
    mistakes=[
        Mistake("delta left out", functools.partial(_dkdv_body, use_delta=False),
                "dV is right and dK is not: the softmax's gradient subtracts, from each row of dP, that row's "
                "weighted mean (delta, given to the kernel) before multiplying by P"),
        Mistake("dK not scaled", functools.partial(_dkdv_body, scale_dk=False),
                "dK is off by a constant factor: the scores were q . k times the scale, so the chain rule "
                "brings the scale into dK as well"),
        Mistake("outputs never written", functools.partial(_dkdv_body, write=False),
                "NaN everywhere: in interpret mode an output nobody wrote holds NaN; a kernel returns nothing, "
                "it stores its results into dk_ref and dv_ref"),
        Mistake("dV from dS", functools.partial(_dkdv_body, dv_from_ds=True),
                "dV is wrong: the values are weighted by the probabilities P in the forward pass, so dV "
                "accumulates P transposed times dO, not the score gradient"),
    ],
    default_hint="this program owns one key block: loop over the query blocks, recompute that tile's "
                 "probabilities from the stored lse, and accumulate both gradients of the block",
    hints=(
        "per query block: the tile's probabilities are exp(scaled scores - lse of each row); the gradient of "
        "the probabilities is dO times V transposed; the score gradient is P times (that minus delta of each "
        "row); dV adds P transposed times dO and dK adds the score gradient transposed times Q, times the scale",
        "k, v = k_ref[...], v_ref[...]\n"
        "def body(i, carry):\n"
        "    dk, dv = carry\n"
        "    rows = pl.ds(i * block_q, block_q)\n"
        "    q, do = q_ref[rows, :], do_ref[rows, :]\n"
        "    p = jnp.exp(q @ k.T * scale - lse_ref[rows][:, None])\n"
        "    ds = p * (do @ v.T - delta_ref[rows][:, None])\n"
        "    return dk + ds.T @ q * scale, dv + p.T @ do\n"
        "init = (jnp.zeros(k.shape), jnp.zeros(v.shape))\n"
        "dk, dv = lax.fori_loop(0, q_ref.shape[0] // block_q, body, init)\n"
        "dk_ref[...] = dk\n"
        "dv_ref[...] = dv",
    ),
    answered_by=ANSWERED_BY_FLASH,
))
