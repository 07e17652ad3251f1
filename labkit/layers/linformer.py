"""Linformer attention as a `tl.SelfAttention`-shaped layer, its layerwise-shared projection, a k schedule (lab 06)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from trax import layers as tl
from trax.layers.research.efficient_attention import apply_broadcasted_dropout

from labkit.attention.linformer import (CHECKPOINT_LEVELS, DOWNSAMPLE_MODES, SHARING_MODES, block_length,
                                        k_schedule, linformer_self_attention)
from labkit.layers.base import refuse


def projection_weight_shape(sharing: str, downsample: str, *, n_heads: int, proj_k: int,
                            max_len: int) -> tuple[int, ...] | None:
    """Shape of one E (or F) weight: linear `[N, k, n]` / `[k, n]`, conv `[N, r]` / `[r]`; None for mean."""
    if sharing not in SHARING_MODES:
        raise ValueError(f"sharing must be one of {SHARING_MODES}, got {sharing!r}")
    if downsample not in DOWNSAMPLE_MODES:
        raise ValueError(f"downsample must be one of {DOWNSAMPLE_MODES}, got {downsample!r}")
    if downsample == "mean":
        return None
    heads = (n_heads,) if sharing == "none" else ()
    if downsample == "conv":
        return heads + (block_length(max_len, proj_k),)
    return heads + (proj_k, max_len)


def _init_projection(rng: jax.Array, shape: tuple[int, ...], downsample: str) -> jnp.ndarray:
    """Normal, std 1/sqrt(fan): k for E (as `init_projections`), the kernel length r for a conv kernel."""
    fan = shape[-1] if downsample == "conv" else shape[-2]
    return jax.random.normal(rng, shape) / fan ** 0.5


class LinformerProjection(tl.Layer):
    """The one projection E (= F) every layer of a model shares (`sharing="layerwise"`), as a layer.

    It takes no input and pushes its weight on top of the stack, where the next
    `LinformerSelfAttention(sharing="layerwise")` takes it as its first input. Use the SAME instance before
    every attention layer (`tl.Serial(shared, attention)`): Trax stores a layer used several times once
    (the later uses get its cached weights), so the model has one E and its gradient sums every layer's.
    """

    def __init__(self, *, max_len: int, proj_k: int, downsample: str = "linear"):
        super().__init__(n_in=0, n_out=1, name="LinformerProjection")
        if downsample == "mean":
            raise ValueError("downsample='mean' has no projection to share: use sharing='none'")
        self._shape = projection_weight_shape("layerwise", downsample, n_heads=1, proj_k=proj_k, max_len=max_len)
        self._downsample = downsample

    def init_weights_and_state(self, input_signature):
        """One E: `[k, n]` (linear) or a kernel `[r]` (conv)."""
        del input_signature
        self.weights = (_init_projection(self.rng, self._shape, self._downsample),)

    def forward(self, inputs):
        """No inputs -> the shared projection."""
        del inputs
        return self.weights[0]


class LinformerSelfAttention(tl.SelfAttention):
    """`tl.SelfAttention` whose attention is Linformer's: keys and values projected along the sequence.

    Same constructor arguments as `tl.SelfAttention`, plus
    - `max_len` (n: longest input; shorter ones are padded with hidden positions) and `proj_k` (k);
    - `downsample`: "linear" (learned E, F `[k, n]`), "conv" (a learned kernel of length r = ceil(n / k),
      applied with stride r) or "mean" (mean pooling over blocks of r, no weights); at most k projected keys;
    - `sharing`: "none" (E, F per head), "headwise" (one E, one F for all heads), "kv" (one E = F), or
      "layerwise" (one E = F for every layer: the layer owns none and takes it as its first input, pushed
      by a `LinformerProjection` shared by all layers; see `linformer_attention_stack`);
    - `checkpoint`: "C0" none, "C1" recompute the whole attention in the backward pass, "C2" also one head
      at a time; same outputs and gradients.
    `attention_dropout` drops the `[T, k]` attention probabilities (the paper's P-bar) in train mode.

    Weights: Trax's `(w_q, w_k, w_v, w_o[, b_q, b_k, b_v])` stacked over heads, then `e_proj` and `f_proj`
    (`n_projections` of them: 2, 1 for "kv", 0 for "mean" and "layerwise"), so
    `layer.weights = trax_layer.weights + layer.weights[len(trax_layer.weights):]` transfers q/k/v/o. With
    `proj_k = max_len = T` and identity E, F it equals `tl.SelfAttention`. Inputs: `x [B, T, d_model]`, then
    `mask [B, T]` when `masked`; with "layerwise" the shared projection comes first: `(e_proj, x[, mask])`
    (Trax pushes a layer's outputs on top of the stack).

    Differences from the other labkit layers, all deliberate: it overrides `forward` rather than
    `forward_unbatched` (a projection shared by heads does not fit Trax's per-head weight slicing, and the
    checkpoint levels need to see all heads) and differentiates it with JAX (`has_backward` is False);
    `n_parallel_heads` and `use_reference_code` therefore change nothing. Linformer has no causal form and no
    fast decoding: `causal=True`, `share_qk`, `chunk_len` and `mode='predict'` are rejected.
    """

    def __init__(self, *args, max_len: int = 512, proj_k: int = 64, sharing: str = "none",
                 downsample: str = "linear", checkpoint: str = "C0", **kwargs):
        refuse("LinformerSelfAttention", ("predict",), mode=kwargs.get("mode", "train"),
               predict_hint=": Linformer has no fast decoding")
        super().__init__(*args, **kwargs)
        refuse("LinformerSelfAttention", ("causal", "share_qk", "chunk_len"), causal=self._causal,
               share_qk=self._share_qk, chunk_len=self._chunk_len)
        self._proj_shape = projection_weight_shape(sharing, downsample, n_heads=self._n_heads, proj_k=proj_k,
                                                   max_len=max_len)
        if sharing == "layerwise":
            if downsample == "mean":
                raise ValueError("downsample='mean' has no projection to share: use sharing='none'")
            self._n_in += 1  # the shared projection arrives as an input
        if checkpoint not in CHECKPOINT_LEVELS:
            raise ValueError(f"checkpoint must be one of {CHECKPOINT_LEVELS}, got {checkpoint!r}")
        self._max_len, self._proj_k, self._sharing, self._checkpoint = max_len, proj_k, sharing, checkpoint
        self._downsample = downsample
        self._stride = None if downsample == "linear" else block_length(max_len, proj_k)

    @property
    def proj_k(self) -> int:
        """k, the most projected keys this layer attends to."""
        return self._proj_k

    @property
    def n_projections(self) -> int:
        """How many projection weights follow the q/k/v/o weights (1 when E = F, 0 without own ones)."""
        if self._sharing == "layerwise" or self._downsample == "mean":
            return 0
        return 1 if self._sharing == "kv" else 2

    def init_weights_and_state(self, input_signature):
        """Trax's q/k/v/o weights and state, then E (and F), normal with std 1/sqrt(k) (conv: 1/sqrt(r))."""
        if self._sharing == "layerwise":
            input_signature = input_signature[1:]  # Trax's weights only depend on x (and the mask)
            input_signature = input_signature[0] if len(input_signature) == 1 else input_signature
        super().init_weights_and_state(input_signature)
        rngs = jax.random.split(jax.random.fold_in(self.rng, 6), max(self.n_projections, 1))
        proj = tuple(_init_projection(r, self._proj_shape, self._downsample) for r in rngs[:self.n_projections])
        self.weights = tuple(self.weights) + proj

    @property
    def has_backward(self):
        return False

    def forward(self, inputs):
        """`x [B, T, d_model]` (mask `[B, T]` when masked; shared E first when layerwise) -> `[B, T, d_model]`."""
        inputs = list(inputs) if isinstance(inputs, (tuple, list)) else [inputs]
        shared = (inputs.pop(0),) if self._sharing == "layerwise" else ()
        x, mask = (inputs[0], inputs[1]) if self._masked else (inputs[0], None)
        x = jnp.asarray(x)
        n = self.n_projections
        qkvo = self.weights[:len(self.weights) - n]
        proj = shared + tuple(self.weights[len(self.weights) - n:])
        attend_rng, output_rng = jax.random.split(self.rng)
        out = linformer_self_attention(
            x, qkvo, proj[0] if proj else None, proj[1] if len(proj) == 2 else None, mask=mask, bias=self._bias,
            checkpoint=self._checkpoint, downsample=self._downsample, stride=self._stride,
            dropout_rate=self._attention_dropout, prng_key=attend_rng)
        # Trax uses one output-dropout mask for every head and example, so dropping the sum is the same.
        return apply_broadcasted_dropout(out, self._output_dropout, output_rng).astype(x.dtype)


def linformer_attention_stack(depth: int, *, max_len: int, proj_k: int | list[int], k_decay: float = 1.0,
                              min_k: int = 1, sharing: str = "none", downsample: str = "linear",
                              **kwargs) -> list[tl.Layer]:
    """One Linformer attention layer per depth, `x [B, T, d_model]` (+ mask) -> `[B, T, d_model]` each.

    `proj_k` is k of the first layer, shrunk with depth by `k_schedule(proj_k, depth, decay=k_decay,
    min_k=min_k)` (the paper's smaller k in deeper layers), or a list of one k per layer. With
    `sharing="layerwise"` every entry is `tl.Serial(shared, attention)` around ONE `LinformerProjection`
    instance, so a model built from them holds a single E (every layer then needs the same k). `kwargs` go
    to every `LinformerSelfAttention` (n_heads, d_qk, d_v, checkpoint, attention_dropout, mode, ...).
    """
    ks = list(proj_k) if isinstance(proj_k, (list, tuple)) else k_schedule(proj_k, depth, decay=k_decay,
                                                                          min_k=min_k)
    if len(ks) != depth:
        raise ValueError(f"proj_k has {len(ks)} entries for depth={depth}")
    layers = [LinformerSelfAttention(max_len=max_len, proj_k=k, sharing=sharing, downsample=downsample, **kwargs)
              for k in ks]
    if sharing != "layerwise":
        return layers
    if len(set(ks)) != 1:
        raise ValueError(f"sharing='layerwise' shares one E, so every layer needs the same k; got {ks}")
    shared = LinformerProjection(max_len=max_len, proj_k=ks[0], downsample=downsample)
    return [tl.Serial(shared, layer) for layer in layers]
