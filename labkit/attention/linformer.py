"""Linformer: low-rank projected attention.

Wang, Li, Khabsa, Fang, Ma 2020, "Linformer: Self-attention with linear complexity" (arXiv:2006.04768).

Idea: the `[T, S]` attention matrix is close to low rank, so keys and values are first projected along the
*sequence* axis, from length `n` down to `k`, with learned matrices `E, F` (`[k, n]`):

    out = softmax(Q (E K)^T * scale) (F V)

Each query now scores `k` projected keys instead of `S` keys. With `k = n` and `E = F = I` this is exactly
dense attention. Options users expect, all here:

- sharing (the paper's levels): a projection per head (`e_proj [N, k, n]`, the default), one shared by all
  heads (`[k, n]`), key-value sharing (`f_proj=None`: F = E), and one matrix shared by every layer (use
  `init_projections(..., sharing="layerwise")`, which hands every layer the same array; in Trax,
  `labkit.layers.LinformerProjection`, one layer instance used before every attention layer);
- inputs shorter than `n` are padded with masked (zeroed) positions inside the function; longer ones raise
  a ValueError naming both lengths; a key padding `mask` zeroes hidden keys and values *before* projecting;
- the paper's alternative downsampling: mean pooling or a strided convolution with kernel = stride = n/k
  (`downsample="mean"` / `"conv"`), where each projected position is one block of keys, so a block whose
  keys are all hidden is hidden exactly in the softmax;
- a per-layer schedule that shrinks `k` with depth (`k_schedule`; in Trax `labkit.layers.linformer_attention_stack`
  and `labkit.models.LinformerEncoder(k_decay=...)`).

Linformer mixes positions before the softmax, so it has no causal form (`is_causal=True` is rejected), and a
mask can only hide keys for every query (a key padding mask `[batch..., S]`), not per query.

Cost per head: O(T k H + n k H) time and O(T k) memory for the scores, instead of O(T S) for dense attention;
plus `2 k n` (per head, per layer) projection parameters.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from labkit.attention._validate import (as_float_array, check_qkv, default_scale, dropout_keep, key_padding_mask,
                                       reject_bias)
from labkit.attention.dense import LARGE_NEGATIVE

SHARING_MODES = ("none", "headwise", "kv", "layerwise")
DOWNSAMPLE_MODES = ("linear", "mean", "conv")


def projection_shape(sharing: str, *, n_heads: int, proj_k: int, max_len: int) -> tuple[int, ...]:
    """Shape of one projection matrix E (and F, when it exists) for a sharing mode."""
    _check_sharing(sharing)
    return (n_heads, proj_k, max_len) if sharing == "none" else (proj_k, max_len)


def num_projection_params(sharing: str, *, n_heads: int, proj_k: int | list[int], max_len: int,
                          n_layers: int = 1) -> int:
    """Number of E/F parameters of a whole model; `proj_k` may be a per-layer list (a k schedule)."""
    _check_sharing(sharing)
    ks = list(proj_k) if isinstance(proj_k, (list, tuple)) else [proj_k] * n_layers
    if len(ks) != n_layers:
        raise ValueError(f"proj_k has {len(ks)} entries for n_layers={n_layers}")
    if sharing == "layerwise":
        if len(set(ks)) != 1:
            raise ValueError(f"layerwise sharing needs the same k in every layer, got {ks}")
        return ks[0] * max_len
    per_matrix = {"none": n_heads, "headwise": 1, "kv": 1}[sharing]
    matrices = 1 if sharing == "kv" else 2
    return sum(matrices * per_matrix * k * max_len for k in ks)


def k_schedule(proj_k: int, n_layers: int, *, decay: float = 1.0, min_k: int = 1) -> list[int]:
    """Projected length per layer, `max(min_k, round(proj_k * decay**layer))`: the paper's shrinking k."""
    if not 0.0 < decay <= 1.0:
        raise ValueError(f"decay must be in (0, 1], got {decay}")
    return [max(min_k, int(round(proj_k * decay ** layer))) for layer in range(n_layers)]


