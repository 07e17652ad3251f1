"""Ring attention: exact attention over a sequence sharded across devices, key/value blocks passed round a ring.

Liu, Zaharia & Abbeel 2023, "Ring Attention with Blockwise Transformers for Near-Infinite Context"
(arXiv:2310.01889). Each of P devices keeps its `T/P` queries; the key/value blocks travel round the ring
(`lax.ppermute` to the next device, P - 1 times), and every device folds each block it receives into its
queries' running softmax statistics: the online-softmax update of `labkit.attention.online_softmax`, the same
one memory-efficient attention uses. After P steps every query has seen every key, and the result is exactly
dense attention's, up to float rounding.

Causal attention with contiguous shards is unbalanced: device d needs the blocks of devices 0..d only, so the
last device computes P blocks while the first computes one (and the ring waits for the slowest). The zigzag
layout (Brandon et al. 2023 "Striped Attention" discuss the balance problem; zigzag is the layout of
context-parallel training codes) cuts the sequence into 2P chunks and gives device d chunks d and 2P-1-d, so
every device holds one early and one late chunk and does the same work. Blocks above the diagonal are not
computed (`lax.switch` runs nothing for them), and `return_work=True` counts the chunk-pair tiles each device
really computed.

Cost per device: O(T^2 H / P) time (half of it when causal and balanced); memory O(T H / P) for its queries,
keys, values, output and running statistics, plus one `[T/(cP), T/(cP)]` block of scores per head at a time
(c = 1 contiguous, 2 zigzag). Communication: P - 1 sends of one key and one value block per device.

Gradients come from autodiff through `ppermute` (its transpose is the reverse rotation); each step is
`jax.checkpoint`ed, so the backward pass recomputes the score blocks instead of storing them, but it keeps the
key/value block each step received (O(T H) per device, not O(T H / P); a custom VJP that rotates dK and dV
round the ring as well would bring that down, and is not done here).

Use `ring_attention` inside `jax.shard_map` (or `jax.vmap(..., axis_name=...)`, which runs the same ring on one
device) on local shards; `sharded_ring_attention` takes global arrays and a mesh and does the sharding,
the zigzag reordering and the padding of lengths P does not divide.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import PartitionSpec

from labkit.attention._validate import check_qkv, default_scale
from labkit.attention.dense import LARGE_NEGATIVE
from labkit.attention.online_softmax import SoftmaxState, finalize, init_state, update

LAYOUTS = ("contiguous", "zigzag")
DEFAULT_AXIS = "sp"
# Branches of the per-tile switch.
_SKIP, _FULL, _MASKED = 0, 1, 2


def chunks_per_device(layout: str) -> int:
    """How many sequence chunks one device holds: 1 (contiguous) or 2 (zigzag)."""
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    return 1 if layout == "contiguous" else 2


def device_chunks(device, n_devices: int, layout: str):
    """The global chunk numbers device `device` holds, in order: `(d,)` or `(d, 2P-1-d)` (ints or traced)."""
    if chunks_per_device(layout) == 1:
        return (device,)
    return (device, 2 * n_devices - 1 - device)


def layout_order(seq_len: int, n_devices: int, layout: str) -> np.ndarray:
    """Positions `[seq_len]` in the order the devices hold them: contiguous shards of it give `layout`."""
    c = chunks_per_device(layout)
    if seq_len % (c * n_devices):
        raise ValueError(f"seq_len {seq_len} must be a multiple of {c * n_devices} for the {layout} layout "
                         f"on {n_devices} devices (sharded_ring_attention pads for you)")
    chunk = seq_len // (c * n_devices)
    ids = [i for d in range(n_devices) for i in device_chunks(d, n_devices, layout)]
    return np.concatenate([np.arange(i * chunk, (i + 1) * chunk) for i in ids])


def tile_kinds(n_devices: int, layout: str, is_causal: bool = True) -> np.ndarray:
    """`[P, steps, c, c]` kind of every (query chunk, key chunk) tile: 0 skipped, 1 full, 2 masked (diagonal).

    Step s on device d holds the keys of device (d - s) mod P (the ring sends to the next device).
    """
    c = chunks_per_device(layout)
    kinds = np.zeros((n_devices, n_devices, c, c), np.int64)
    for d in range(n_devices):
        for s in range(n_devices):
            src = (d - s) % n_devices
            for a, qi in enumerate(device_chunks(d, n_devices, layout)):
                for b, ki in enumerate(device_chunks(src, n_devices, layout)):
                    kinds[d, s, a, b] = _FULL if not is_causal or ki < qi else _MASKED if ki == qi else _SKIP
    return kinds


def work_per_device(n_devices: int, layout: str, is_causal: bool = True) -> np.ndarray:
    """`[P]` score tiles each device computes, in units of one `[T/P, T/P]` block (a zigzag tile is 1/4)."""
    c = chunks_per_device(layout)
    return (tile_kinds(n_devices, layout, is_causal) != _SKIP).sum(axis=(1, 2, 3)) / c ** 2


def _varying(x: jnp.ndarray, axis_name: str) -> jnp.ndarray:
    """`x` as a per-device value: shard_map's type check wants the loop's initial carry to vary over the axis.

    Adding a zero computed from the device's index does it under shard_map and vmap alike (`lax.pcast` exists
    only under shard_map).
    """
    return x + (lax.axis_index(axis_name) * 0).astype(x.dtype)


def _heads_first(x: jnp.ndarray, c: int) -> jnp.ndarray:
    """`[B, t, N, H]` -> `[B, N, c, t/c, H]` float32: the online softmax wants rows before keys."""
    b, t, n, h = x.shape
    return jnp.swapaxes(x.astype(jnp.float32), 1, 2).reshape(b, n, c, t // c, h)


def _tile(state: SoftmaxState, q, k, v, q_chunk, k_chunk, *, is_causal: bool, seq_len: int | None,
          padded: bool, work):
    """Fold one key chunk `k, v [B, N, L, H]` into one query chunk's state, skipping tiles above the diagonal."""
    length = q.shape[-2]

    def scores():
        return jnp.einsum("bnqh,bnkh->bnqk", q, k, preferred_element_type=jnp.float32)

    def full(carry):
        return update(carry[0], scores(), v), carry[1] + 1

    def masked(carry):
        q_pos = q_chunk * length + jnp.arange(length)[:, None]  # global positions, not positions in the chunk
        k_pos = k_chunk * length + jnp.arange(length)[None, :]
        keep = k_pos <= q_pos if is_causal else jnp.ones((length, length), bool)
        if padded:
            keep = keep & (k_pos < seq_len)
        return update(carry[0], jnp.where(keep, scores(), LARGE_NEGATIVE), v), carry[1] + 1

    needs_mask = (k_chunk == q_chunk) if is_causal else False
    if padded:
        needs_mask = jnp.logical_or(needs_mask, (k_chunk + 1) * length > seq_len)
    kind = jnp.where(needs_mask, _MASKED, _FULL)
    if is_causal:
        kind = jnp.where(k_chunk > q_chunk, _SKIP, kind)
    # The count is kept inside the branches: a skipped tile runs neither the scores nor the count.
    return lax.switch(kind, [lambda carry: carry, full, masked], (state, work))


