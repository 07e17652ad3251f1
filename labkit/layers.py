"""Trax layers built on labkit's attention functions: drop-ins for `tl.SelfAttention`.

Each layer keeps Trax's constructor and weight layout (per head: `w_q [d_model, d_qk]`, `w_k [d_model, d_qk]`
unless `share_qk`, `w_v [d_model, d_v]`, `w_o [d_v, d_model]`, plus biases when `bias=True`) and overrides
only `forward_unbatched`, the per-example, per-head computation Trax batches with `vmap` (or loops over with
`use_reference_code=True`). Weights copied from a `tl.SelfAttention` therefore give the same outputs.

`AttentionLayer` is the one adapter: it projects, calls `attend(q, k, v, mask, rng)` (a labkit attention
function on `[T, 1, H]` arrays) and applies the output projection and dropout exactly as Trax does. A family's
layer names the constructor options it cannot honour in `unsupported` and defines `attend`; LSH (its own Trax
base class and state) and Linformer (projections shared across heads) are the two that need more.
"""

from __future__ import annotations

from typing import ClassVar

import jax
import jax.numpy as jnp
from trax import layers as tl
from trax.layers.research.efficient_attention import apply_broadcasted_dropout

from labkit.attention._validate import positive_int
from labkit.attention.chunked import DEFAULT_KEY_CHUNK_SIZE, DEFAULT_QUERY_CHUNK_SIZE, memory_efficient_attention
from labkit.attention.kernel import kernel_attention
from labkit.attention.leap import leap_attention
from labkit.attention.linear import FeatureMap, linear_attention
from labkit.attention.linformer import CHECKPOINT_LEVELS, linformer_self_attention, projection_shape
from labkit.attention.local import length_normalized, local_attention
from labkit.attention.lsh import default_n_buckets, lsh_attention_head, lsh_buckets
from labkit.attention.positional import rotary as rotary_embedding
from labkit.attention.sliding_window import sliding_window_attention


def project_qkv(x: jnp.ndarray, weights: tuple, *, share_qk: bool, bias: bool):
    """Per-head projections of `x [T, d_model]` -> `(q [T, d_qk], k [T, d_qk] | None, v [T, d_v], w_o)`.

    `k` is None for shared-QK layers, whose keys are derived from the queries.
    """
    if bias:
        w_q, w_k, w_v, w_o, b_q, b_k, b_v = weights if not share_qk else (
            weights[0], None, weights[1], weights[2], weights[3], None, weights[4])
    else:
        w_q, w_k, w_v, w_o = weights if not share_qk else (weights[0], None, weights[1], weights[2])
        b_q = b_k = b_v = 0.0
    q = x @ w_q + b_q
    k = None if share_qk else x @ w_k + b_k
    v = x @ w_v + b_v
    return q, k, v, w_o


def refuse(layer_name: str, unsupported: tuple[str, ...], *, share_qk=False, chunk_len=None, n_chunks_before=0,
           n_chunks_after=0, attention_dropout=0.0, causal=False, mode: str = "train", predict_hint: str = "") -> None:
    """A ValueError naming the first `tl.SelfAttention` option in `unsupported` that is set."""
    problems = {
        "predict": (mode == "predict", f"does not implement mode='predict'{predict_hint}"),
        "share_qk": (share_qk, "does not support share_qk=True"),
        "chunk_len": (chunk_len is not None, f"takes no chunk_len (Trax's local windows): it must be None, got "
                                             f"{chunk_len} (DotProductSelfAttention computes local attention)"),
        "n_chunks": (n_chunks_before or n_chunks_after, "takes no local windows: n_chunks_before and "
                     f"n_chunks_after must be 0, got {n_chunks_before}, {n_chunks_after}"),
        "attention_dropout": (attention_dropout, f"does not support attention_dropout (got {attention_dropout}); "
                                                 "use output_dropout"),
        "causal": (causal, "has no causal form: causal=True is not supported"),
    }
    for name in unsupported:
        bad, message = problems[name]
        if bad:
            raise ValueError(f"{layer_name} {message}")


