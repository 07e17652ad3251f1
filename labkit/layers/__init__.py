"""Trax layers built on labkit's attention functions: drop-ins for `tl.SelfAttention`.

Each layer keeps Trax's constructor and weight layout (per head: `w_q [d_model, d_qk]`, `w_k [d_model, d_qk]`
unless `share_qk`, `w_v [d_model, d_v]`, `w_o [d_v, d_model]`, plus biases when `bias=True`) and overrides
only `forward_unbatched`, the per-example, per-head computation Trax batches with `vmap` (or loops over with
`use_reference_code=True`). Weights copied from a `tl.SelfAttention` therefore give the same outputs.

`AttentionLayer` is the one adapter: it projects, calls `attend(q, k, v, mask, rng)` (a labkit attention
function on `[T, 1, H]` arrays) and applies the output projection and dropout exactly as Trax does. A family's
layer names the constructor options it cannot honour in `unsupported` and defines `attend`; LSH (its own Trax
base class and state) and Linformer (projections shared across heads) are the two that need more.
"""

from labkit.layers.base import AttentionLayer, project_qkv, refuse
from labkit.layers.dense import DotProductSelfAttention
from labkit.layers.kernel import KernelSelfAttention
from labkit.layers.leap import LEAPSelfAttention
from labkit.layers.linear import LinearSelfAttention
from labkit.layers.linformer import LinformerProjection, LinformerSelfAttention, linformer_attention_stack
from labkit.layers.lsh import LSHSelfAttention
from labkit.layers.memory_efficient import MemoryEfficientSelfAttention
from labkit.layers.sliding_window import SlidingWindowSelfAttention

__all__ = ["AttentionLayer", "DotProductSelfAttention", "KernelSelfAttention", "LEAPSelfAttention",
           "LSHSelfAttention", "LinearSelfAttention", "LinformerProjection", "LinformerSelfAttention",
           "MemoryEfficientSelfAttention", "SlidingWindowSelfAttention", "linformer_attention_stack", "project_qkv",
           "refuse"]
