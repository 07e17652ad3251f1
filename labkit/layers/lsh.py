"""LSH attention as a `tl.LSHSelfAttention` drop-in (lab 02)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from trax import layers as tl
from trax.layers.research.efficient_attention import apply_broadcasted_dropout

from labkit.attention.lsh import default_n_buckets, lsh_attention_head, lsh_buckets
from labkit.layers.base import project_qkv


class LSHSelfAttention(tl.LSHSelfAttention):
    """`tl.LSHSelfAttention` whose per-head attention is built from `labkit.attention.lsh`.

    Same constructor, weights (`w_q, w_v, w_o`: queries and keys are shared) and state (per example and
    head: the last bucket ids and the hashing rng). Given the same weights, state and rng it returns
    Trax's outputs and new state. Differences, both deliberate: `bias=True` works (Trax's forward
    cannot unpack the biases), and with `masked=True` exactly the marked positions are hidden (Trax's
    sign trick on 1-based positions cannot hide positions 0 and 1).
    """

    def forward_unbatched(self, x, mask=None, *, weights, state, rng, update_state):
        """One example, one head: `x [T, d_model]`, `mask [T] | None` -> `(out [T, d_model], state)`."""
        attend_rng, output_rng = jax.random.split(rng)
        q, _, v, w_o = project_qkv(x, weights, share_qk=True, bias=self._bias)
        seq_len = x.shape[0]
        if update_state:
            # Fresh hashes each call: advance the per-head rng kept in the state, as Trax does.
            _, old_hash_rng = state
            hash_rng, hash_subrng = jax.random.split(old_hash_rng)
            n_buckets = self._n_buckets or default_n_buckets(seq_len, self._chunk_len)
            buckets = lsh_buckets(q, n_buckets, self._n_hashes, hash_subrng, mask)
            stored = buckets
            if self._max_length_for_buckets:  # the state has a fixed size: pad the ids
                stored = jnp.pad(buckets, (0, self._n_hashes * self._max_length_for_buckets - buckets.shape[0]))
            state = (stored, hash_rng)
        else:
            # Re-use the hashes of the forward pass (e.g. when recomputing it for the backward pass).
            buckets = state[0][:self._n_hashes * seq_len]
        o = lsh_attention_head(
            q, v, buckets, mask, n_hashes=self._n_hashes, is_causal=self._causal, chunk_len=self._chunk_len,
            n_chunks_before=self._n_chunks_before, n_chunks_after=self._n_chunks_after,
            dropout_rate=self._attention_dropout, prng_key=attend_rng)
        out = apply_broadcasted_dropout(o @ w_o, self._output_dropout, output_rng)
        return out, state
