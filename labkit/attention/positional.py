"""Relative positional information for attention: rotary embeddings (RoPE) and ALiBi slopes.

Su et al. 2021, "RoFormer: enhanced transformer with rotary position embedding": rotate each pair of
features `(x_{2i}, x_{2i+1})` of a vector at position p by the angle `p theta_i`, `theta_i = base^{-2i/d}`.
A rotation is orthogonal, so `R(p) x . R(r) y = x . R(r - p) y`: dot products depend only on the
*difference* of positions, and shifting every position by the same amount changes nothing.
Press, Smith & Lewis 2022, "Train short, test long" (ALiBi): add `-slope (t - j)` to the score of key j for
query t, with geometric per-head slopes `2^{-8 h / N}`. In LEAP the `t` part cancels in the softmax over j, so
ALiBi is `+ slope * j` on the focus logits (`leap_attention(..., position_embedding="alibi")`).
`position_options` turns the one `position_embedding` option ("none" / "rotary" / "alibi", in the spirit of
BERT's `position_embedding_type`) into what an attention function needs.

Cost: O(T d) time and memory for the rotation; the slopes are N numbers.
"""

from __future__ import annotations

import jax.numpy as jnp

from labkit.attention._validate import as_float_array


def rotary(x, positions=None, *, base: float = 10000.0) -> jnp.ndarray:
    """Rotate feature pairs of `x [batch..., T, N, d]` (d even) by `positions [T]` (default 0..T-1) times theta_i."""
    x = as_float_array("x", x)
    if x.ndim < 3 or x.shape[-1] % 2:
        raise ValueError(f"x must be [batch..., seq, heads, dim] with an even dim, got {x.shape}")
    t, d = x.shape[-3], x.shape[-1]
    positions = jnp.arange(t) if positions is None else jnp.asarray(positions)
    if positions.shape != (t,):
        raise ValueError(f"positions must have shape ({t},) for x {x.shape}, got {positions.shape}")
    dtype = jnp.promote_types(x.dtype, jnp.float32)
    theta = base ** (-jnp.arange(0, d, 2, dtype=dtype) / d)  # [d / 2]
    angle = positions.astype(dtype)[:, None, None] * theta  # [T, 1, d / 2]
    cos, sin = jnp.cos(angle), jnp.sin(angle)
    even, odd = x[..., 0::2].astype(dtype), x[..., 1::2].astype(dtype)
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], -1)
    return rotated.reshape(x.shape).astype(x.dtype)


def alibi_slopes(num_heads: int) -> jnp.ndarray:
    """ALiBi's geometric slopes `[N]`: `2^{-8 (h + 1) / N}` for head h (the paper's choice for N a power of 2)."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    return 2.0 ** (-8.0 * jnp.arange(1, num_heads + 1, dtype=jnp.float32) / num_heads)


POSITION_EMBEDDINGS = ("none", "rotary", "alibi")


def position_options(position_embedding: str, alibi, num_heads: int) -> tuple[bool, jnp.ndarray | None]:
    """`(rotate?, slopes [N] | None)` for `position_embedding` in POSITION_EMBEDDINGS.

    `alibi` is optional custom slopes `[N]` (default `alibi_slopes(N)`); given with "none" it means "alibi"
    (the form older callers use), with "rotary" it is an error.
    """
    if position_embedding not in POSITION_EMBEDDINGS:
        raise ValueError(f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {position_embedding!r}")
    if alibi is not None and position_embedding == "rotary":
        raise ValueError("alibi slopes were given with position_embedding='rotary': choose one")
    if alibi is not None or position_embedding == "alibi":
        slopes = alibi_slopes(num_heads) if alibi is None else jnp.asarray(alibi)
        return False, slopes
    return position_embedding == "rotary", None
