"""Linformer attention as a `tl.SelfAttention`-shaped layer (lab 06)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from trax import layers as tl
from trax.layers.research.efficient_attention import apply_broadcasted_dropout

from labkit.attention.linformer import CHECKPOINT_LEVELS, linformer_self_attention, projection_shape
from labkit.layers.base import refuse


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
