"""Seeded inputs shared by the labs' exercise registries."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from labkit.grading.exercise import Case


def normal(seed: int, *shape: int, scale: float = 1.0) -> np.ndarray:
    """Float32 standard normal samples of `shape` from `seed`, times `scale`."""
    return (np.random.default_rng(seed).normal(size=shape) * scale).astype(np.float32)


def layer_case(name: str, seed: int, batch: int, seq: int, d_model: int, **layer_kwargs) -> Case:
    """A layer-exercise case: input `x [batch, seq, d_model]` (jnp) and the seed, with the layer's kwargs."""
    def inputs():
        return (jnp.asarray(normal(seed, batch, seq, d_model)), seed), layer_kwargs
    return Case(name, inputs, atol=1e-5, rtol=1e-4)