def _ring_step(states, work, q, k, v, q_ids, k_ids, **options):
    """One ring step: every (query chunk, key chunk) tile of this device's queries and the keys it holds."""
    states = list(states)
    for a in range(q.shape[2]):
        for b in range(k.shape[2]):
            states[a], work = _tile(states[a], q[:, :, a], k[:, :, b], v[:, :, b], q_ids[a], k_ids[b],
                                    work=work, **options)
    return tuple(states), work


def ring_attention(query, key, value, *, axis_name: str, is_causal: bool = False, scale: float | None = None,
                   layout: str = "contiguous", seq_len: int | None = None, return_work: bool = False):
    """Ring attention on this device's shards `[batch, T/P, N, H]` -> `[batch, T/P, N, Hv]`, inside shard_map.

    Args:
      query, key, value: this device's shards (the same positions for all three), laid out by `layout`.
      axis_name: the mesh axis (or vmap axis) the sequence is sharded over; its size P is the ring's.
      is_causal: hide keys at later global positions; tiles entirely above the diagonal are not computed.
      scale: logit scale, default `1/sqrt(H)`.
      layout: "contiguous" (device d holds positions d*T/P..) or "zigzag" (chunks d and 2P-1-d of 2P).
      seq_len: the real global length when the shards hold padding at the end: keys from there on are hidden.
      return_work: also return the score tiles this device computed, counted as the code runs them, in units
        of one `[T/P, T/P]` block (a zigzag tile is a quarter of one): a float32 scalar.
    """
    c = chunks_per_device(layout)
    local, heads, v_dim = query.shape[1], query.shape[2], value.shape[-1]
    if query.ndim != 4 or local % c:
        raise ValueError(f"ring_attention takes local shards [batch, T/P, N, H] whose length is a multiple of "
                         f"{c} for the {layout} layout; got query {query.shape}")
    n = lax.psum(1, axis_name)  # the ring's size, a Python int
    me = lax.axis_index(axis_name)
    padded = seq_len is not None and seq_len < n * local
    q = _heads_first(query * default_scale(scale, query.shape[-1]), c)
    k, v = _heads_first(key, c), _heads_first(value, c)
    q_ids = device_chunks(me, n, layout)
    rows = (query.shape[0], heads, local // c)
    states = tuple(SoftmaxState(*(_varying(x, axis_name) for x in init_state(rows, v_dim))) for _ in range(c))
    work = _varying(jnp.zeros((), jnp.int32), axis_name)
    tiles = jax.checkpoint(functools.partial(_ring_step, is_causal=is_causal, seq_len=seq_len, padded=padded),
                           prevent_cse=False)
    perm = [(j, (j + 1) % n) for j in range(n)]  # send to the next device: step s holds device (me - s)'s keys

    def step(carry, s):
        states, work, k, v = carry
        states, work = tiles(states, work, q, k, v, q_ids, device_chunks((me - s) % n, n, layout))
        return (states, work, lax.ppermute(k, axis_name, perm), lax.ppermute(v, axis_name, perm)), None

    # A scan, not a Python loop: one compiled step, and one step's score tiles alive at a time.
    (states, work, k, v), _ = lax.scan(step, (states, work, k, v), jnp.arange(n - 1))
    states, work = tiles(states, work, q, k, v, q_ids, device_chunks((me - (n - 1)) % n, n, layout))
    out = jnp.stack([finalize(st)[0] for st in states], axis=2)  # [B, N, c, L, Hv]
    out = jnp.swapaxes(out.reshape(rows[0], heads, local, v_dim), 1, 2).astype(value.dtype)
    return (out, work.astype(jnp.float32) / c ** 2) if return_work else out


def default_mesh(axis_name: str = DEFAULT_AXIS) -> jax.sharding.Mesh:
    """A 1-D mesh over every local device (one device where there is only one)."""
    return jax.sharding.Mesh(np.array(jax.local_devices()), (axis_name,))


def sharded_ring_attention(query, key, value, bias=None, mask=None, *, is_causal: bool = False,
                           scale: float | None = None, mesh: jax.sharding.Mesh | None = None,
                           axis_name: str | None = None, layout: str = "zigzag", return_work: bool = False):
    """Ring attention on global arrays `[batch..., T, N, H]` -> `[batch..., T, N, Hv]`, sharded over `mesh`.

    Args:
      query, key, value: self-attention inputs (T == S), any leading batch dims.
      bias, mask: not supported (a ring would shard them too); pass None.
      is_causal: hide keys j > i; the zigzag layout balances the work across devices.
      scale: logit scale, default `1/sqrt(H)`.
      mesh: the devices; default every local device in a 1-D mesh. axis_name: its sequence axis (default
        the mesh's first).
      layout: "zigzag" (default) or "contiguous".
      return_work: also return `[P]`, the score tiles each device computed (in `[T/P, T/P]` blocks).
    Lengths the devices do not divide are padded at the end and the padding hidden.
    """
    query, key, value = check_qkv(query, key, value)
    if bias is not None or mask is not None:
        raise ValueError(f"sharded_ring_attention supports neither bias nor mask; got bias "
                         f"{None if bias is None else jnp.shape(bias)}, mask {None if mask is None else jnp.shape(mask)}")
    if query.shape[-3] != key.shape[-3]:
        raise ValueError(f"ring attention is self-attention: query and key lengths must match; got query "
                         f"{query.shape}, key {key.shape}")
    mesh = default_mesh() if mesh is None else mesh
    axis_name = axis_name or mesh.axis_names[0]
    n, c = mesh.shape[axis_name], chunks_per_device(layout)
    *batch, seq, heads, _ = query.shape
    padded_len = -(-seq // (c * n)) * (c * n)
    order = layout_order(padded_len, n, layout)

    def arrange(x):
        x = x.reshape((-1,) + x.shape[-3:])
        x = jnp.pad(x, ((0, 0), (0, padded_len - seq), (0, 0), (0, 0)))
        return jnp.take(x, order, axis=1)

    program = _sharded_program(mesh, axis_name, is_causal, None if scale is None else float(scale), layout, seq)
    out, work = program(arrange(query), arrange(key), arrange(value))
    out = jnp.take(out, np.argsort(order), axis=1)[:, :seq].reshape(tuple(batch) + (seq, heads, value.shape[-1]))
    return (out, work) if return_work else out


@functools.lru_cache(maxsize=64)
def _sharded_program(mesh: jax.sharding.Mesh, axis_name: str, is_causal: bool, scale: float | None, layout: str,
                     seq: int):
    """The jitted `shard_map` of `ring_attention` for these settings: `[B, T', N, H]` x3 -> `(out, work [P])`.

    Cached, so that calling `sharded_ring_attention` again with the same settings and shapes compiles nothing.
    """
    spec = PartitionSpec(None, axis_name)
    local = functools.partial(ring_attention, axis_name=axis_name, is_causal=is_causal, scale=scale, layout=layout,
                              seq_len=seq, return_work=True)
    return jax.jit(jax.shard_map(lambda q, k, v: (lambda o, w: (o, w[None]))(*local(q, k, v)), mesh=mesh,
                                 in_specs=(spec, spec, spec), out_specs=(spec, PartitionSpec(axis_name))))


def memory_model(problem, options: dict) -> int:
    """Peak extra bytes of one `sharded_ring_attention` call in this process (all its local devices together).

    Per device: one `[T/(cP), T/(cP)]` tile of scores and its exponentials per head, plus the reordered and
    padded copies of q, k, v and the output and the block in flight (about 3x the inputs); the backward pass
    also keeps the key/value block every step received. `problem` is a `labkit.attention.Problem`.
    """
    n = options.get("devices") or jax.local_device_count()
    c = chunks_per_device(options.get("layout", "zigzag"))
    tile = -(-problem.seq_len // (c * n))
    scores = 2 * problem.batch * problem.heads * tile * tile * 4
    return n * (2 + 2 * problem.backward) * scores + (3 + 2 * problem.backward) * problem.io_bytes