def init_projections(rng: jax.Array, *, n_layers: int, n_heads: int, max_len: int, proj_k: int | list[int],
                     sharing: str = "none") -> list[tuple[jnp.ndarray, jnp.ndarray | None]]:
    """Per layer `(e_proj, f_proj)`, normal with std 1/sqrt(k); `f_proj` is None when F = E.

    With `sharing="layerwise"` every layer gets the very same array, so a model's parameter count (and its
    gradient, summed over layers) sees one matrix.
    """
    ks = list(proj_k) if isinstance(proj_k, (list, tuple)) else [proj_k] * n_layers
    num_projection_params(sharing, n_heads=n_heads, proj_k=ks, max_len=max_len, n_layers=n_layers)  # checks
    keys = jax.random.split(rng, 2 * n_layers)
    shared = None
    layers = []
    for layer, k in enumerate(ks):
        shape = projection_shape(sharing, n_heads=n_heads, proj_k=k, max_len=max_len)
        e = jax.random.normal(keys[2 * layer], shape) / np.sqrt(k)
        if sharing == "layerwise":
            shared = e if shared is None else shared
            layers.append((shared, None))
        elif sharing == "kv":
            layers.append((e, None))
        else:
            layers.append((e, jax.random.normal(keys[2 * layer + 1], shape) / np.sqrt(k)))
    return layers


def _check_sharing(sharing: str) -> None:
    if sharing not in SHARING_MODES:
        raise ValueError(f"sharing must be one of {SHARING_MODES}, got {sharing!r}")


def _pad_seq(x: jnp.ndarray, length: int) -> jnp.ndarray:
    """Zero-pad the sequence axis (-3) of `[batch..., S, N, H]` up to `length`."""
    widths = [(0, 0)] * x.ndim
    widths[-3] = (0, length - x.shape[-3])
    return jnp.pad(x, widths)


def _project_linear(x: jnp.ndarray, proj: jnp.ndarray) -> jnp.ndarray:
    """`[batch..., n, N, H]` -> `[batch..., k, N, H]`: E along the sequence axis, per head or shared."""
    if proj.ndim == 3:
        return jnp.einsum("nkl,...lnh->...knh", proj, x, preferred_element_type=jnp.float32)
    return jnp.einsum("kl,...lnh->...knh", proj, x, preferred_element_type=jnp.float32)


