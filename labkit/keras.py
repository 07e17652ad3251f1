"""Exact attention in O(sqrt n) memory as a drop-in for `keras.layers.MultiHeadAttention`.

Rabe & Staats (2021), "Self-attention does not need O(n^2) memory": queries are taken a chunk at a time,
and for each chunk the keys and values are read a chunk at a time, keeping only a running maximum, a
running softmax denominator and a running weighted sum of values (the online softmax). No `[T, S]` score
array ever exists: extra memory is O(query_chunk * key_chunk) per head instead of O(T * S).
Time is the same O(T S d) as dense attention.

`MemoryEfficientMultiHeadAttention` subclasses Keras's layer and replaces only `_compute_attention`, so the
projections, their weights and the config are Keras's own: `new.set_weights(vanilla.get_weights())` gives
the vanilla layer's outputs. Written in `keras.ops` (`map` over query chunks, `scan` over key chunks), it
runs on the TensorFlow, JAX and torch backends. Import it only when you use it: it imports Keras.

Shapes: `B` batch, `T` query length, `S` key length, `N` heads, `H` key size, `Hv` value size.
"""

from __future__ import annotations

import math
import warnings

import keras
from keras import ops

# Keras's own masked softmax sets hidden scores to this value; the same fill gives the same rows.
_HIDDEN = -1e9
# Padded keys and the running maximum's start: far below _HIDDEN, so padding never gets weight, and finite
# (TFLite's kernels turn arithmetic on -inf into NaN).
_NEVER = -1e30


