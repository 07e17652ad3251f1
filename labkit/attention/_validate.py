"""Argument checks shared by the attention functions: clear errors instead of XLA shape traces."""

from __future__ import annotations

import jax.numpy as jnp


def as_float_array(name: str, x) -> jnp.ndarray:
    """Return `x` as a jnp array, or raise TypeError naming `name` if it is not a floating array."""
    if x is None:
        raise TypeError(f"{name} must be an array, got None")
    try:
        arr = jnp.asarray(x)
    except (TypeError, ValueError) as err:
        raise TypeError(f"{name} must be an array, got {type(x).__name__}") from err
    if not jnp.issubdtype(arr.dtype, jnp.floating):
        raise TypeError(f"{name} must have a floating dtype, got {arr.dtype}")
    return arr


def check_qkv(query, key, value) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Validate `[batch..., T, N, H]` / `[batch..., S, N, H]` / `[batch..., S, N, Hv]` and return arrays."""
    query = as_float_array("query", query)
    key = as_float_array("key", key)
    value = as_float_array("value", value)
    shapes = f"query {query.shape}, key {key.shape}, value {value.shape}"
    if query.ndim < 3 or key.ndim != query.ndim or value.ndim != query.ndim:
        raise ValueError(f"query, key and value must all be [batch..., seq, heads, dim] with the same rank; got {shapes}")
    if query.shape[:-3] != key.shape[:-3] or key.shape[:-3] != value.shape[:-3]:
        raise ValueError(f"query, key and value must share their batch dimensions; got {shapes}")
    if query.shape[-1] != key.shape[-1]:
        raise ValueError(f"query and key must have the same head dim; got {shapes}")
    if key.shape[-3] != value.shape[-3]:
        raise ValueError(f"key and value must have the same sequence length; got {shapes}")
    if not query.shape[-2] == key.shape[-2] == value.shape[-2]:
        raise ValueError(f"query, key and value must have the same number of heads; got {shapes}")
    return query, key, value


def default_scale(scale: float | None, head_dim: int) -> float:
    """`scale` if given, else 1/sqrt(head_dim)."""
    return float(scale) if scale is not None else 1.0 / float(head_dim) ** 0.5
