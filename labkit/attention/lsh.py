"""LSH attention (Reformer), step by step, as Trax's `LSHSelfAttention` computes it.

Kitaev, Kaiser & Levskaya 2020, "Reformer: The Efficient Transformer" (https://arxiv.org/abs/2001.04451).

Idea: softmax attention is dominated by the few keys closest to each query. Reformer uses *shared QK*
(the keys are the length-normalised queries), so "close to the query" is "close to the other queries",
and locality-sensitive hashing finds those neighbours without comparing all pairs:

1. `hash_vectors`: project each vector on random directions `R` and take the bucket
   `argmax([xR, -xR])` (angular LSH, Andoni et al. 2015): vectors with a small angle between them
   usually land in the same bucket. `n_hashes` independent rounds lower the chance of a miss;
   `lsh_buckets` offsets the bucket ids of round `r` by `r * n_buckets`, so rounds never mix.
2. `sort_by_bucket`: sort the `n_hashes * T` (round, position) items by (bucket, position), so each
   bucket becomes a contiguous run, in the original order inside it.
3. `chunked_lsh_attention`: cut the sorted sequence into chunks of `chunk_len`; each chunk attends to
   itself and `n_chunks_before` / `n_chunks_after` neighbouring chunks (`look_adjacent`, wrapping around),
   which catches buckets split across a chunk boundary. Masks use the items' original positions:
   a query never attends to its own position unless nothing else is available (the *self-mask*, needed
   because with shared QK a query's best match is always itself), and with `is_causal` never to a later one.
   It returns each item's output and the logsumexp of its scores.
4. `unsort` puts both back in the original order with the inverse permutation.
5. `combine_hash_rounds`: each round saw a different subset of keys; weight round `r`'s output by
   `exp(lse_r - logsumexp_r(lse_r))`, the share of the total softmax mass that round saw.

Masks are *soft*, exactly as in Trax: hidden scores get -1e9 (causal, padding) or -1e5 (self) added, so a
query whose window holds only itself still attends to itself.

Cost per head, with `c = chunk_len` and `W = c * (1 + n_chunks_before + n_chunks_after)`:
O(n_hashes * T * (log T + W * H)) time and O(n_hashes * T * W) memory for the chunk scores, linear in T
for a fixed chunk length, instead of dense attention's O(T^2).

Lengths: the sorted sequence of `n_hashes * T` items is padded to a multiple of `chunk_len`; padded
items are hidden as keys and dropped as queries. When `chunk_len` divides `n_hashes * T` (the only case
Trax accepts) nothing is padded and the result equals Trax's.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from labkit.attention._validate import as_float_array, default_scale, dropout_keep, key_padding_mask, reject_bias
from labkit.attention.local import SELF_PENALTY, length_normalized, look_adjacent

MASK_PENALTY = 1e9  # Trax's soft mask for future and padding keys


def _total_buckets(n_buckets: int | list[int] | tuple[int, ...]) -> int:
    """Number of distinct bucket ids: `n_buckets`, or the product of its factors."""
    return n_buckets if isinstance(n_buckets, int) else math.prod(n_buckets)


def default_n_buckets(seq_len: int, chunk_len: int) -> int | list[int]:
    """Trax's choice when `n_buckets=None`: about two buckets per chunk, factorised above 128."""
    n_buckets = 2 * max(1, seq_len // chunk_len)
    if n_buckets <= 128:
        return n_buckets
    # Two even factors keep the random rotations small: 2 * (a/2 + b/2) columns instead of a * b.
    first = 2 ** math.ceil(math.log2(math.sqrt(n_buckets)))
    return [first, 2 * (n_buckets // (2 * first))]


def hash_vectors(vecs: jnp.ndarray, n_buckets: int | list[int], n_hashes: int, rng: jax.Array) -> jnp.ndarray:
    """Angular LSH of `vecs [T, H]` -> int32 bucket ids `[n_hashes, T]` in `[0, n_buckets)`.

    Same result as Trax's `hash_vecs(vecs, n_buckets, n_hashes, rng)[0]` for the same `rng`.
    A list `n_buckets=[a, b]` hashes hierarchically into `a * b` buckets with `(a + b) / 2` directions.
    """
    factors = [n_buckets] if isinstance(n_buckets, int) else list(n_buckets)
    for f in factors:
        if f < 2 or f % 2:
            raise ValueError(f"n_buckets must be even (or a list of even factors), got {n_buckets!r}")
    rot_size = sum(factors)
    # One random rotation per round: [H, n_hashes, rot_size / 2] Gaussian directions.
    rotations = jax.random.normal(rng, (vecs.shape[-1], n_hashes, rot_size // 2)).astype(jnp.float32)
    rotated = jnp.einsum("tf,fhb->htb", vecs, rotations)  # [n_hashes, T, rot_size / 2]
    buckets, start, place = 0, 0, 1
    for f in factors:
        part = rotated[..., start:start + f // 2]
        # argmax over [xR, -xR]: which of the f half-axes the vector points along most.
        buckets = buckets + place * jnp.argmax(jnp.concatenate([part, -part], axis=-1), axis=-1).astype(jnp.int32)
        start, place = start + f // 2, place * f
    return buckets


def lsh_buckets(vecs: jnp.ndarray, n_buckets: int | list[int], n_hashes: int, rng: jax.Array,
                mask: jnp.ndarray | None = None) -> jnp.ndarray:
    """Flat bucket ids `[n_hashes * T]` of `vecs [T, H]`, round `r` offset by `r * n_buckets`.

    Matches `tl.LSHSelfAttention.hash_vectors`. With a boolean `mask [T]` (True = real token), hidden
    positions go to an extra bucket of their own, so they never share a chunk with real tokens by chance.
    """
    buckets = hash_vectors(vecs, n_buckets, n_hashes, rng)
    total = _total_buckets(n_buckets)
    if mask is not None:
        total += 1
        buckets = jnp.where(jnp.asarray(mask, bool)[None, :], buckets, total - 1)
    # Offsets keep the rounds apart once everything is sorted together.
    offsets = jnp.arange(n_hashes, dtype=jnp.int32)[:, None] * total
    return (buckets + offsets).reshape(-1)


def sort_by_bucket(buckets: jnp.ndarray, seq_len: int) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Sort flat ids `[n_hashes * T]` by (bucket, position) -> `(order, undo)`, both int32 `[n_hashes * T]`.

    `order[i]` is the flat index (round * T + position) of the i-th sorted item; `undo` is its inverse
    permutation, so `sorted_x[undo]` restores the original order.
    """
    ticker = jnp.arange(buckets.shape[-1], dtype=jnp.int32)
    # lexsort: last key is primary. Sorting (bucket, position) pairs avoids Trax's int32 key
    # `seq_len * bucket + position`, which overflows for long sequences, and gives the same order.
    order = jnp.lexsort((ticker % seq_len, jax.lax.stop_gradient(buckets))).astype(jnp.int32)
    undo = jnp.argsort(order).astype(jnp.int32)
    return order, undo


def chunked_lsh_attention(sq: jnp.ndarray, sv: jnp.ndarray, positions: jnp.ndarray, key_valid=None, *,
                          is_causal: bool = False, scale: float | None = None, chunk_len: int | None = None,
                          n_chunks_before: int = 1, n_chunks_after: int = 0, dropout_rate: float = 0.0,
                          prng_key: jax.Array | None = None) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Shared-QK attention inside chunks of sorted items -> `(out [M, Hv], logsumexp [M])` (float32).

    Args:
      sq: sorted queries `[M, H]` (the keys are their length-normalised copies).
      sv: sorted values `[M, Hv]`.
      positions: each item's original sequence position `[M]`, used by the self and causal masks.
      key_valid: optional boolean `[M]`; False hides that item as a key (-1e9).
      is_causal: hide keys at later positions (-1e9).
      scale: logit scale, default `1/sqrt(H)`.
      chunk_len: items per chunk; None puts all M in one chunk (then no neighbours are allowed).
      n_chunks_before, n_chunks_after: neighbouring chunks each chunk also sees (wrapping around).
      dropout_rate, prng_key: attention dropout, one `[chunk_len, W]` keep mask shared by all chunks.
    """
    m = sq.shape[0]
    if chunk_len is None and (n_chunks_before or n_chunks_after):
        raise ValueError(f"n_chunks_before={n_chunks_before}, n_chunks_after={n_chunks_after} need a chunk_len")
    chunk_len = chunk_len or m
    n_chunks = -(-m // chunk_len)
    pad = n_chunks * chunk_len - m
    valid = jnp.ones(m, bool) if key_valid is None else jnp.asarray(key_valid, bool)
    # Padded items: position m (equal to no real position, later than all), hidden as keys.
    positions = jnp.pad(positions, (0, pad), constant_values=m)
    valid = jnp.pad(valid, (0, pad), constant_values=False)
    to_chunks = lambda a: jnp.pad(a, [(0, pad)] + [(0, 0)] * (a.ndim - 1)).reshape(n_chunks, chunk_len, *a.shape[1:])

    q = to_chunks(sq)                                                          # [C, L, H]
    k = length_normalized(q) * default_scale(scale, sq.shape[-1])              # shared QK keys
    k = look_adjacent(k, n_chunks_before, n_chunks_after)                      # [C, W, H]
    v = look_adjacent(to_chunks(sv), n_chunks_before, n_chunks_after)          # [C, W, Hv]
    q_pos = positions.reshape(n_chunks, chunk_len)                             # [C, L]
    kv_pos = look_adjacent(q_pos, n_chunks_before, n_chunks_after)             # [C, W]
    kv_valid = look_adjacent(valid.reshape(n_chunks, chunk_len), n_chunks_before, n_chunks_after)

    dots = jnp.einsum("clh,cwh->clw", q, k, preferred_element_type=jnp.float32)
    # Soft masks in Trax's order, so results agree to the last bit where it matters.
    if is_causal:
        dots = dots - MASK_PENALTY * (q_pos[:, :, None] < kv_pos[:, None, :])
    dots = dots - SELF_PENALTY * (q_pos[:, :, None] == kv_pos[:, None, :])
    if key_valid is not None or pad:
        dots = dots - MASK_PENALTY * ~kv_valid[:, None, :]

    lse = jax.nn.logsumexp(dots, axis=-1, keepdims=True)
    probs = jnp.exp(dots - lse)
    keep = dropout_keep(prng_key, dropout_rate, probs.shape[-2:])
    if keep is not None:
        probs = probs * keep
    out = jnp.einsum("clw,cwh->clh", probs, v.astype(jnp.float32))
    return out.reshape(-1, out.shape[-1])[:m], lse.reshape(-1)[:m]


def unsort(x: jnp.ndarray, undo: jnp.ndarray) -> jnp.ndarray:
    """Put sorted items `x [M, ...]` back in their original (round, position) order."""
    return jnp.take(x, undo, axis=0)


def combine_hash_rounds(out: jnp.ndarray, lse: jnp.ndarray) -> jnp.ndarray:
    """`out [n_hashes, T, Hv]`, `lse [n_hashes, T]` -> `[T, Hv]`, each round weighted by its softmax mass.

    Round r normalised its softmax over the keys it saw; `exp(lse_r)` is that unnormalised mass, so
    `softmax_r(lse_r)` re-weights the rounds as one softmax over all keys seen (counting repeats).
    """
    weights = jnp.exp(lse - jax.nn.logsumexp(lse, axis=0, keepdims=True))
    return jnp.sum(out * weights[..., None], axis=0)


def lsh_attention_head(q: jnp.ndarray, v: jnp.ndarray, buckets: jnp.ndarray, mask: jnp.ndarray | None = None, *,
                       n_hashes: int, is_causal: bool = False, scale: float | None = None,
                       chunk_len: int | None = 64, n_chunks_before: int = 1, n_chunks_after: int = 0,
                       dropout_rate: float = 0.0, prng_key: jax.Array | None = None) -> jnp.ndarray:
    """LSH attention for one head: `q [T, H]`, `v [T, Hv]`, flat offset `buckets [n_hashes * T]` -> `[T, Hv]`.

    `buckets` come from `lsh_buckets` (passing them in lets a layer reuse the hashes it keeps in its
    state); `mask [T]` (True = real token) hides padding positions as keys.
    """
    seq_len = q.shape[0]
    if buckets.shape != (n_hashes * seq_len,):
        raise ValueError(f"buckets must have shape ({n_hashes * seq_len},) = n_hashes * T, got {buckets.shape}")
    order, undo = sort_by_bucket(buckets, seq_len)
    positions = order % seq_len
    sq, sv = jnp.take(q, positions, axis=0), jnp.take(v, positions, axis=0)
    key_valid = None if mask is None else jnp.take(jnp.asarray(mask, bool), positions)
    so, slse = chunked_lsh_attention(
        sq, sv, positions, key_valid, is_causal=is_causal, scale=scale, chunk_len=chunk_len,
        n_chunks_before=n_chunks_before, n_chunks_after=n_chunks_after,
        dropout_rate=dropout_rate, prng_key=prng_key)
    o = unsort(so, undo).reshape(n_hashes, seq_len, -1)
    lse = unsort(slse, undo).reshape(n_hashes, seq_len)
    return combine_hash_rounds(o, lse).astype(v.dtype)


def lsh_attention(query, key, value, bias=None, mask=None, *, is_causal: bool = False,
                  scale: float | None = None, chunk_len: int = 64, n_buckets: int | list[int] | None = None,
                  n_hashes: int = 1, n_chunks_before: int = 1, n_chunks_after: int = 0,
                  prng_key: jax.Array | None = None) -> jnp.ndarray:
    """Reformer LSH self-attention `[batch..., T, N, Hv]`; keys are the length-normalised queries.

    Args:
      query: `[batch..., T, N, H]` (shared QK: also the keys, after length normalisation).
      key: must be None: with shared QK the keys are derived from the queries.
      value: `[batch..., T, N, Hv]`.
      bias: must be None (the scores exist only inside the sorted chunks).
      mask: optional boolean key-padding mask broadcastable to `[batch..., 1, 1, T]`; False hides that
        position as a key.
      is_causal: hide keys after the query.
      scale: logit scale, default `1/sqrt(H)`.
      chunk_len: sorted items per chunk.
      n_buckets: buckets per hash round (even, or a list of even factors); default about 2 per chunk.
      n_hashes: hash rounds.
      n_chunks_before, n_chunks_after: neighbouring chunks each chunk also sees.
      prng_key: key for the random rotations; each example and head gets its own (split from it).
    """
    query, value = as_float_array("query", query), as_float_array("value", value)
    if key is not None:
        raise ValueError("lsh_attention shares queries and keys (the keys are the length-normalised queries): "
                         f"pass key=None, got a key of shape {jnp.shape(key)}")
    reject_bias(bias, "lsh_attention")
    shapes = f"query {query.shape}, value {value.shape}"
    if query.ndim < 3 or value.ndim != query.ndim or query.shape[:-1] != value.shape[:-1]:
        raise ValueError("query and value must be [batch..., seq, heads, dim] with the same leading dims; "
                         f"got {shapes}")
    if prng_key is None:
        raise ValueError("lsh_attention needs a prng_key for its random rotations")
    if int(chunk_len) != chunk_len or chunk_len < 1:
        raise ValueError(f"chunk_len must be a positive integer, got {chunk_len!r}")
    if n_hashes < 1:
        raise ValueError(f"n_hashes must be >= 1, got {n_hashes!r}")
    seq_len, n_heads = query.shape[-3], query.shape[-2]
    batch_shape = query.shape[:-3]
    n_buckets = default_n_buckets(seq_len, chunk_len) if n_buckets is None else n_buckets
    mask = key_padding_mask(mask, query.shape, "lsh_attention", per_head=False)

    def one_head(q, v, m, key):  # q [T, H], v [T, Hv], m [T] | None
        buckets = lsh_buckets(q, n_buckets, n_hashes, key, m)
        return lsh_attention_head(q, v, buckets, m, n_hashes=n_hashes, is_causal=is_causal, scale=scale,
                                  chunk_len=chunk_len, n_chunks_before=n_chunks_before,
                                  n_chunks_after=n_chunks_after)

    # Flatten batch dims, put heads first, and give every (example, head) its own rotations.
    n_examples = math.prod(batch_shape)
    q = query.reshape(n_examples, seq_len, n_heads, -1).transpose(0, 2, 1, 3)
    v = value.reshape(n_examples, seq_len, n_heads, -1).transpose(0, 2, 1, 3)
    keys = jax.random.split(prng_key, n_examples * n_heads)
    keys = keys.reshape((n_examples, n_heads) + keys.shape[1:])
    if mask is None:
        out = jax.vmap(jax.vmap(lambda q, v, k: one_head(q, v, None, k)))(q, v, keys)
    else:
        m = mask.reshape(n_examples, seq_len)
        out = jax.vmap(jax.vmap(one_head, in_axes=(0, 0, None, 0)))(q, v, m, keys)
    return out.transpose(0, 2, 1, 3).reshape(value.shape)
