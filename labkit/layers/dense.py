"""Dense (and Trax-style local) softmax attention as a `tl.SelfAttention` drop-in (lab 01)."""

from __future__ import annotations

from labkit.attention.local import length_normalized, local_attention
from labkit.layers.base import AttentionLayer, project_qkv


class DotProductSelfAttention(AttentionLayer):
    """`tl.SelfAttention` whose per-head attention is `labkit.attention.local.local_attention`.

    Same constructor arguments as `tl.SelfAttention` (full or chunked, causal or not, shared QK, padding
    mask, dropout). One deliberate difference: with `masked=True`, Trax's 1-based position trick
    cannot hide positions 0 and 1; this layer hides exactly the positions the mask marks.
    """

    def project(self, x, weights):
        """Trax's projections; with shared QK the keys are the length-normalised queries."""
        q, k, v, w_o = project_qkv(x, weights, share_qk=self._share_qk, bias=self._bias)
        return q, length_normalized(q) if self._share_qk else k, v, w_o

    def attend(self, q, k, v, mask, rng):
        """Chunked local attention with Trax's options."""
        return local_attention(q, k, v, None, mask, is_causal=self._causal, chunk_len=self._chunk_len,
                               n_chunks_before=self._n_chunks_before, n_chunks_after=self._n_chunks_after,
                               exclude_self=self._share_qk, dropout_rate=self._attention_dropout, prng_key=rng)