def _chunks(x, size: int, axis_len: int):
    """`[B, N, L, D]` padded to a multiple of `size` -> `[L / size, B, N, size, D]`."""
    padded = math.ceil(axis_len / size) * size
    x = ops.pad(x, [[0, 0], [0, 0], [0, padded - axis_len], [0, 0]])
    b, n, _, d = ops.shape(x)
    return ops.transpose(ops.reshape(x, (b, n, padded // size, size, d)), (2, 0, 1, 3, 4))


def _mask_chunks(mask, q_size: int, k_size: int, t: int, s: int):
    """Boolean `[B, T, S]` padded with False -> `[T / q_size, S / k_size, B, q_size, k_size]`."""
    tp, sp = math.ceil(t / q_size) * q_size, math.ceil(s / k_size) * k_size
    mask = ops.pad(ops.cast(mask, "bool"), [[0, 0], [0, tp - t], [0, sp - s]], constant_values=False)
    b = ops.shape(mask)[0]
    mask = ops.reshape(mask, (b, tp // q_size, q_size, sp // k_size, k_size))
    return ops.transpose(mask, (1, 3, 0, 2, 4))


def _keep_after_dropout(weights, rate: float, seed, index):
    """Dropout on a block of softmax weights `[B, N, q, k]`, drawn from `seed` (two integers) and the block index.

    The draw is stateless, so it works inside the compiled loops of the JAX and TensorFlow backends.
    """
    backend = keras.backend.backend()
    if backend == "jax":
        import jax

        keep = jax.random.bernoulli(jax.random.fold_in(seed, index), 1.0 - rate, weights.shape)
    elif backend == "tensorflow":
        import tensorflow as tf

        pair = tf.stack([tf.cast(seed[0], tf.int64), tf.cast(seed[1], tf.int64) * 1_000_003 + tf.cast(index, tf.int64)])
        keep = tf.random.stateless_uniform(tf.shape(weights), pair) >= rate
    else:  # eager backends (torch, numpy): the loops are plain Python, a stateful draw is fine
        return keras.random.dropout(weights, rate)
    return ops.where(keep, weights / (1.0 - rate), ops.zeros_like(weights))


def chunked_attention(query, key, value, mask=None, *, is_causal: bool = False, scale: float | None = None,
                      query_chunk_size: int = 512, key_chunk_size: int = 512, dropout_rate: float = 0.0,
                      dropout_seed=None, zero_hidden_rows: bool = False):
    """Exact softmax attention, chunk by chunk: `[B, T, N, H]`, `[B, S, N, H]`, `[B, S, N, Hv]` -> `[B, T, N, Hv]`.

    `mask` (boolean `[B, T, S]`, True = may attend) hides scores the way Keras's masked softmax does (a
    fill of -1e9); `is_causal` hides keys after each query without building a `[T, S]` mask. Lengths the
    chunk sizes do not divide are padded, and padded keys never get weight. `dropout_rate` drops softmax
    weights (training only); `dropout_seed` is a backend seed (two integers). A row whose keys are all
    hidden gets the mean of the values, or zeros with `zero_hidden_rows` (Keras's layer does either,
    depending on whether it takes its fused path or its score path).
    """
    t, s = query.shape[1], key.shape[1]
    if t is None or s is None:
        raise ValueError(f"chunked attention needs static sequence lengths; got query {query.shape}, key {key.shape}")
    scale = 1.0 / math.sqrt(query.shape[-1]) if scale is None else scale
    q_size, k_size = min(query_chunk_size, t), min(key_chunk_size, s)
    # [B, L, N, D] -> [B, N, L, D]: each head's chunk is then one matrix product.
    q = _chunks(ops.transpose(query, (0, 2, 1, 3)) * ops.cast(scale, query.dtype), q_size, t)
    k = _chunks(ops.transpose(key, (0, 2, 1, 3)), k_size, s)
    v = _chunks(ops.transpose(value, (0, 2, 1, 3)), k_size, s)
    n_q, n_k = q.shape[0], k.shape[0]
    masks = _mask_chunks(mask, q_size, k_size, t, s) if mask is not None else ops.zeros((n_q, n_k), "bool")

    def one_query_chunk(inputs):
        i, q_i, mask_i = inputs  # q_i [B, N, q, H]; mask_i [n_k, B, q, k] (or a dummy when there is no mask)
        q_pos = i * q_size + ops.arange(q_size)

        def one_key_chunk(carry, block):
            running_max, denominator, total, seen = carry
            j, k_j, v_j, mask_ij = block
            scores = ops.matmul(q_i, ops.transpose(k_j, (0, 1, 3, 2)))  # [B, N, q, k]
            k_pos = j * k_size + ops.arange(k_size)
            keep = None if mask is None else mask_ij[:, None]
            if is_causal:
                causal = k_pos[None, :] <= q_pos[:, None]
                keep = causal if keep is None else ops.logical_and(keep, causal)
            if keep is not None:
                scores = ops.where(keep, scores, ops.cast(_HIDDEN, scores.dtype))
                seen = ops.logical_or(seen, ops.any(ops.logical_and(keep, k_pos < s), axis=-1))
            scores = ops.where(k_pos < s, scores, ops.cast(_NEVER, scores.dtype))  # padding: no weight
            new_max = ops.maximum(running_max, ops.max(scores, axis=-1))
            weights = ops.exp(scores - new_max[..., None])
            rescale = ops.exp(running_max - new_max)
            denominator = denominator * rescale + ops.sum(weights, axis=-1)
            if dropout_rate > 0.0:
                weights = _keep_after_dropout(weights, dropout_rate, dropout_seed, i * n_k + j)
            total = total * rescale[..., None] + ops.matmul(weights, v_j)
            return (new_max, denominator, total, seen), None

        b, n = ops.shape(q_i)[0], ops.shape(q_i)[1]
        start = (ops.full((b, n, q_size), _NEVER, q_i.dtype), ops.zeros((b, n, q_size), q_i.dtype),
                 ops.zeros((b, n, q_size, v.shape[-1]), q_i.dtype), ops.full((b, n, q_size), mask is None and not is_causal, "bool"))
        (_, denominator, total, seen), _ = ops.scan(one_key_chunk, start, (ops.arange(n_k), k, v, mask_i))
        out = total / denominator[..., None]
        return ops.where(seen[..., None], out, ops.zeros_like(out)) if zero_hidden_rows else out

    out = ops.map(one_query_chunk, (ops.arange(n_q), q, masks))  # [n_q, B, N, q, Hv]
    b, n, hv = ops.shape(out)[1], ops.shape(out)[2], out.shape[-1]
    out = ops.reshape(ops.transpose(out, (1, 0, 3, 2, 4)), (b, n_q * q_size, n, hv))  # [B, T padded, N, Hv]
    return out[:, :t]


@keras.saving.register_keras_serializable(package="labkit")
class MemoryEfficientMultiHeadAttention(keras.layers.MultiHeadAttention):
    """`keras.layers.MultiHeadAttention` whose attention never holds the `[T, S]` score matrix.

    Same constructor arguments and weights as Keras's layer, plus `query_chunk_size` and `key_chunk_size`.
    `attention_mask`, `use_causal_mask` (applied per block, no `[T, S]` mask is built), Keras masks and
    dropout in training work as in Keras's layer; a row whose keys are all hidden gets what Keras's layer
    gives it with the same `dropout` (the mean of the values without dropout, zeros with it).
    `return_attention_scores=True` needs the full matrix: it
    is then computed densely, with a warning. Attention runs over the sequence axis only: inputs
    `[batch, seq, features]`; other `attention_axes` are refused.
    """

    def __init__(self, num_heads: int, key_dim: int, *args, query_chunk_size: int = 512,
                 key_chunk_size: int = 512, **kwargs):
        super().__init__(num_heads, key_dim, *args, **kwargs)
        for name, size in (("query_chunk_size", query_chunk_size), ("key_chunk_size", key_chunk_size)):
            if not isinstance(size, int) or size < 1:
                raise ValueError(f"{name} must be a positive int, got {size!r}")
        self.query_chunk_size, self.key_chunk_size = query_chunk_size, key_chunk_size
        self._causal = False

    def get_config(self) -> dict:
        """Keras's config plus the two chunk sizes."""
        return {**super().get_config(), "query_chunk_size": self.query_chunk_size,
                "key_chunk_size": self.key_chunk_size}

    def _build_attention(self, rank: int) -> None:
        super()._build_attention(rank)
        if rank != 4 or tuple(self._attention_axes) != (1,):
            raise ValueError("MemoryEfficientMultiHeadAttention attends over the sequence axis of inputs "
                             f"[batch, seq, features]; got inputs of rank {rank - 1} with attention_axes="
                             f"{self._attention_axes}: use keras.layers.MultiHeadAttention for those")

    def _compute_attention_mask(self, query, value, query_mask=None, value_mask=None, key_mask=None,
                                attention_mask=None, use_causal_mask=False):
        # Remember causality and apply it block by block instead of as a [T, S] mask.
        self._causal = use_causal_mask
        return super()._compute_attention_mask(query, value, query_mask=query_mask, value_mask=value_mask,
                                               key_mask=key_mask, attention_mask=attention_mask,
                                               use_causal_mask=False)

    def _compute_attention(self, query, key, value, attention_mask=None, training=None,
                           return_attention_scores=False, use_causal_mask=False):
        causal = self._causal or use_causal_mask
        if return_attention_scores:
            warnings.warn("return_attention_scores=True needs the full [T, S] score matrix: computed densely, "
                          "with O(T*S) memory", stacklevel=3)
            return super()._compute_attention(query, key, value, attention_mask, training,
                                              return_attention_scores=True, use_causal_mask=causal)
        dropping = bool(training) and self._dropout > 0.0
        seed = self._dropout_layer.seed_generator.next() if dropping else None
        out = chunked_attention(query, key, value, attention_mask, is_causal=causal,
                                scale=self._inverse_sqrt_key_dim, query_chunk_size=self.query_chunk_size,
                                key_chunk_size=self.key_chunk_size, dropout_rate=self._dropout if dropping else 0.0,
                                dropout_seed=seed, zero_hidden_rows=self._dropout > 0.0)
        return out, None
