"""The one adapter every family's layer uses: Trax's projections, `refuse` for options a family cannot honour.

Predict mode (Trax's fast decoding: `mode='predict'`, one call per new token, `predict_mem_len` positions of
input memory kept in the layer's state by Trax) comes in two kinds, chosen by what the family can do:

* a key-value cache (`decodes = "cache"`, exact families): each call attends from the new positions to every
  position in Trax's memory so far, the way `tl.SelfAttention` decodes; work per token grows with the prefix.
* a recurrent state (`decodes = "recurrent"`: linear, kernel, LEAP): the layer keeps, per example and head, the
  fixed-size state its `decode_step` updates, and reads only the new positions from Trax's memory; work and
  state per token stay constant however long the prefix.
"""

from __future__ import annotations

from typing import Any, ClassVar

import jax
import jax.numpy as jnp
from trax import layers as tl
from trax.layers.research.efficient_attention import apply_broadcasted_dropout


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
    decodes: ClassVar[str | None] = None  # "cache" or "recurrent" (see the module docstring); None: no predict

    def __init__(self, *args, **kwargs):
        refuse(type(self).__name__, ("predict",) if "predict" in self.unsupported else (),
               mode=kwargs.get("mode", "train"), predict_hint=self.predict_hint)
        if kwargs.get("mode") == "predict" and not kwargs.get("causal"):  # Trax would only assert it
            raise ValueError(f"{type(self).__name__}: mode='predict' decodes left to right, so it needs causal=True")
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

    def init_decoding_state(self) -> Any:
        """One example's, one head's recurrent state before any token (`decodes = "recurrent"` layers)."""
        raise NotImplementedError

    def decode_step(self, state, q, k, v) -> tuple[jnp.ndarray, Any]:
        """One token, one head: `q, k [1, 1, H]`, `v [1, 1, Hv]` -> `(out [1, 1, Hv], state)`."""
        raise NotImplementedError

    def create_state_unbatched(self, input_signature, rng):
        """Per example and head: the recurrent state in predict mode, nothing otherwise (as Trax)."""
        if self._incremental and self.decodes == "recurrent":
            return self.init_decoding_state()
        return super().create_state_unbatched(input_signature, rng)

    def _incremental_forward_unbatched(self, x, mask=None, *, q_start, q_len, weights, state, rng, update_state):
        """Predict mode, one example and head: `x [mem_len, d_model]` is Trax's memory, positions
        `q_start .. q_start + q_len - 1` are new -> `(out [q_len, d_model], state)`."""
        if self.decodes is None:  # Trax's own decoding (DotProductSelfAttention: tl.SelfAttention's maths)
            return super()._incremental_forward_unbatched(x, mask, q_start=q_start, q_len=q_len, weights=weights,
                                                          state=state, rng=rng, update_state=update_state)
        del update_state
        _, output_rng = jax.random.split(rng)
        if self.decodes == "recurrent":
            o, state = self._recurrent_decode(jax.lax.dynamic_slice_in_dim(x, q_start, q_len), weights, state)
        else:
            o = self._cached_decode(x, mask, q_start, q_len, weights)
        return apply_broadcasted_dropout(o, self._output_dropout, output_rng), state

    def _recurrent_decode(self, new_x, weights, state):
        """Feed the new positions `new_x [q_len, d_model]` through `decode_step` one at a time."""
        q, k, v, w_o = self.project(new_x, weights)

        def one_token(state, qkv):
            q_t, k_t, v_t = (a[None, None] for a in qkv)  # [dim] -> [T 1, N 1, dim]
            o_t, state = self.decode_step(state, q_t, k_t, v_t)
            return state, o_t[0, 0]

        state, o = jax.lax.scan(one_token, state, (q, k, v))
        return o @ w_o, state

    def _cached_decode(self, x, mask, q_start, q_len, weights):
        """Attend from the new positions to all of Trax's memory up to them (an exact family's KV cache).

        Calls `attend(..., is_causal=False)` with causality spelled out as a full `[1, q_len, mem_len]` mask,
        so a `decodes = "cache"` layer's `attend` takes `is_causal` and full masks.
        """
        q, k, v, w_o = self.project(x, weights)
        q_new = jax.lax.dynamic_slice_in_dim(q, q_start, q_len)
        keep = jnp.arange(x.shape[0])[None, :] <= (q_start + jnp.arange(q_len))[:, None]  # [T q_len, S mem_len]
        if mask is not None:
            keep = keep & jnp.asarray(mask, bool)[None, :]
        # [len, dim] -> [len, N 1, dim]; keep [T, S] -> [N 1, T, S]
        o = self.attend(q_new[:, None], k[:, None], v[:, None], keep[None], None, is_causal=False)[:, 0]
        return o @ w_o
