"""Kernel attention (FAVOR+ and Model Garden's other feature maps) as a `tl.SelfAttention`-shaped layer (lab 05)."""

from __future__ import annotations

import jax

from labkit.attention.kernel import (KernelCache, check_streamable, init_kernel_cache, kernel_attention,
                                     kernel_attention_step)
from labkit.layers.base import AttentionLayer


class KernelSelfAttention(AttentionLayer):
    """`tl.SelfAttention` whose per-head attention is `labkit.attention.kernel.kernel_attention` (FAVOR+ & co).

    Same constructor arguments and weights as `tl.SelfAttention`, plus Model Garden's `KernelAttention` options:
    `feature_transform` ("exp" = FAVOR+, "expplus", "expmod", "relu", "elu", "square", "identity"/None),
    `num_random_features`, `seed` (the fixed projection's key `PRNGKey(seed)`, shared by all heads, as there),
    `redraw` (mode 'train': a new projection each call, drawn from the per-example, per-head rng Trax passes;
    'eval' keeps the fixed one), `is_short_seq`, `begin_kernel`, `scale`, `scale_by_length`,
    `use_causal_windowed` with `causal_chunk_length`, `causal_window_length`, `causal_window_decay`,
    `causal_padding` (these need `causal=True`). `chunk_len`, if given, is lab 04's chunk size for the plain
    causal form (the result does not depend on it). With `feature_transform=None, num_random_features=0,
    is_short_seq=True` (or `begin_kernel >= length`) the layer computes exactly `tl.SelfAttention`.

    `mode='predict'` (needs `causal=True`): fast decoding as Trax's, one call per token (or a prompt first),
    equal to the full causal output. The layer's state holds each (example, head)'s `KernelCache` (the
    feature-space sums, constant size) instead of Trax's memory of past inputs; windowed calls bring whole
    chunks (token by token: `causal_chunk_length=1`). Refused there: `expplus`, `is_short_seq`,
    `begin_kernel`, `scale_by_length` (see `labkit.attention.kernel.check_streamable`).

    Not supported (rejected in the constructor): `share_qk`, `n_chunks_before/after`. `attention_dropout` is
    accepted but has no effect (no attention matrix to drop entries from in the linear forms);
    `output_dropout` works as in Trax.
    """

    unsupported = ("share_qk", "n_chunks")
    decodes = "recurrent"

    def __init__(self, *args, feature_transform="exp", num_random_features: int = 256, seed: int = 0,
                 redraw: bool = False, is_short_seq: bool = False, begin_kernel: int = 0, scale=None,
                 scale_by_length: bool = False, use_causal_windowed: bool = False, causal_chunk_length: int = 1,
                 causal_window_length: int = 3, causal_window_decay=None, causal_padding=None, **kwargs):
        super().__init__(*args, **kwargs)
        if use_causal_windowed and not self._causal:
            raise ValueError("use_causal_windowed=True needs causal=True")
        if redraw and num_random_features <= 0:
            raise ValueError("there is nothing to redraw when num_random_features <= 0")
        if self._mode == "predict":
            check_streamable(feature_transform, is_short_seq=is_short_seq, begin_kernel=begin_kernel,
                             scale_by_length=scale_by_length)
        self._redraw, self._fixed_key = redraw, jax.random.PRNGKey(seed)
        self._stream_options = dict(
            feature_transform=feature_transform, num_random_features=num_random_features, scale=scale,
            causal_chunk_length=causal_chunk_length if use_causal_windowed else self._chunk_len,
            causal_window_length=causal_window_length if use_causal_windowed else None,
            causal_window_decay=causal_window_decay)
        self._kernel_options = dict(self._stream_options, is_short_seq=is_short_seq, begin_kernel=begin_kernel,
                                    scale_by_length=scale_by_length, causal_padding=causal_padding)

    def attend(self, q, k, v, mask, rng):
        """Kernel attention; the projection is redrawn from this call's rng only when training with `redraw`."""
        key = rng if self._redraw and self._mode == "train" else self._fixed_key
        return kernel_attention(q, k, v, None, mask, is_causal=self._causal, prng_key=key, **self._kernel_options)

    def init_decoding_state(self):
        """One (example, head)'s empty `KernelCache`, as a plain tuple (Trax stacks tuples)."""
        return tuple(init_kernel_cache((), 1, self._d_qk, self._d_v,
                                       num_random_features=self._stream_options["num_random_features"],
                                       causal_window_length=self._stream_options["causal_window_length"]))

    def decode_step(self, state, q, k, v, mask):
        """The new positions continue the feature-space sums (`labkit.attention.kernel.kernel_attention_step`)."""
        cache, o = kernel_attention_step(KernelCache(*state), q, k, v, mask, prng_key=self._fixed_key,
                                         **self._stream_options)
        return o, tuple(cache)
