"""labkit.compat's shims for Trax code written against older releases."""

import jax
import jax.numpy as jnp
import numpy as np

import labkit  # noqa: F401  (installs the shims when Trax loads)
from labkit.compat import tie_in, to_jnp


def test_old_tie_in_imports_work_and_change_nothing():
    """`from trax.layers import tie_in` (gone from Trax 1.4.1) is labkit's no-op, also under jit and grad."""
    from trax import fastmath
    from trax.layers import tie_in as from_layers

    assert from_layers is tie_in and fastmath.tie_in is tie_in

    def old_style(x):
        # How pre-omnistaging Trax code built constants inside a traced function.
        return x * tie_in(x, jnp.arange(x.shape[0], dtype=x.dtype))

    x = jnp.asarray([1.0, 2.0, 3.0])
    np.testing.assert_array_equal(jax.jit(old_style)(x), [0.0, 2.0, 6.0])
    np.testing.assert_array_equal(jax.grad(lambda x: old_style(x).sum())(x), [0.0, 1.0, 2.0])


def test_to_jnp_converts_numpy_leaves_only():
    tree = {"a": np.ones(2, np.float32), "b": (np.int32(3), "name"), "c": jnp.zeros(1)}
    out = to_jnp(tree)
    assert isinstance(out["a"], jax.Array) and isinstance(out["b"][0], jax.Array)
    assert out["b"][1] == "name" and out["c"] is tree["c"]