class AttentionLayer(tl.SelfAttention):
    """`tl.SelfAttention` whose per-head attention is `self.attend`: the one adapter every family's layer uses.

    Subclasses set `unsupported` (a tuple of "predict", "share_qk", "chunk_len", "n_chunks",
    "attention_dropout", "causal": constructor options the family cannot honour, refused with a ValueError)
    and define `attend(q, k, v, mask, rng)`: `q, k, v [T, 1, *]` (one head), `mask [1, 1, S] | None`
    (True = real token) -> `[T, 1, Hv]`.
    """

    unsupported: ClassVar[tuple[str, ...]] = ()
    predict_hint: ClassVar[str] = ""

    def __init__(self, *args, **kwargs):
        refuse(type(self).__name__, ("predict",) if "predict" in self.unsupported else (),
               mode=kwargs.get("mode", "train"), predict_hint=self.predict_hint)
        super().__init__(*args, **kwargs)
        refuse(type(self).__name__, self.unsupported, share_qk=self._share_qk, chunk_len=self._chunk_len,
               n_chunks_before=self._n_chunks_before, n_chunks_after=self._n_chunks_after,
               attention_dropout=self._attention_dropout, causal=self._causal)

    def project(self, x: jnp.ndarray, weights: tuple) -> tuple:
        """`x [T, d_model]` -> `(q, k, v [T, *], w_o)`, Trax's projections."""
        return project_qkv(x, weights, share_qk=False, bias=self._bias)

    def attend(self, q, k, v, mask, rng) -> jnp.ndarray:
        """One head's attention `[T, 1, Hv]` (see the class docstring)."""
        raise NotImplementedError

    def forward_unbatched(self, x, mask=None, *, weights, state, rng, update_state):
        """One example, one head: `x [T, d_model]`, `mask [T] | None` -> `(out [T, d_model], state)`."""
        del update_state
        attend_rng, output_rng = jax.random.split(rng)  # Trax's split, so dropout masks agree
        q, k, v, w_o = self.project(x, weights)
        key_mask = None if mask is None else jnp.asarray(mask, bool)[None, None, :]  # [T] -> [N 1, 1, S]
        # [T, dim] -> [T, 1, dim]: the attention functions take a heads axis.
        o = self.attend(q[:, None], k[:, None], v[:, None], key_mask, attend_rng)[:, 0]
        out = apply_broadcasted_dropout(o @ w_o, self._output_dropout, output_rng)
        return out, state


class DotProductSelfAttention(AttentionLayer):
    """`tl.SelfAttention` whose per-head attention is `labkit.attention.local.local_attention`.

    Same constructor arguments as `tl.SelfAttention` (full or chunked, causal or not, shared QK, padding
    mask, dropout). One deliberate difference: with `masked=True`, Trax's 1-based position trick
    cannot hide positions 0 and 1; this layer hides exactly the positions the mask marks.
    """

    def project(self, x, weights):
        """Trax's projections; with shared QK the keys are the length-normalised queries."""
        q, k, v, w_o = project_qkv(x, weights, share_qk=self._share_qk, bias=self._bias)
        return q, length_normalized(q) if self._share_qk else k, v, w_o

    def attend(self, q, k, v, mask, rng):
        """Chunked local attention with Trax's options."""
        return local_attention(q, k, v, None, mask, is_causal=self._causal, chunk_len=self._chunk_len,
                               n_chunks_before=self._n_chunks_before, n_chunks_after=self._n_chunks_after,
                               exclude_self=self._share_qk, dropout_rate=self._attention_dropout, prng_key=rng)


class LSHSelfAttention(tl.LSHSelfAttention):
    """`tl.LSHSelfAttention` whose per-head attention is built from `labkit.attention.lsh`.

    Same constructor, weights (`w_q, w_v, w_o`: queries and keys are shared) and state (per example and
    head: the last bucket ids and the hashing rng). Given the same weights, state and rng it returns
    Trax's outputs and new state. Differences, both deliberate: `bias=True` works (Trax's forward
    cannot unpack the biases), and with `masked=True` exactly the marked positions are hidden (Trax's
    sign trick on 1-based positions cannot hide positions 0 and 1).
    """

    def forward_unbatched(self, x, mask=None, *, weights, state, rng, update_state):
        """One example, one head: `x [T, d_model]`, `mask [T] | None` -> `(out [T, d_model], state)`."""
        attend_rng, output_rng = jax.random.split(rng)
        q, _, v, w_o = project_qkv(x, weights, share_qk=True, bias=self._bias)
        seq_len = x.shape[0]
        if update_state:
            # Fresh hashes each call: advance the per-head rng kept in the state, as Trax does.
            _, old_hash_rng = state
            hash_rng, hash_subrng = jax.random.split(old_hash_rng)
            n_buckets = self._n_buckets or default_n_buckets(seq_len, self._chunk_len)
            buckets = lsh_buckets(q, n_buckets, self._n_hashes, hash_subrng, mask)
            stored = buckets
            if self._max_length_for_buckets:  # the state has a fixed size: pad the ids
                stored = jnp.pad(buckets, (0, self._n_hashes * self._max_length_for_buckets - buckets.shape[0]))
            state = (stored, hash_rng)
        else:
            # Re-use the hashes of the forward pass (e.g. when recomputing it for the backward pass).
            buckets = state[0][:self._n_hashes * seq_len]
        o = lsh_attention_head(
            q, v, buckets, mask, n_hashes=self._n_hashes, is_causal=self._causal, chunk_len=self._chunk_len,
            n_chunks_before=self._n_chunks_before, n_chunks_after=self._n_chunks_after,
            dropout_rate=self._attention_dropout, prng_key=attend_rng)
        out = apply_broadcasted_dropout(o @ w_o, self._output_dropout, output_rng)
        return out, state


