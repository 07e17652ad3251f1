"""LEAP attention as a Trax layer with a focus projection (lab 07)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from trax.layers.research.efficient_attention import apply_broadcasted_dropout

from labkit.attention.leap import leap_attention
from labkit.attention.positional import rotary as rotary_embedding
from labkit.layers.base import AttentionLayer


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
