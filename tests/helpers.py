"""Helpers shared by the test files (importable as `helpers`: pytest puts this folder on sys.path)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np


def random_qkv(seed, batch: tuple = (), t: int = 8, s: int | None = None, n: int = 2, h: int = 4,
               hv: int | None = None, scale: float = 1.0, as_jax: bool = False) -> tuple:
    """Normal float32 query `[*batch, t, n, h]`, key `[*batch, s, n, h]` (both times `scale`), value `[..., hv]`.

    `seed` is an int or a numpy Generator; `s` defaults to `t`, `hv` to `h`. Numpy arrays (tests may edit them
    in place), or jnp arrays with `as_jax`.
    """
    rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
    s = t if s is None else s
    q = rng.normal(size=(*batch, t, n, h)) * scale
    k = rng.normal(size=(*batch, s, n, h)) * scale
    v = rng.normal(size=(*batch, s, n, hv or h))
    return tuple(jnp.asarray(a, jnp.float32) if as_jax else a.astype(np.float32) for a in (q, k, v))


def qkv_of_shape(seed, shape: tuple, dv: int | None = None, scale: float = 1.0):
    """Query and key of one `shape` (e.g. `[*batch, T, N, H]`, times `scale`), value `shape[:-1] + (dv,)`."""
    rng = np.random.default_rng(seed)
    q, k = (rng.normal(size=shape) * scale for _ in range(2))
    v = rng.normal(size=tuple(shape[:-1]) + (dv or shape[-1],))
    return tuple(a.astype(np.float32) for a in (q, k, v))


def momentum_sgd(loss, weights, batches, *, lr: float, momentum: float = 0.9) -> tuple[object, list[float]]:
    """Minimise `loss(weights, batch)` by SGD with heavy-ball momentum, one jitted step per batch.

    Returns the final weights and the loss before each step.
    """
    import jax

    @jax.jit
    def step(w, m, batch):
        value, grads = jax.value_and_grad(loss)(w, batch)
        m = jax.tree_util.tree_map(lambda m, g: momentum * m + g, m, grads)
        return jax.tree_util.tree_map(lambda w, m: w - lr * m, w, m), m, value

    velocity = jax.tree_util.tree_map(jnp.zeros_like, weights)
    losses = []
    for batch in batches:
        weights, velocity, value = step(weights, velocity, batch)
        losses.append(float(value))
    return weights, losses
