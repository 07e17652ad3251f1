"""Shims that let Trax lab code written for older releases run on trax 1.4.1 + jax 0.10.2.

* `tie_in(x, y)` was a jax/Trax primitive that forced `y` to be staged out together with `x` during
  tracing. JAX made it a no-op (2020) and later removed it; Trax 1.4.1 no longer exports it. Here it is
  a documented no-op returning `y`, and `install_trax_shims()` puts it back where old code imports it
  from (`trax.layers.tie_in`, `trax.fastmath.tie_in`).
* Trax 1.4.1's predict mode (fast decoding with a cache, `mode='predict'`) calls
  `fastmath.cond(pred=..., true_operand=..., true_fun=..., false_operand=..., false_fun=...)`, a keyword form
  that `jax.lax.cond` dropped, so `tl.SelfAttention(mode='predict')` fails with "cond() got an unexpected
  keyword argument 'true_operand'". `trax_cond` accepts both forms; `install_trax_shims()` puts it into Trax's
  JAX backend. `import labkit` arranges for that to happen as soon as Trax is imported (`labkit._quiet`).
  Predict mode also passes the number of new positions through `fastmath.stop_gradient` and then uses it as a
  shape; newer `jax.lax.stop_gradient` turns a Python int into an array, which cannot be a shape under `jit`
  or inside a model's `init` (a `ConcretizationTypeError`), so `trax_stop_gradient` leaves Python numbers be.
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


def trax_cond(pred, *args, true_operand=None, true_fun=None, false_operand=None, false_fun=None, **kwargs):
    """`jax.lax.cond`, also in the operand-per-branch keyword form old Trax code uses."""
    if true_fun is None and false_fun is None:
        return jax.lax.cond(pred, *args, **kwargs)
    if args or kwargs or true_fun is None or false_fun is None:
        raise TypeError("trax_cond: pass both true_fun and false_fun (with their operands) and nothing else")
    return jax.lax.cond(pred, lambda ops: true_fun(ops[0]), lambda ops: false_fun(ops[1]),
                        (true_operand, false_operand))


def trax_stop_gradient(x):
    """`jax.lax.stop_gradient`, but Python numbers come back as they are (they carry no gradient anyway)."""
    if isinstance(x, (bool, int, float)):
        return x
    return jax.lax.stop_gradient(x)


def to_jnp(tree):
    """Return `tree` with every numpy array (and Python scalar leaf) replaced by a `jnp` array."""
    return jax.tree_util.tree_map(lambda a: jnp.asarray(a) if isinstance(a, (np.ndarray, np.generic)) else a, tree)


def install_trax_shims() -> None:
    """Make `tie_in` importable from Trax again and Trax's predict mode work (cond, stop_gradient); idempotent."""
    import importlib

    # By module name, not attribute: this also runs while `trax` itself is still initialising.
    trax_layers, fastmath = (importlib.import_module(name) for name in ("trax.layers", "trax.fastmath"))
    from trax.fastmath.jax import JAX_BACKEND

    for module in (trax_layers, fastmath):
        if not hasattr(module, "tie_in"):
            module.tie_in = tie_in
    JAX_BACKEND["cond"] = trax_cond
    JAX_BACKEND["stop_gradient"] = trax_stop_gradient


def use_jax_backend() -> str:
    """Select Trax's JAX backend (the only one the labs support) and return the JAX platform in use."""
    import trax.fastmath

    trax.fastmath.set_backend("jax")
    return jax.default_backend()
