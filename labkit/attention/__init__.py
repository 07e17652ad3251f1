"""labkit's attention families, one contract, and `FAMILIES`: the registry that layers, bench and tests read.

Every function follows `jax.nn.dot_product_attention`'s conventions, so a JAX user can swap one for another:

    fn(query, key, value, bias=None, mask=None, *, is_causal=False, scale=None, <family options>)

Shape letters, used in every docstring of the package:
    B   batch dims (zero or more leading axes, written `batch...`)
    T   query length            S   key/value length (T == S for self-attention-only families)
    N   heads                   H   query/key head dim        Hv  value head dim (may differ from H)
    K   a projected length (Linformer's k), M a number of random features (kernel attention)
Layout: query `[batch..., T, N, H]`, key `[batch..., S, N, H]`, value `[batch..., S, N, Hv]` -> output
`[batch..., T, N, Hv]` in value's dtype (softmax statistics in float32).

`bias` is added to the scaled logits and `mask` hides keys (True = keep); both broadcast to
`[batch..., N, T, S]`. Families that never form the scores accept only what they can apply: a key-padding
mask (`[batch..., N or 1, 1, S]`, one row for every query) and no bias; they say so with a `ValueError`
naming the argument and the shapes seen. `scale` defaults to `1/sqrt(H)`. Randomness (hash rotations, random
features, dropout) comes from one keyword, `prng_key`. Lengths that chunk or block sizes do not divide are
padded and masked, never rejected.

Adding a family: see CONTRIBUTING.md (its module, one `Family` entry below, its layer in `labkit.layers`).
"""

from __future__ import annotations

import dataclasses
import inspect
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp

from labkit.attention.chunked import memory_efficient_attention
from labkit.attention.dense import dot_product_attention
from labkit.attention.flash import flash_attention, memory_model as _flash_memory
from labkit.attention.kernel import kernel_attention
from labkit.attention.leap import leap_attention
from labkit.attention.linear import linear_attention
from labkit.attention.linformer import linformer_attention
from labkit.attention.local import local_attention
from labkit.attention.lsh import lsh_attention
from labkit.attention.ring import memory_model as _ring_memory, sharded_ring_attention
from labkit.attention.sliding_window import memory_model as _sliding_window_memory, sliding_window_attention

FLOAT_BYTES = 4


class Problem(NamedTuple):
    """One attention call's size, float32: what a memory model is asked about."""

    batch: int
    seq_len: int
    heads: int
    head_dim: int
    causal: bool = False
    backward: bool = False

    @property
    def io_bytes(self) -> int:
        """q, k, v and the output (and their gradients with backward)."""
        return (8 if self.backward else 4) * self.batch * self.seq_len * self.heads * self.head_dim * FLOAT_BYTES

    @property
    def score_bytes(self) -> int:
        """One full `[batch, N, T, S]` score matrix."""
        return self.batch * self.heads * self.seq_len ** 2 * FLOAT_BYTES


@dataclasses.dataclass(frozen=True)
class Family:
    """One attention family: its function and what layers, bench and the contract tests need to know.

    `causal` lists the `is_causal` values it supports; `mask` is "full" (any `[batch..., N, T, S]` mask),
    "keys" (key padding only) or "none"; `shared_qk` families take `key=None` (keys are derived from the
    queries); `self_only` families need T == S. `extra_inputs(prng_key, query, key, value)` returns the
    keyword inputs the family needs beyond q, k, v (LEAP's focus, Linformer's projections); `options` are the
    defaults bench calls it with, `small_options` what tests and examples on a few dozen positions use (chunk
    sizes that do not divide their lengths); `memory(problem, options)` estimates one call's peak extra bytes.
    `layer` names its Trax layer in `labkit.layers` (a string: this package never imports Trax) and
    `layer_options` what that layer is built with on top of `tl.SelfAttention`'s arguments in the tests.
    """

    name: str
    function: Callable
    exact: bool
    lab: str | None  # the lab that teaches it, if one does
    memory: Callable[[Problem, dict], int]
    causal: tuple[bool, ...] = (False, True)
    bias: bool = False
    mask: str = "keys"
    shared_qk: bool = False
    self_only: bool = False
    extra_inputs: Callable[..., dict] | None = None
    options: dict = dataclasses.field(default_factory=dict)
    small_options: dict = dataclasses.field(default_factory=dict)
    layer: str | None = None
    layer_options: dict = dataclasses.field(default_factory=dict)

    def inputs(self, prng_key: jax.Array, query, key, value, options: dict) -> tuple[dict, dict]:
        """`(extra inputs, the other options)`: options `extra_inputs` takes go to it (Linformer's `proj_k`)."""
        options = {**self.options, **options}
        if self.extra_inputs is None:
            return {}, options
        own = {n for n, p in inspect.signature(self.extra_inputs).parameters.items() if p.kind == p.KEYWORD_ONLY}
        return self.extra_inputs(prng_key, query, key, value, **{n: options.pop(n) for n in own & set(options)}), \
            options

    def apply(self, query, key, value, bias=None, mask=None, *, is_causal: bool = False,
              prng_key: jax.Array | None = None, **options) -> jnp.ndarray:
        """Call the family on `[batch..., T, N, H]` inputs, filling in its extra inputs and default options."""
        prng_key = jax.random.PRNGKey(0) if prng_key is None else prng_key
        extras, options = self.inputs(prng_key, query, key, value, options)
        return self.function(query, None if self.shared_qk else key, value, bias, mask, is_causal=is_causal,
                             **{**extras, **options})  # inputs passed explicitly win


