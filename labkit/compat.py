"""Shims that let Trax lab code written for older releases run on trax 1.4.1 + jax 0.10.2.

* `tie_in(x, y)` was a jax/Trax primitive that forced `y` to be staged out together with `x` during
  tracing. JAX made it a no-op (2020) and later removed it; Trax 1.4.1 no longer exports it. Here it is
  a documented no-op returning `y`, and `install_trax_shims()` puts it back where old code imports it
  from (`trax.layers.tie_in`, `trax.fastmath.tie_in`).
* Trax's fast LSH path fails on numpy inputs (it traces through them); `to_jnp` converts a whole pytree
  of numpy arrays to `jnp` arrays before they reach a Trax layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def tie_in(x, y):
    """No-op kept for old Trax code: returns `y` unchanged (JAX no longer needs `x` to stage `y`)."""
    del x
    return y


def to_jnp(tree):
    """Return `tree` with every numpy array (and Python scalar leaf) replaced by a `jnp` array."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a) if isinstance(a, (np.ndarray, np.generic)) else a, tree)


def install_trax_shims() -> None:
    """Make `from trax.layers import tie_in` (and `trax.fastmath.tie_in`) work again; idempotent."""
    import trax.fastmath
    import trax.layers

    for module in (trax.layers, trax.fastmath):
        if not hasattr(module, "tie_in"):
            module.tie_in = tie_in


def use_jax_backend() -> str:
    """Select Trax's JAX backend (the only one the labs support) and return the JAX platform in use."""
    import trax.fastmath

    trax.fastmath.set_backend("jax")
    return jax.default_backend()
