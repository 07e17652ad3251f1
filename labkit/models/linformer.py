"""A small Linformer encoder in Trax, with the options of the `linformer-pytorch` package (lab 06).

`LinformerEncoder(d_model, ...)` maps `x [B, T, d_model]` to `[B, T, d_model]` (T <= max_len): `depth`
pre-norm residual blocks of Linformer self-attention (`labkit.layers.LinformerSelfAttention`) and a
feed-forward network, then a final LayerNorm. The package's names map to these:

    input_size -> max_len     channels -> d_model     dim_d -> head_dim     dim_k -> k     nhead -> heads
    depth, dim_ff, dropout_ff, activation ("gelu" | "relu")     dropout -> attention_dropout (P-bar)
    checkpoint_level -> checkpoint ("C0" | "C1" | "C2")

plus the paper's options the package lists as future work: `downsample` ("linear" | "conv" | "mean"),
`k_decay` / `min_k` (a k shrinking with depth) and `sharing` ("none" | "headwise" | "kv" | "layerwise").

Checkpoint levels, as in the package: C0 keeps every intermediate; C1 recomputes each attention layer and
each feed-forward block in the backward pass (`Checkpointed`, i.e. `jax.checkpoint`); C2 also recomputes the
attention one head at a time. Outputs and gradients are the same at every level.
"""

from __future__ import annotations

import jax
from trax import layers as tl

from labkit.attention.linformer import CHECKPOINT_LEVELS
from labkit.layers.linformer import linformer_attention_stack

ACTIVATIONS = {"gelu": tl.Gelu, "relu": tl.Relu}


class Checkpointed(tl.Layer):
    """`layer`, recomputed in the backward pass instead of keeping its intermediates (`jax.checkpoint`).

    Same inputs, outputs, weights and rng as `layer` (its rng is passed through unchanged, so dropout draws
    the same masks as without the wrapper).
    """

    def __init__(self, layer: tl.Layer):
        super().__init__(n_in=layer.n_in, n_out=layer.n_out, name=f"Checkpointed{layer.name}")
        self._sublayers = [layer]

    def init_weights_and_state(self, input_signature):
        """The wrapped layer's weights and state."""
        weights, state = self.sublayers[0].init(input_signature, use_cache=True)
        self.state, self.weights = (state,), (weights,)

    def forward(self, inputs):
        """The wrapped layer's outputs, under `jax.checkpoint`."""
        layer = self.sublayers[0]
        run = jax.checkpoint(lambda x, w, s, rng: layer.pure_fn(x, w, s, rng))
        outputs, state = run(inputs, self.weights[0], self.state[0], self.rng)
        self.state = (state,)
        return outputs


def _feed_forward(d_model: int, dim_ff: int, dropout_ff: float, activation: str, mode: str) -> tl.Layer:
    """Pre-norm feed-forward `[B, T, d_model]` -> `[B, T, d_model]`: Dense, activation, dropout, Dense."""
    return tl.Serial(tl.LayerNorm(), tl.Dense(dim_ff), ACTIVATIONS[activation](),
                     tl.Dropout(rate=dropout_ff, mode=mode), tl.Dense(d_model))


def LinformerEncoder(d_model: int, *, max_len: int, k: int | list[int], depth: int = 2, heads: int = 4,  # noqa: N802
                     head_dim: int | None = None, dim_ff: int | None = None, dropout_ff: float = 0.0,
                     attention_dropout: float = 0.0, activation: str = "gelu", k_decay: float = 1.0,
                     min_k: int = 1, sharing: str = "none", downsample: str = "linear", checkpoint: str = "C0",
                     mode: str = "train") -> tl.Serial:
    """A Linformer encoder `x [B, T, d_model]` -> `[B, T, d_model]`, T <= max_len (see the module docstring).

    `k` is the first layer's projected length (a list gives one per layer); deeper layers use
    `k_schedule(k, depth, decay=k_decay, min_k=min_k)`. `head_dim` defaults to `d_model // heads`, `dim_ff`
    to `4 * d_model`. Trax-named builder (CamelCase, like `trax.models.TransformerEncoder`).
    """
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {activation!r}")
    if checkpoint not in CHECKPOINT_LEVELS:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_LEVELS}, got {checkpoint!r}")
    head_dim = head_dim or d_model // heads
    attentions = linformer_attention_stack(
        depth, max_len=max_len, proj_k=k, k_decay=k_decay, min_k=min_k, sharing=sharing, downsample=downsample,
        n_heads=heads, d_qk=head_dim, d_v=head_dim, attention_dropout=attention_dropout,
        checkpoint=checkpoint, mode=mode)
    blocks = []
    for attention in attentions:
        ff = _feed_forward(d_model, dim_ff or 4 * d_model, dropout_ff, activation, mode)
        blocks += [tl.Residual(tl.LayerNorm(), attention), tl.Residual(ff if checkpoint == "C0" else Checkpointed(ff))]
    return tl.Serial(*blocks, tl.LayerNorm())
