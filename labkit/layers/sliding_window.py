"""Sliding-window (banded) exact attention as a `tl.SelfAttention`-shaped layer."""

from __future__ import annotations

from labkit.attention._validate import positive_int
from labkit.attention.sliding_window import sliding_window_attention
from labkit.layers.base import AttentionLayer


class SlidingWindowSelfAttention(AttentionLayer):
    """`tl.SelfAttention` restricted to a band: `labkit.attention.sliding_window.sliding_window_attention`.

    Same constructor arguments and weights as `tl.SelfAttention`, plus `window` (query i sees keys
    `i - window < j <= i` when `causal`, `|i - j| < window` otherwise) and `block_size` (queries per block,
    default `window`; memory only). With `window >= T` it computes exactly `tl.SelfAttention`. With
    `masked=True` the mask hides exactly the positions it marks (as `DotProductSelfAttention`).

    Not supported (rejected in the constructor): `share_qk`, `chunk_len` and `n_chunks_before/after` (the
    band is `window`, not Trax's wrapped chunks), `attention_dropout > 0` and `mode='predict'`.
    """

    unsupported = ("predict", "share_qk", "attention_dropout", "chunk_len", "n_chunks")

    def __init__(self, *args, window: int, block_size: int | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        positive_int("window", window)
        positive_int("block_size", block_size, allow_none=True)
        self._window, self._block_size = window, block_size

    def attend(self, q, k, v, mask, rng):
        """Band-limited exact attention, block by block."""
        return sliding_window_attention(q, k, v, None, mask, is_causal=self._causal, window=self._window,
                                        block_size=self._block_size)
