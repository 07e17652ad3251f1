"""Argument checks shared by the attention functions: clear errors instead of XLA shape traces."""

from __future__ import annotations

import jax
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


def reject_bias(bias, family: str) -> None:
    """Families that never form the scores cannot add a bias to them: a ValueError unless `bias` is None."""
    if bias is not None:
        raise ValueError(f"{family} never forms the [T, S] scores a bias would be added to: pass bias=None "
                         f"(got a bias of shape {jnp.shape(bias)})")


def key_padding_mask(mask, key_shape: tuple, family: str, *, per_head: bool = True) -> jnp.ndarray | None:
    """A key-padding mask broadcastable to `[batch..., N, 1, S]` (True = keep) -> bool `[batch..., N, 1, S]`.

    For families that apply one mask row to every query. With `per_head=False` the heads axis must be 1 and
    the result is `[batch..., S]`.
    """
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != bool:
        raise TypeError(f"mask must be boolean (True = keep), got dtype {mask.dtype}")
    *batch, s, n, _ = key_shape
    target = tuple(batch) + ((n if per_head else 1), 1, s)
    wanted = "[batch..., N, 1, S]" if per_head else "[batch..., 1, 1, S] (one row for all heads)"
    if mask.ndim >= 2 and mask.shape[-2] != 1 or not per_head and mask.ndim >= 3 and mask.shape[-3] != 1:
        raise ValueError(f"{family} hides keys for all queries alike: mask must broadcast to {wanted} = {target}, "
                         f"got {mask.shape}")
    try:
        full = jnp.broadcast_to(mask, target)
    except ValueError as err:
        raise ValueError(f"{family}: mask of shape {mask.shape} does not broadcast to {wanted} = {target}") from err
    return full if per_head else full[..., 0, 0, :]


def dropout_keep(prng_key, rate: float, shape: tuple) -> jnp.ndarray | None:
    """Inverted-dropout multipliers `shape` (0 or 1/(1-rate)) drawn from `prng_key`; None when `rate` is 0."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"dropout_rate must be in [0, 1), got {rate!r}")
    if rate == 0.0:
        return None
    if prng_key is None:
        raise ValueError("dropout_rate > 0 needs a prng_key")
    keep_prob = 1.0 - rate
    return jax.random.bernoulli(prng_key, keep_prob, shape) / keep_prob


def positive_int(name: str, value, *, allow_none: bool = False) -> None:
    """A TypeError/ValueError naming `name` unless `value` is a positive int (or None when allowed)."""
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int{' or None' if allow_none else ''}, got {value!r}")
