"""The one adapter every family's layer uses: Trax's projections, `refuse` for options a family cannot honour.

Predict mode (Trax's fast decoding: `mode='predict'`, one call per new token, `predict_mem_len` positions of
input memory kept in the layer's state by Trax) comes in two kinds, chosen by what the family can do:

* a key-value cache (`decodes = "cache"`, exact families): each call attends from the new positions to every
  position in Trax's memory so far, the way `tl.SelfAttention` decodes; work per token grows with the prefix.
* a recurrent state (`decodes = "recurrent"`: linear, kernel): the layer keeps, per example and head, the
  fixed-size state its `decode_step` updates, and no memory of past inputs at all. Such a layer is built by
  Trax as an 'eval' layer (so Trax allocates no input memory and needs no `predict_mem_len`), then marked
  'predict': `forward_unbatched` continues the state with the positions of each call. Work and state per token
  stay constant however long the prefix.
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
        predict = kwargs.get("mode") == "predict"
        if predict and not kwargs.get("causal"):  # Trax would only assert it
            raise ValueError(f"{type(self).__name__}: mode='predict' decodes left to right, so it needs causal=True")
        recurrent = predict and self.decodes == "recurrent"
        if recurrent:
            kwargs["mode"] = "eval"  # no Trax input memory (see the module docstring); marked 'predict' below
        super().__init__(*args, **kwargs)
        if recurrent:
            self._mode = "predict"
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
        """One example, one head: `x [T, d_model]`, `mask [T] | None` -> `(out [T, d_model], state)`.

        When decoding recurrently, the T positions continue `state` (no dropout: predict mode is inference).
        """
        del update_state
        attend_rng, output_rng = jax.random.split(rng)  # Trax's split, so dropout masks agree
        q, k, v, w_o = self.project(x, weights)
        key_mask = None if mask is None else jnp.asarray(mask, bool)[None, None, :]  # [T] -> [N 1, 1, S]
        # [T, dim] -> [T, 1, dim]: the attention functions take a heads axis.
        if self._decodes_recurrently:
            o, state = self.decode_step(state, q[:, None], k[:, None], v[:, None], key_mask)
            return o[:, 0] @ w_o, state
        o = self.attend(q[:, None], k[:, None], v[:, None], key_mask, attend_rng)[:, 0]
        out = apply_broadcasted_dropout(o @ w_o, self._output_dropout, output_rng)
        return out, state

    def init_decoding_state(self) -> tuple:
        """One example's, one head's recurrent state before any token, as a tuple (`decodes = "recurrent"`)."""
        raise NotImplementedError

    def decode_step(self, state: tuple, q, k, v, mask) -> tuple[jnp.ndarray, tuple]:
        """Continue `state` with L new positions: `q, k [L, 1, H]`, `v [L, 1, Hv]`, `mask [1, 1, L] | None`
        -> `(out [L, 1, Hv], state)` (`decodes = "recurrent"` layers)."""
        raise NotImplementedError

    @property
    def _decodes_recurrently(self) -> bool:
        return self.decodes == "recurrent" and self._mode == "predict"

    def create_state_unbatched(self, input_signature, rng):
        """Per example and head: the recurrent state when decoding recurrently, nothing otherwise (as Trax)."""
        if self._decodes_recurrently:
            return self.init_decoding_state()
        return super().create_state_unbatched(input_signature, rng)

    def _incremental_forward_unbatched(self, x, mask=None, *, q_start, q_len, weights, state, rng, update_state):
        """Predict mode with Trax's input memory (`decodes = "cache"`): `x [mem_len, d_model]`, positions
        `q_start .. q_start + q_len - 1` new -> `(out [q_len, d_model], state)`."""
        if self.decodes is None:  # Trax's own decoding (DotProductSelfAttention: tl.SelfAttention's maths)
            return super()._incremental_forward_unbatched(x, mask, q_start=q_start, q_len=q_len, weights=weights,
                                                          state=state, rng=rng, update_state=update_state)
        del update_state
        _, output_rng = jax.random.split(rng)
        o = self._cached_decode(x, mask, q_start, q_len, weights)
        return apply_broadcasted_dropout(o, self._output_dropout, output_rng), state

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
