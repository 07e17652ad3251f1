"""LEAP attention as a Trax layer with a focus projection, and its recurrent decoding mode (lab 07)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from trax.layers.research.efficient_attention import apply_broadcasted_dropout

from labkit.attention.leap import LEAPState, LEAPWindowState, init_state, leap_attention, leap_logits, leap_step
from labkit.attention.positional import POSITION_EMBEDDINGS, alibi_slopes
from labkit.layers.base import AttentionLayer


class LEAPSelfAttention(AttentionLayer):
    """LEAP attention (`labkit.attention.leap`) as a Trax layer: four projections per head instead of three.

    Weight layout (stacked over heads by Trax, so each entry has a leading `n_heads` axis):
    `(w_q, w_f, w_k, w_v, w_o)` with `w_q, w_f, w_k [d_model, d_qk]`, `w_v [d_model, d_v]`,
    `w_o [d_v, d_model]`; with `bias=True` followed by `(b_q, b_f, b_k, b_v)`. So it is NOT weight-compatible
    with `tl.SelfAttention` (which has no focus projection `w_f`). Per head: `q, f, k, v = x @ w_* (+ b_*)`,
    `o = leap_attention(q, k, v, focus=f)`, and the layer returns the sum over heads of `o @ w_o`.

    Extra constructor arguments: `window` (None = global LEAP), `rescale` (None or the strong-scaling
    constant), `position_embedding` ("none"; "rotary": q, f, k rotated by their positions; "alibi": ALiBi's
    geometric per-head slopes on the focus logits, causal only). `causal=True` is decoder LEAP; `causal=False`
    is the bidirectional form (mean of a left-to-right and a right-to-left pass). `masked=True`: padding
    positions (mask False) get no focus. `attention_dropout` is accepted but unused (no attention matrix
    is formed); `output_dropout` works as in Trax. Rejected: `share_qk`, `chunk_len`/`n_chunks_*`
    (use `window`).

    `mode='predict'` (causal only) decodes: the layer's state holds, per example and head, LEAP's recurrent
    summary (`leap.init_state`: O(d) numbers, O(w d) with a window) and the next absolute position, and each
    call consumes the next token(s) with `leap_step`, as Trax's fast inference does with a cache of inputs.
    A layer whose state is per example (predict mode, ALiBi) must be called with the batch size it was
    initialised with.
    """

    unsupported = ("share_qk",)
    decodes = "recurrent"  # the adapter builds predict mode as an eval layer with a state of LEAP summaries

    def __init__(self, *args, window: int | None = None, rescale: float | None = None,
                 position_embedding: str = "none", **kwargs):
        super().__init__(*args, **kwargs)
        if self._chunk_len is not None or self._n_chunks_before or self._n_chunks_after:
            raise ValueError("LEAPSelfAttention takes window=..., not chunk_len/n_chunks_before/n_chunks_after")
        if position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {position_embedding!r}")
        if not self._causal and position_embedding == "alibi":
            raise ValueError("LEAPSelfAttention: position_embedding='alibi' needs causal=True")
        self._window = window
        self._rescale = rescale
        self._position_embedding = position_embedding

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

    def init_decoding_state(self) -> tuple:
        """One example's, one head's LEAP summary before any token (`leap.init_state`), as a tuple."""
        return tuple(init_state((), 1, self._d_qk, self._d_v, window=self._window))

    def init_weights_and_state(self, input_signature):
        """Trax's weights; state per (example, head), stacked `[B * N, ...]`: the ALiBi slope, then the
        recurrent LEAP state in predict mode; `()` when neither is needed (as in `tl.SelfAttention`)."""
        super().init_weights_and_state(input_signature)  # the recurrent states, stacked by Trax
        if not self._decodes_recurrently and self._position_embedding != "alibi":
            return
        x = input_signature[0] if isinstance(input_signature, (tuple, list)) else input_signature
        rows = int(x.shape[0]) * self._n_heads  # Trax's order: index = example * n_heads + head
        self.state = (jnp.tile(alibi_slopes(self._n_heads), rows // self._n_heads),) + tuple(self.state)

    def forward(self, inputs):
        """Trax's forward, after checking that a per-example state matches the batch."""
        x = inputs[0] if isinstance(inputs, (tuple, list)) else inputs
        if self.state and self.state[0].shape[0] != x.shape[0] * self._n_heads:
            raise ValueError(f"LEAPSelfAttention(mode={self._mode!r}, position_embedding="
                             f"{self._position_embedding!r}) keeps state per example: initialised for batch "
                             f"{self.state[0].shape[0] // self._n_heads}, called with batch {x.shape[0]}")
        return super().forward(inputs)

    def _project(self, x, weights):
        """`x [T, d_model]` -> `(q, f, k, v [T, 1, *], w_o)`: one head's projections with a heads axis."""
        w_q, w_f, w_k, w_v, w_o = weights[:5]
        b_q, b_f, b_k, b_v = weights[5:] if self._bias else (0.0,) * 4
        return tuple((x @ w + b)[:, None] for w, b in ((w_q, b_q), (w_f, b_f), (w_k, b_k), (w_v, b_v))) + (w_o,)

    def logits(self, x, weights=None) -> tuple[jnp.ndarray, jnp.ndarray]:
        """The causal layer's raw logits on its input `x [B, T, d_model]`: `(focus, gate)`, each `[B, T, N]`
        (`leap.leap_logits` per head, with this layer's options and `weights`, default its own)."""
        weights = self.weights if weights is None else weights
        slopes = alibi_slopes(self._n_heads) if self._position_embedding == "alibi" else None

        def one_head(w, slope):
            q, f, k, v, _ = jax.vmap(self._project, in_axes=(0, None))(x, w)  # [B, T, 1, *]
            return leap_logits(q, k, v, focus=f, window=self._window, rescale=self._rescale,
                               position_embedding=self._position_embedding, alibi=slope)

        focus, gate = jax.vmap(one_head, in_axes=(0, None if slopes is None else 0))(
            weights, None if slopes is None else slopes[:, None])
        return focus[..., 0].transpose(1, 2, 0), gate[..., 0].transpose(1, 2, 0)

    def _decode(self, q, f, k, v, mask, slope, recurrent):
        """Predict mode: `leap_step` over the call's tokens `[T, 1, *]` -> `(o [T, 1, d_v], recurrent')`."""
        cls = LEAPState if self._window is None else LEAPWindowState
        keep = jnp.ones(q.shape[:1], bool) if mask is None else jnp.asarray(mask, bool)

        def step(carry, token):
            q_t, f_t, k_t, v_t, keep_t = token
            return leap_step(carry, q_t, f_t, k_t, v_t, mask_t=keep_t, rescale=self._rescale,
                             position_embedding=self._position_embedding, alibi=slope)

        new, o = jax.lax.scan(step, cls(*recurrent), (q, f, k, v, keep))
        return o, tuple(new)

    def forward_unbatched(self, x, mask=None, *, weights, state, rng, update_state):
        """One example, one head: `x [T, d_model]`, `mask [T] | None` -> `(out [T, d_model], state)`."""
        del update_state
        _, output_rng = jax.random.split(rng)  # Trax's split, so dropout masks agree
        q, f, k, v, w_o = self._project(x, weights)
        slope = state[0][None] if self._position_embedding == "alibi" else None  # this head's slope, [N=1]
        if self._decodes_recurrently:
            o, recurrent = self._decode(q, f, k, v, mask, slope, state[1:])
            state = (state[0],) + recurrent
        else:
            key_mask = None if mask is None else jnp.asarray(mask, bool)[None, None, :]  # [T] -> [N 1, 1, T]
            o = leap_attention(q, k, v, None, key_mask, focus=f, is_causal=self._causal, window=self._window,
                               rescale=self._rescale, position_embedding=self._position_embedding, alibi=slope)
        return apply_broadcasted_dropout(o[:, 0] @ w_o, self._output_dropout, output_rng), state
