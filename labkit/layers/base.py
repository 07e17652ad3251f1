"""The one adapter every family's layer uses: Trax's projections, `refuse` for options a family cannot honour."""

from __future__ import annotations

from typing import ClassVar

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
