"""Exact chunked attention (Rabe & Staats) as a `tl.SelfAttention` drop-in (lab 03)."""

from __future__ import annotations

from labkit.attention.chunked import memory_efficient_attention
from labkit.layers.base import AttentionLayer


class MemoryEfficientSelfAttention(AttentionLayer):
    """`tl.SelfAttention` computed by `labkit.attention.chunked.memory_efficient_attention` (Rabe & Staats).

    Same constructor arguments and weights as `tl.SelfAttention`, plus `query_chunk_size`, `key_chunk_size`
    (None: this CPU's tuned sizes, else 512), `checkpoint` and `skip_blocks` (see `memory_efficient_attention`).
    Weights copied from a `tl.SelfAttention` give the same outputs and gradients (exact attention, float
    rounding apart), while each head holds at most one `[query_chunk, key_chunk]` block of scores. With `masked=True` the mask hides
    exactly the positions it marks (as `DotProductSelfAttention`).

    Not supported (rejected in the constructor): `share_qk`, `chunk_len` (local windows: use
    `DotProductSelfAttention`), `attention_dropout > 0` in training (the attention matrix it would drop entries
    from never exists). `output_dropout` works as in Trax. `mode='predict'` (with `causal=True`) decodes from a
    key-value cache: each new token attends, chunk by chunk, to every earlier position in Trax's memory.

    TFLite export (`labkit.export.to_tflite`): build it with `use_reference_code=True` (Trax then loops over
    examples and heads instead of `vmap`, keeping tensors within TFLite's 5 dimensions) and
    `skip_blocks=False` (no conditionals inside loops).
    """

    unsupported = ("share_qk", "chunk_len", "attention_dropout")
    decodes = "cache"

    def __init__(self, *args, query_chunk_size: int | None = None, key_chunk_size: int | None = None,
                 checkpoint: bool = True, skip_blocks: bool = True,
                 **kwargs):
        super().__init__(*args, **kwargs)
        self._chunk_options = dict(query_chunk_size=query_chunk_size, key_chunk_size=key_chunk_size,
                                   checkpoint=checkpoint, skip_blocks=skip_blocks)

    def attend(self, q, k, v, mask, rng, *, is_causal: bool | None = None):
        """Exact attention, block by block; `is_causal` defaults to the layer's `causal`."""
        is_causal = self._causal if is_causal is None else is_causal
        return memory_efficient_attention(q, k, v, None, mask, is_causal=is_causal, **self._chunk_options)
