"""Linear attention as a `tl.SelfAttention`-shaped layer (lab 04)."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from labkit.attention.linear import FeatureMap, LinearState, get_feature_map, init_state, linear_attention, recurrent_step
from labkit.layers.base import AttentionLayer


# ---------------------------------------------------------------- lab 04: linear attention

class LinearSelfAttention(AttentionLayer):
    """`tl.SelfAttention` whose per-head attention is `labkit.attention.linear.linear_attention`.

    Same constructor arguments and weights as `tl.SelfAttention`, plus `feature_map` ("elu" = elu + 1,
    "relu", "identity" or a callable) and `eps`. The projections `w_q, w_k, w_v, w_o` (and biases) are used
    exactly as Trax uses them; only the softmax is replaced by the kernel `phi(q) . phi(k)`, so the outputs
    are linear attention's, not softmax attention's. `chunk_len`, if given, is the chunk size of the
    chunkwise causal form (the result does not depend on it; memory does), not a local-attention window.

    `mode='predict'` (with `causal=True`) decodes with `labkit.attention.linear.recurrent_step`: per example
    and head a fixed-size state (`phi(k)^T v [H, Hv]` and `sum phi(k) [H]`), constant work per token.
    Not supported (rejected in the constructor): `share_qk`, `n_chunks_before/after` (local windows).
    `attention_dropout` is accepted so Trax models can pass it, but has no effect: linear attention never
    forms the attention matrix it would drop entries from. `output_dropout` works as in Trax.
    """

    unsupported = ("share_qk", "n_chunks")
    decodes = "recurrent"

    def __init__(self, *args, feature_map: FeatureMap = "elu", eps: float = 1e-6, **kwargs):
        super().__init__(*args, **kwargs)
        self._feature_map = feature_map
        self._eps = eps

    def attend(self, q, k, v, mask, rng):
        """Linear attention with the layer's feature map; `chunk_len` is the chunkwise form's chunk."""
        return linear_attention(q, k, v, None, mask, is_causal=self._causal, feature_map=self._feature_map,
                                chunk_size=self._chunk_len, eps=self._eps)

    def init_decoding_state(self):
        """Nothing seen yet: zero sums for one example and head, sized by the feature map's output."""
        features = jax.eval_shape(get_feature_map(self._feature_map), jax.ShapeDtypeStruct((self._d_qk,), jnp.float32))
        return tuple(init_state((), 1, features.shape[-1], self._d_v))

    def decode_step(self, state, q, k, v, mask):
        """The new positions `q, k [L, 1, H]`, `v [L, 1, Hv]` through linear attention's recurrence, in order;
        a hidden position (mask False) leaves the state as it was."""
        keep = jnp.ones(q.shape[0], bool) if mask is None else mask[0, 0]

        def one_token(state, inputs):
            q_t, k_t, v_t, keep_t = inputs
            new, out = recurrent_step(state, q_t, k_t, v_t, feature_map=self._feature_map, eps=self._eps)
            return jax.tree_util.tree_map(lambda a, b: jnp.where(keep_t, a, b), new, state), out

        state, out = jax.lax.scan(one_token, LinearState(*state), (q, k, v, keep))  # Trax keeps plain tuples
        return out, tuple(state)