def _project_blocks(x: jnp.ndarray, kernel: jnp.ndarray | None, valid: jnp.ndarray, stride: int):
    """Pool blocks of `stride` positions: masked mean (kernel None) or strided conv with `kernel [N?, r]`.

    Returns `([batch..., k, N, H], block_has_a_key [batch..., k])`.
    """
    seq = x.shape[-3]
    blocks = x.reshape(x.shape[:-3] + (seq // stride, stride) + x.shape[-2:]).astype(jnp.float32)
    vblocks = valid.reshape(valid.shape[:-1] + (seq // stride, stride))
    if kernel is None:
        count = jnp.sum(vblocks, axis=-1)[..., None, None]
        pooled = jnp.sum(blocks, axis=-3) / jnp.maximum(count, 1)  # masked positions are already zero
    elif kernel.ndim == 2:  # one kernel per head
        pooled = jnp.einsum("nr,...krnh->...knh", kernel, blocks)
    else:
        pooled = jnp.einsum("r,...krnh->...knh", kernel, blocks)
    return pooled, jnp.any(vblocks, axis=-1)


def linformer_attention(query, key, value, bias=None, mask=None, *, e_proj=None, f_proj=None,
                        is_causal: bool = False, scale: float | None = None, downsample: str = "linear",
                        stride: int | None = None, dropout_rate: float = 0.0,
                        prng_key: jax.Array | None = None) -> jnp.ndarray:
    """Linformer attention `[batch..., T, N, Hv]`: keys/values projected along the sequence axis to length K.

    Args:
      query: `[batch..., T, N, H]`.
      key: `[batch..., S, N, H]`.
      value: `[batch..., S, N, Hv]`.
      bias: must be None (there is no `[T, S]` score matrix to add it to).
      mask: optional boolean key-padding mask broadcastable to `[batch..., 1, 1, S]` (one row for all heads);
        False hides key j from every query. Hidden keys and values are zeroed before projecting.
      e_proj: keys' projection. `downsample="linear"`: `[N, K, n]` (one per head) or `[K, n]` (shared by
        heads), with S <= n (shorter inputs are padded with hidden positions). `"conv"`: a kernel `[N, r]`
        or `[r]` applied with stride r. `"mean"`: None.
      f_proj: values' projection, same shape as `e_proj`; None means F = E (key-value sharing).
      is_causal: not supported (the projection mixes future and past positions); True raises ValueError.
      scale: logit scale, default `1/sqrt(H)`.
      downsample: "linear" (the learned E, F), "mean" (mean pooling) or "conv" (strided convolution).
      stride: block length r for `"mean"` (required) and `"conv"` (default: the kernel's length). The
        sequence is padded to a multiple of r; K = ceil(S / r).
      dropout_rate: dropout on the `[T, K]` attention probabilities; needs `prng_key`.
      prng_key: the key of that dropout.

    Returns:
      `[batch..., T, N, Hv]` in `value`'s dtype; the softmax is computed in float32.
    """
    query, key, value = check_qkv(query, key, value)
    reject_bias(bias, "linformer_attention")
    if is_causal:
        raise ValueError("linformer_attention has no causal form: projecting along the sequence mixes future "
                         "keys into every projected key (is_causal=True is not supported)")
    if downsample not in DOWNSAMPLE_MODES:
        raise ValueError(f"downsample must be one of {DOWNSAMPLE_MODES}, got {downsample!r}")
    valid = key_padding_mask(mask, key.shape, "linformer_attention", per_head=False)
    valid = jnp.ones(key.shape[:-3] + key.shape[-3:-2], bool) if valid is None else valid  # [batch..., S]
    keep = valid[..., None, None]
    key = jnp.where(keep, key, 0)  # hide before projecting: a projection would spread hidden keys everywhere
    value = jnp.where(keep, value, 0)
    if downsample == "linear":
        proj_key, proj_value, block_valid = (*_project_with_matrices(key, value, e_proj, f_proj), None)
    else:
        proj_key, proj_value, block_valid = _project_by_pooling(key, value, valid, e_proj, f_proj, downsample,
                                                                stride)
    logits = jnp.einsum("...tnh,...knh->...ntk", query.astype(jnp.float32), proj_key)
    logits = logits * default_scale(scale, query.shape[-1])
    if block_valid is not None:
        logits = jnp.where(block_valid[..., None, None, :], logits, LARGE_NEGATIVE)
    probs = jax.nn.softmax(logits, axis=-1)
    drop = dropout_keep(prng_key, dropout_rate, probs.shape)
    if drop is not None:
        probs = probs * drop
    out = jnp.einsum("...ntk,...knh->...tnh", probs, proj_value)
    return out.astype(value.dtype)


def _matching_projections(e_proj, f_proj, ranks: tuple, heads: int, what: str) -> tuple:
    """E and F (F = E when None) as float arrays of one shape, rank in `ranks`, leading axis N if per head."""
    e_proj = as_float_array("e_proj", e_proj)
    f_proj = e_proj if f_proj is None else as_float_array("f_proj", f_proj)
    if e_proj.shape != f_proj.shape or e_proj.ndim not in ranks or (
            e_proj.ndim == max(ranks) and e_proj.shape[0] != heads):
        raise ValueError(f"{what} e_proj and f_proj must both be {' or '.join(_SHAPES[r] for r in ranks)} with "
                         f"N={heads}; got e_proj {e_proj.shape}, f_proj {f_proj.shape}")
    return e_proj, f_proj


_SHAPES = {1: "[r]", 2: "[N, r] / [K, n]", 3: "[N, K, n]"}


def _project_with_matrices(key, value, e_proj, f_proj):
    """The learned projections: `[batch..., S, N, *]` -> `[batch..., K, N, *]` (S padded up to n)."""
    seq, heads = key.shape[-3], key.shape[-2]
    e_proj, f_proj = _matching_projections(e_proj, f_proj, (2, 3), heads, "linear")
    n = e_proj.shape[-1]
    if seq > n:
        raise ValueError(f"sequence length S = {seq} (key {key.shape}) is longer than the projection's "
                         f"length n = {n} (e_proj {e_proj.shape}); build E, F with n >= {seq}")
    return _project_linear(_pad_seq(key, n), e_proj), _project_linear(_pad_seq(value, n), f_proj)


def _project_by_pooling(key, value, valid, e_proj, f_proj, downsample: str, stride):
    """Mean pooling or a strided convolution over blocks of `stride` positions; also which blocks hold a key."""
    seq, heads = key.shape[-3], key.shape[-2]
    kernels = (None, None)
    if downsample == "conv":
        kernels = _matching_projections(e_proj, f_proj, (1, 2), heads, "conv kernels")
        stride = kernels[0].shape[-1] if stride is None else stride
        if stride != kernels[0].shape[-1]:
            raise ValueError(f"kernel size and stride must be equal (the paper's n/k); got stride {stride}, "
                             f"kernel {kernels[0].shape}")
    elif e_proj is not None or f_proj is not None:
        raise ValueError("downsample='mean' has no learned projection: pass e_proj=None, f_proj=None")
    if not isinstance(stride, (int, np.integer)) or stride < 1:
        raise ValueError(f"downsample={downsample!r} needs a positive integer stride, got {stride!r}")
    padded = -(-seq // stride) * stride
    key, value = _pad_seq(key, padded), _pad_seq(value, padded)
    valid = jnp.pad(valid, [(0, 0)] * (valid.ndim - 1) + [(0, padded - seq)])
    proj_key, block_valid = _project_blocks(key, kernels[0], valid, stride)
    proj_value, _ = _project_blocks(value, kernels[1], valid, stride)
    return proj_key, proj_value, block_valid


# ---------------------------------------------------------------- multi-head self-attention, checkpoint levels

CHECKPOINT_LEVELS = ("C0", "C1", "C2")


def block_length(max_len: int, proj_k: int) -> int:
    """Block length `r = ceil(n / k)` of mean pooling / conv downsampling, so `ceil(T / r) <= k` blocks."""
    return -(-max_len // proj_k)


def _one_head(x, head_weights: tuple, e, f, rng, *, bias: bool, mask, options: dict) -> jnp.ndarray:
    """One head `x [B, T, d_model]` -> `[B, T, d_model]` (through its `w_o`); `e, f` that head's projection."""
    if bias:
        w_q, w_k, w_v, w_o, b_q, b_k, b_v = head_weights
    else:
        (w_q, w_k, w_v, w_o), b_q, b_k, b_v = head_weights, 0.0, 0.0, 0.0
    # [B, T, d] @ [d, h] -> [B, T, 1, h]: the attention function takes a heads axis.
    q, k, v = ((x @ w + b)[..., None, :] for w, b in ((w_q, b_q), (w_k, b_k), (w_v, b_v)))
    o = linformer_attention(q, k, v, mask=mask, e_proj=None if e is None else e[None],
                            f_proj=None if f is None else f[None], prng_key=rng, **options)
    return o[..., 0, :] @ w_o


def linformer_self_attention(x, qkvo: tuple, e_proj, f_proj=None, *, mask=None, bias: bool = False,
                             checkpoint: str = "C0", downsample: str = "linear", stride: int | None = None,
                             dropout_rate: float = 0.0, prng_key: jax.Array | None = None) -> jnp.ndarray:
    """Multi-head Linformer self-attention `x [B, T, d_model]` -> `[B, T, d_model]`, in Trax's weight layout.

    `qkvo = (w_q, w_k, w_v, w_o)` (+ `b_q, b_k, b_v` when `bias`) stacked over heads as in `tl.SelfAttention`:
    `w_q, w_k [N, d_model, d_qk]`, `w_v [N, d_model, d_v]`, `w_o [N, d_v, d_model]`. `e_proj` / `f_proj` as in
    `linformer_attention` for its `downsample` mode: `"linear"` `[N, k, n]` per head or `[k, n]` shared,
    `"conv"` kernels `[N, r]` per head or `[r]` shared, `"mean"` None; `f_proj=None`: F = E. `stride` is the
    block length of "mean" / "conv". `mask [B, T]` hides padding. `dropout_rate` drops attention
    probabilities (P-bar), with one key per head split from `prng_key`. Head outputs are summed, as in Trax.

    `checkpoint` trades compute for memory in the backward pass (`jax.checkpoint`), like the seed's levels:
    "C0" keeps every intermediate; "C1" keeps only this call's inputs and recomputes the attention in the
    backward pass; "C2" additionally runs the heads in a loop, each recomputed separately, so only one head's
    intermediates are alive at a time. All three give the same outputs and gradients (to float rounding).
    Measured on XLA:CPU (`labkit.bench.checkpoint_memory_table`): C2 cuts the peak; C1 alone saves nothing
    there, because inside one jitted program XLA is free to run every layer's recomputation early.
    """
    if checkpoint not in CHECKPOINT_LEVELS:
        raise ValueError(f"checkpoint must be one of {CHECKPOINT_LEVELS}, got {checkpoint!r}")
    n_heads = qkvo[0].shape[0]
    if dropout_rate > 0.0 and prng_key is None:
        raise ValueError("dropout_rate > 0 needs a prng_key")
    rngs = jax.random.split(prng_key, n_heads) if dropout_rate > 0.0 else None
    mask = None if mask is None else jnp.asarray(mask)[..., None, None, :]  # [B, T] -> [B, 1, 1, S]
    e_proj = None if e_proj is None else jnp.asarray(e_proj)
    f_proj = e_proj if f_proj is None else jnp.asarray(f_proj)  # F = E when None
    # A per-head projection has one more axis than a shared one: [N, k, n] vs [k, n], [N, r] vs [r].
    per_head_proj = e_proj is not None and e_proj.ndim == (3 if downsample == "linear" else 2)
    options = dict(downsample=downsample, stride=stride, dropout_rate=dropout_rate)

    def all_heads(x, qkvo, e_proj, f_proj):
        def head(args):
            w, e, f, rng = args
            e, f = (e, f) if per_head_proj else (e_proj, f_proj)  # shared ones are closed over
            return _one_head(x, w, e, f, rng, bias=bias, mask=mask, options=options)

        per_head = (qkvo, e_proj if per_head_proj else None, f_proj if per_head_proj else None, rngs)
        if checkpoint == "C2":
            # A loop, not vmap: XLA runs the heads one after the other, and each recomputes its own
            # intermediates in the backward pass, so only one head's are alive at a time.
            outs = jax.lax.map(jax.checkpoint(head), per_head)
        else:
            outs = jax.vmap(head)(per_head)
        return jnp.sum(outs, axis=0)  # [N, B, T, d] -> [B, T, d]: heads summed as in Trax

    run = all_heads if checkpoint == "C0" else jax.checkpoint(all_heads)
    return run(x, tuple(qkvo), e_proj, f_proj)