def _dense_memory(p: Problem, options: dict) -> int:
    # The logits and the probabilities; the backward pass keeps the probabilities and their gradient too.
    return (4 if p.backward else 2) * p.score_bytes + p.io_bytes


def _blockwise_memory(p: Problem, options: dict) -> int:
    # A few [query_chunk, key_chunk] blocks per head and example, plus running sums of the output's size;
    # the block sizes the call would use (the caller's, this CPU's tuned ones, else the defaults).
    from labkit.attention.chunked import chunk_sizes_for

    qc, kc = (min(p.seq_len, c) for c in chunk_sizes_for(
        p.seq_len, p.seq_len, p.head_dim, options.get("query_chunk_size"), options.get("key_chunk_size")))
    return 4 * p.batch * p.heads * qc * kc * FLOAT_BYTES + 3 * p.io_bytes


def _local_memory(p: Problem, options: dict) -> int:
    # Each chunk's scores against its window of (1 + before + after) chunks.
    chunk = options.get("chunk_len") or p.seq_len
    window = chunk * (1 + options.get("n_chunks_before", 0) + options.get("n_chunks_after", 0))
    return (2 + 2 * p.backward) * p.batch * p.heads * p.seq_len * min(window, p.seq_len) * FLOAT_BYTES \
        + 3 * p.io_bytes


def _lsh_memory(p: Problem, options: dict) -> int:
    # Per hash round: [T, 2 chunk_len] scores and probabilities, plus sorted copies of q and v.
    window = 2 * options.get("chunk_len", 64)
    return options.get("n_hashes", 1) * (3 * p.io_bytes + 4 * p.batch * p.heads * p.seq_len * window * FLOAT_BYTES)


def _linear_memory(p: Problem, options: dict) -> int:
    # Causal prefix sums keep T [H, Hv] states; the chunkwise scan keeps [chunk, chunk] blocks instead.
    chunk = options.get("chunk_size")
    if not p.causal:
        return 3 * p.io_bytes
    if chunk is None:
        return 3 * p.io_bytes + (2 + 2 * p.backward) * p.io_bytes // 4 * (p.head_dim + 1)
    return 3 * p.io_bytes + 4 * p.batch * p.heads * chunk ** 2 * FLOAT_BYTES


def _kernel_memory(p: Problem, options: dict) -> int:
    # Query and key features [batch, T, N, M], plus the chunkwise scan's blocks when causal.
    m = options.get("num_random_features", 256)
    chunk = options.get("causal_chunk_length") or 128
    return (3 * p.io_bytes + 4 * (1 + p.backward) * p.batch * p.seq_len * p.heads * m * FLOAT_BYTES
            + 4 * p.batch * p.heads * chunk ** 2 * FLOAT_BYTES)


def _linformer_memory(p: Problem, options: dict) -> int:
    # [T, K] scores per head, the projected keys/values, and the projections themselves.
    k = min(p.seq_len, options.get("proj_k", 256))
    return ((4 + 4 * p.backward) * p.batch * p.heads * p.seq_len * k + 2 * p.heads * p.seq_len * k) * FLOAT_BYTES \
        + 3 * p.io_bytes


def _leap_memory(p: Problem, options: dict) -> int:
    # The associative scans keep O(T H) arrays per level.
    return 12 * p.io_bytes