# ---------------------------------------------------------------- lab 04: linear attention

class LinearSelfAttention(AttentionLayer):
    """`tl.SelfAttention` whose per-head attention is `labkit.attention.linear.linear_attention`.

    Same constructor arguments and weights as `tl.SelfAttention`, plus `feature_map` ("elu" = elu + 1,
    "relu", "identity" or a callable) and `eps`. The projections `w_q, w_k, w_v, w_o` (and biases) are used
    exactly as Trax uses them; only the softmax is replaced by the kernel `phi(q) . phi(k)`, so the outputs
    are linear attention's, not softmax attention's. `chunk_len`, if given, is the chunk size of the
    chunkwise causal form (the result does not depend on it; memory does), not a local-attention window.

    Not supported (rejected in the constructor): `share_qk`, `n_chunks_before/after` (local windows), and
    `mode='predict'` (decode with `labkit.attention.linear.recurrent_step` / `generate` instead).
    `attention_dropout` is accepted so Trax models can pass it, but has no effect: linear attention never
    forms the attention matrix it would drop entries from. `output_dropout` works as in Trax.
    """

    unsupported = ("predict", "share_qk", "n_chunks")
    predict_hint = "; decode with labkit.attention.linear.recurrent_step or generate"

    def __init__(self, *args, feature_map: FeatureMap = "elu", eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self._feature_map = feature_map
        self._eps = eps

    def attend(self, q, k, v, mask, rng):
        """Linear attention with the layer's feature map; `chunk_len` is the chunkwise form's chunk."""
        return linear_attention(q, k, v, None, mask, is_causal=self._causal, feature_map=self._feature_map,
                                chunk_size=self._chunk_len, eps=self._eps)


# ---------------------------------------------------------------- lab 03: memory-efficient exact attention

class MemoryEfficientSelfAttention(AttentionLayer):
    """`tl.SelfAttention` computed by `labkit.attention.chunked.memory_efficient_attention` (Rabe & Staats).

    Same constructor arguments and weights as `tl.SelfAttention`, plus `query_chunk_size`, `key_chunk_size`,
    `checkpoint` and `skip_blocks` (see `memory_efficient_attention`). Weights copied from a
    `tl.SelfAttention` give the same outputs and gradients (exact attention, float rounding apart), while each
    head holds at most one `[query_chunk, key_chunk]` block of scores. With `masked=True` the mask hides
    exactly the positions it marks (as `DotProductSelfAttention`).

    Not supported (rejected in the constructor): `share_qk`, `chunk_len` (local windows: use
    `DotProductSelfAttention`), `attention_dropout > 0` in training (the attention matrix it would drop entries
    from never exists), and `mode='predict'`. `output_dropout` works as in Trax.

    TFLite export (`labkit.export.to_tflite`): build it with `use_reference_code=True` (Trax then loops over
    examples and heads instead of `vmap`, keeping tensors within TFLite's 5 dimensions) and
    `skip_blocks=False` (no conditionals inside loops).
    """

    unsupported = ("predict", "share_qk", "chunk_len", "attention_dropout")

    def __init__(self, *args, query_chunk_size: int = DEFAULT_QUERY_CHUNK_SIZE,
                 key_chunk_size: int = DEFAULT_KEY_CHUNK_SIZE, checkpoint: bool = True, skip_blocks: bool = True,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._chunk_options = dict(query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size,
                                   checkpoint=checkpoint, skip_blocks=skip_blocks)

    def attend(self, q, k, v, mask, rng):
        """Exact attention, block by block."""
        return memory_efficient_attention(q, k, v, None, mask, is_causal=self._causal, **self._chunk_options)


# ---------------------------------------------------------------- sliding-window attention

class SlidingWindowSelfAttention(AttentionLayer):
    """`tl.SelfAttention` restricted to a band: `labkit.attention.sliding_window.sliding_window_attention`.

    Same constructor arguments and weights as `tl.SelfAttention`, plus `window` (query i sees keys
    `i - window < j <= i` when `causal`, `|i - j| < window` otherwise) and `block_size` (queries per block,
    default `window`; memory only). With `window >= T` it computes exactly `tl.SelfAttention`. With
    `masked=True` the mask hides exactly the positions it marks (as `DotProductSelfAttention`).

    Not supported (rejected in the constructor): `share_qk`, `chunk_len` and `n_chunks_before/after` (the
    band is `window`, not Trax's wrapped chunks), `attention_dropout > 0` and `mode='predict'`.
    """

    unsupported = ("predict", "share_qk", "attention_dropout", "chunk_len", "n_chunks")

    def __init__(self, *args, window: int, block_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        positive_int("window", window)
        positive_int("block_size", block_size, allow_none=True)
        self._window, self._block_size = window, block_size

    def attend(self, q, k, v, mask, rng):
        """Band-limited exact attention, block by block."""
        return sliding_window_attention(q, k, v, None, mask, is_causal=self._causal, window=self._window,
                                        block_size=self._block_size)


# ---------------------------------------------------------------- lab 07: LEAP

class LEAPSelfAttention(AttentionLayer):
    """LEAP attention (`labkit.attention.leap`) as a Trax layer: four projections per head instead of three.

    Weight layout (stacked over heads by Trax, so each entry has a leading `n_heads` axis):
    `(w_q, w_f, w_k, w_v, w_o)` with `w_q, w_f, w_k [d_model, d_qk]`, `w_v [d_model, d_v]`,
    `w_o [d_v, d_model]`; with `bias=True` followed by `(b_q, b_f, b_k, b_v)`. So it is NOT weight-compatible
    with `tl.SelfAttention` (which has no focus projection `w_f`). Per head: `q, f, k, v = x @ w_* (+ b_*)`,
    `o = leap_attention(q, k, v, focus=f)`, and the layer returns the sum over heads of `o @ w_o`.

    Extra constructor arguments: `window` (None = global LEAP), `rescale` (None or the strong-scaling
    constant), `rotary` (rotate q, f, k by their positions: the focus logits `f_j . k_j` are unchanged and the
    query gate `q_t . K~_t` sees only relative positions). `causal=True` is decoder LEAP; `causal=False` is
    the bidirectional form (mean of a left-to-right and a right-to-left pass). `masked=True`: padding
    positions (mask False) get no focus. `attention_dropout` is accepted but unused (no attention matrix
    is formed); `output_dropout` works as in Trax. Rejected: `share_qk`, `chunk_len`/`n_chunks_*`
    (use `window`), `mode='predict'` (decode with `labkit.attention.leap.leap_step` / `generate`).
    """

    unsupported = ("predict", "share_qk")
    predict_hint = "; decode with labkit.attention.leap.leap_step or generate"

    def __init__(self, *args, window: int | None = None, rescale: float | None = None, rotary: bool = False,
                 **kwargs):
        super().__init__(*args, **kwargs)
        if self._chunk_len is not None or self._n_chunks_before or self._n_chunks_after:
            raise ValueError("LEAPSelfAttention takes window=..., not chunk_len/n_chunks_before/n_chunks_after")
        self._window = window
        self._rescale = rescale
        self._rotary = rotary

    def create_weights_unbatched(self, input_signature, rng):
        """One head's `(w_q, w_f, w_k, w_v, w_o[, b_q, b_f, b_k, b_v])`, initialised like Trax's."""
        if isinstance(input_signature, (tuple, list)):
            input_signature = input_signature[0]
        d_model = input_signature.shape[-1]
        rng_q, rng_f, rng_k, rng_v, rng_o = jax.random.split(rng, 5)
        w_q, w_f, w_k = (self._kernel_initializer((d_model, self._d_qk), r) for r in (rng_q, rng_f, rng_k))
        w_v = self._kernel_initializer((d_model, self._d_v), rng_v)
        w_o = jnp.transpose(self._kernel_initializer((d_model, self._d_v), rng_o))
        if self._bias:
            zeros = jnp.zeros(self._d_qk)
            return (w_q, w_f, w_k, w_v, w_o, zeros, zeros, zeros, jnp.zeros(self._d_v))
        return (w_q, w_f, w_k, w_v, w_o)

    def forward_unbatched(self, x, mask=None, *, weights, state, rng, update_state):
        """One example, one head: `x [T, d_model]`, `mask [T] | None` -> `(out [T, d_model], state)`."""
        del update_state
        _, output_rng = jax.random.split(rng)  # Trax's split, so dropout masks agree
        w_q, w_f, w_k, w_v, w_o = weights[:5]
        b_q, b_f, b_k, b_v = weights[5:] if self._bias else (0.0,) * 4
        # [T, dim] -> [T, 1, dim]: the attention functions take a heads axis.
        q, f, k, v = ((x @ w + b)[:, None] for w, b in ((w_q, b_q), (w_f, b_f), (w_k, b_k), (w_v, b_v)))
        key_mask = None if mask is None else jnp.asarray(mask, bool)[None, None, :]  # [T] -> [N 1, 1, T]
        if self._rotary:
            q, f, k = (rotary_embedding(a) for a in (q, f, k))
        o = leap_attention(q, k, v, None, key_mask, focus=f, is_causal=self._causal, window=self._window,
                           rescale=self._rescale)[:, 0]
        return apply_broadcasted_dropout(o @ w_o, self._output_dropout, output_rng), state


# ---------------------------------------------------------------- lab 05: kernel attention (FAVOR+)

class KernelSelfAttention(AttentionLayer):
    """`tl.SelfAttention` whose per-head attention is `labkit.attention.kernel.kernel_attention` (FAVOR+ & co).

    Same constructor arguments and weights as `tl.SelfAttention`, plus Model Garden's `KernelAttention` options:
    `feature_transform` ("exp" = FAVOR+, "expplus", "expmod", "relu", "elu", "square", "identity"/None),
    `num_random_features`, `seed` (the fixed projection's key `PRNGKey(seed)`, shared by all heads, as there),
    `redraw` (mode 'train': a new projection each call, drawn from the per-example, per-head rng Trax passes;
    'eval' keeps the fixed one), `is_short_seq`, `begin_kernel`, `scale`, `scale_by_length`,
    `use_causal_windowed` with `causal_chunk_length`, `causal_window_length`, `causal_window_decay`,
    `causal_padding` (these need `causal=True`). `chunk_len`, if given, is lab 04's chunk size for the plain
    causal form (the result does not depend on it). With `feature_transform=None, num_random_features=0,
    is_short_seq=True` (or `begin_kernel >= length`) the layer computes exactly `tl.SelfAttention`.

    Not supported (rejected in the constructor): `share_qk`, `n_chunks_before/after`, `mode='predict'`.
    `attention_dropout` is accepted but has no effect (no attention matrix to drop entries from in the
    linear forms); `output_dropout` works as in Trax.
    """

    unsupported = ("predict", "share_qk", "n_chunks")

    def __init__(self, *args, feature_transform="exp", num_random_features: int = 256, seed: int = 0,
                 redraw: bool = False, is_short_seq: bool = False, begin_kernel: int = 0, scale=None,
                 scale_by_length: bool = False, use_causal_windowed: bool = False, causal_chunk_length: int = 1,
                 causal_window_length: int = 3, causal_window_decay=None, causal_padding=None, **kwargs):
        super().__init__(*args, **kwargs)
        if use_causal_windowed and not self._causal:
            raise ValueError("use_causal_windowed=True needs causal=True")
        if redraw and num_random_features <= 0:
            raise ValueError("there is nothing to redraw when num_random_features <= 0")
        self._redraw, self._fixed_key = redraw, jax.random.PRNGKey(seed)
        self._kernel_options = dict(
            feature_transform=feature_transform, num_random_features=num_random_features,
            is_short_seq=is_short_seq, begin_kernel=begin_kernel, scale=scale, scale_by_length=scale_by_length,
            causal_chunk_length=causal_chunk_length if use_causal_windowed else self._chunk_len,
            causal_window_length=causal_window_length if use_causal_windowed else None,
            causal_window_decay=causal_window_decay, causal_padding=causal_padding)

    def attend(self, q, k, v, mask, rng):
        """Kernel attention; the projection is redrawn from this call's rng only when training with `redraw`."""
        key = rng if self._redraw and self._mode == "train" else self._fixed_key
        return kernel_attention(q, k, v, None, mask, is_causal=self._causal, prng_key=key, **self._kernel_options)


# ---------------------------------------------------------------- lab 06: Linformer

class LinformerSelfAttention(tl.SelfAttention):
    """`tl.SelfAttention` whose attention is Linformer's: keys and values projected along the sequence.

    Same constructor arguments as `tl.SelfAttention`, plus `max_len` (n: longest input, shorter ones are
    padded with hidden positions), `proj_k` (k), `sharing` ("none": E, F per head; "headwise": one E and
    one F for all heads; "kv": a single E = F for all heads) and `checkpoint` ("C0" none, "C1" recompute the
    whole attention in the backward pass, "C2" also one head at a time; same outputs and gradients).

    Weights: Trax's `(w_q, w_k, w_v, w_o[, b_q, b_k, b_v])` stacked over heads, then `e_proj` (and `f_proj`
    unless `sharing="kv"`), so `layer.weights = trax_layer.weights + layer.weights[-n_proj:]` transfers the
    q/k/v/o part. With `proj_k = max_len = T` and identity E, F it equals `tl.SelfAttention`.

    Differences from the other labkit layers, all deliberate: it overrides `forward` rather than
    `forward_unbatched` (a projection shared by heads does not fit Trax's per-head weight slicing, and the
    checkpoint levels need to see all heads) and differentiates it with JAX (`has_backward` is False);
    `n_parallel_heads` and `use_reference_code` therefore change nothing. Linformer has no causal form and no
    fast decoding: `causal=True`, `share_qk`, `chunk_len` and `mode='predict'` are rejected. One projection
    shared by all layers (the paper's layerwise sharing) lives in the pure-JAX helpers
    (`labkit.attention.linformer.init_projections`), not in this layer; a shrinking k is one `proj_k` per layer.
    """

    def __init__(self, *args, max_len: int = 512, proj_k: int = 64, sharing: str = "none",
                 checkpoint: str = "C0", **kwargs):
        refuse("LinformerSelfAttention", ("predict",), mode=kwargs.get("mode", "train"),
               predict_hint=": Linformer has no fast decoding")
        super().__init__(*args, **kwargs)
        refuse("LinformerSelfAttention", ("causal", "share_qk", "chunk_len"), causal=self._causal,
               share_qk=self._share_qk, chunk_len=self._chunk_len)
        if sharing == "layerwise":
            raise ValueError("sharing='layerwise' spans several layers: use "
                             "labkit.attention.linformer.init_projections / linformer_self_attention")
        self._proj_shape = projection_shape(sharing, n_heads=self._n_heads, proj_k=proj_k, max_len=max_len)
        if checkpoint not in CHECKPOINT_LEVELS:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT_LEVELS}, got {checkpoint!r}")
        self._max_len, self._proj_k, self._sharing, self._checkpoint = max_len, proj_k, sharing, checkpoint

    @property
    def n_projections(self) -> int:
        """How many projection matrices follow the q/k/v/o weights (1 when E = F)."""
        return 1 if self._sharing == "kv" else 2

    def init_weights_and_state(self, input_signature):
        """Trax's q/k/v/o weights and state, then E (and F), normal with std 1/sqrt(k)."""
        super().init_weights_and_state(input_signature)
        rngs = jax.random.split(jax.random.fold_in(self.rng, 6), self.n_projections)
        proj = tuple(jax.random.normal(r, self._proj_shape) / self._proj_k ** 0.5 for r in rngs)
        self.weights = tuple(self.weights) + proj

    @property
    def has_backward(self):
        return False

    def forward(self, inputs):
        """`x [B, T, d_model]` (and `mask [B, T]` when `masked`) -> `[B, T, d_model]`; T <= max_len."""
        x, mask = (inputs[0], inputs[1]) if self._masked else (inputs, None)
        x = jnp.asarray(x)
        n = self.n_projections
        qkvo, proj = self.weights[:-n], self.weights[-n:]
        attend_rng, output_rng = jax.random.split(self.rng)
        out = linformer_self_attention(
            x, qkvo, proj[0], proj[1] if n == 2 else None, mask=mask, bias=self._bias,
            checkpoint=self._checkpoint, dropout_rate=self._attention_dropout, prng_key=attend_rng)
        # Trax uses one output-dropout mask for every head and example, so dropping the sum is the same.
        return apply_broadcasted_dropout(out, self._output_dropout, output_rng).astype(x.dtype)
