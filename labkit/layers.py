"""Trax layers built on labkit's attention functions: drop-ins for `tl.SelfAttention`.

Each layer subclasses a Trax attention layer, keeps its constructor and weight layout (per head:
`w_q [d_model, d_qk]`, `w_k [d_model, d_qk]` unless `share_qk`, `w_v [d_model, d_v]`,
`w_o [d_v, d_model]`, plus biases when `bias=True`), and overrides only `forward_unbatched`, the
per-example, per-head computation Trax batches with `vmap` (or loops over with
`use_reference_code=True`). Weights copied from a `tl.SelfAttention` therefore give the same outputs.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from trax import layers as tl
from trax.layers.research.efficient_attention import apply_broadcasted_dropout

from labkit.attention.local import length_normalized, local_attention


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


class DotProductSelfAttention(tl.SelfAttention):
    """`tl.SelfAttention` whose per-head attention is `labkit.attention.local.local_attention`.

    Same constructor arguments as `tl.SelfAttention` (full or chunked, causal or not, shared QK, padding
    mask, dropout). One deliberate difference: with `masked=True`, Trax's 1-based position trick
    cannot hide positions 0 and 1; this layer hides exactly the positions the mask marks.
    """

    def forward_unbatched(self, x, mask=None, *, weights, state, rng, update_state):
        """One example, one head: `x [T, d_model]`, `mask [T] | None` -> `(out [T, d_model], state)`."""
        del update_state
        attend_rng, output_rng = jax.random.split(rng)
        q, k, v, w_o = project_qkv(x, weights, share_qk=self._share_qk, bias=self._bias)
        if self._share_qk:
            k = length_normalized(q)
        # [T, dim] -> [T, 1, dim]: the attention functions take a heads axis.
        o = local_attention(
            q[:, None], k[:, None], v[:, None], mask, is_causal=self._causal,
            chunk_len=self._chunk_len, n_chunks_before=self._n_chunks_before,
            n_chunks_after=self._n_chunks_after, exclude_self=self._share_qk,
            dropout_rate=self._attention_dropout, dropout_rng=attend_rng)[:, 0]
        out = apply_broadcasted_dropout(o @ w_o, self._output_dropout, output_rng)
        return out, state