def _linformer_inputs(prng_key: jax.Array, query, key, value, *, proj_k: int = 256) -> dict:
    """Random per-head projections `[N, K, S]` scaled by `1/sqrt(K)`, K = min(proj_k, S)."""
    from labkit.attention.linformer import init_projections

    seq, heads = key.shape[-3], key.shape[-2]
    (e, f), = init_projections(prng_key, n_layers=1, n_heads=heads, max_len=seq, proj_k=min(proj_k, seq),
                               sharing="none")
    return {"e_proj": e, "f_proj": f}


def _leap_inputs(prng_key: jax.Array, query, key, value) -> dict:
    """LEAP's focus vectors, made from the keys (their head dim reversed): the same positions get the same focus."""
    return {"focus": key[..., ::-1]}


def _random_key_input(prng_key: jax.Array, query, key, value) -> dict:
    """The key of the family's own randomness (LSH's rotations, kernel attention's projection)."""
    return {"prng_key": prng_key}


FAMILIES: dict[str, Family] = {family.name: family for family in [
    Family("dense", dot_product_attention, exact=True, lab="lab01", memory=_dense_memory, bias=True, mask="full",
           layer="DotProductSelfAttention"),
    Family("local", local_attention, exact=False, lab="lab01", memory=_local_memory, self_only=True,
           options={"chunk_len": 128, "n_chunks_before": 1}, small_options={"chunk_len": 4, "n_chunks_before": 1},
           layer="DotProductSelfAttention", layer_options={"chunk_len": 4, "n_chunks_before": 1}),
    Family("lsh", lsh_attention, exact=False, lab="lab02", memory=_lsh_memory, shared_qk=True, self_only=True,
           extra_inputs=_random_key_input, options={"chunk_len": 64}, small_options={"chunk_len": 4, "n_hashes": 2},
           layer="LSHSelfAttention", layer_options={"chunk_len": 4, "n_hashes": 2}),
    Family("memory_efficient", memory_efficient_attention, exact=True, lab="lab03", memory=_blockwise_memory,
           bias=True, mask="full", small_options={"query_chunk_size": 4, "key_chunk_size": 5},
           layer="MemoryEfficientSelfAttention", layer_options={"query_chunk_size": 4, "key_chunk_size": 5}),
    Family("linear", linear_attention, exact=False, lab="lab04", memory=_linear_memory,
           small_options={"chunk_size": 4}, layer="LinearSelfAttention"),
    Family("kernel", kernel_attention, exact=False, lab="lab05", memory=_kernel_memory,
           extra_inputs=_random_key_input, options={"causal_chunk_length": 128}, small_options={"num_random_features": 16, "causal_chunk_length": 4},
           layer="KernelSelfAttention", layer_options={"num_random_features": 16}),
    Family("linformer", linformer_attention, exact=False, lab="lab06", memory=_linformer_memory, causal=(False,),
           extra_inputs=_linformer_inputs, layer="LinformerSelfAttention",
           layer_options={"max_len": 16, "proj_k": 4}),
    Family("leap", leap_attention, exact=False, lab="lab07", memory=_leap_memory, self_only=True,
           extra_inputs=_leap_inputs, small_options={"window": 5}, layer="LEAPSelfAttention",
           layer_options={"window": 5}),
    Family("flash", flash_attention, exact=True, lab="lab10", memory=_flash_memory, mask="none",
           options={"block_q": 16, "block_k": 16}),
    Family("ring", sharded_ring_attention, exact=True, lab="lab09", memory=_ring_memory, mask="none", self_only=True),
    Family("sliding_window", sliding_window_attention, exact=False, lab=None, memory=_sliding_window_memory,
           self_only=True, options={"window": 256}, small_options={"window": 4, "block_size": 3},
           layer="SlidingWindowSelfAttention", layer_options={"window": 4}),
]}

__all__ = ["FAMILIES", "Family", "Problem", "dot_product_attention", "flash_attention", "kernel_attention", "leap_attention",
           "linear_attention", "linformer_attention", "local_attention",
           "lsh_attention", "memory_efficient_attention", "sharded_ring_attention", "sliding_window_attention"]


def family(name: str) -> Family:
    """The registered family `name`; a KeyError listing the registered names otherwise."""
    if name not in FAMILIES:
        raise KeyError(f"no attention family {name!r}; registered: {', '.join(FAMILIES)}")
    return FAMILIES[name]

