"""Run in a fresh process: ring attention under `jax.shard_map` on 8 simulated CPU devices, against dense.

    python tests/ring_worker.py OUT.json

The number of simulated devices must be set before JAX's backend starts, and pytest's own process may have
started it with one device already, so tests/test_ring.py runs this script in a subprocess and reads the max
|ring - dense| of every check (outputs and gradients) and the work each device counted.
"""

from __future__ import annotations

import json
import sys

import jax

jax.config.update("jax_num_cpu_devices", 8)

import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from labkit.attention.dense import dot_product_attention  # noqa: E402
from labkit.attention.ring import LAYOUTS, sharded_ring_attention  # noqa: E402

RNG = np.random.default_rng(0)


def _inputs(*shape):
    return tuple(jnp.asarray(RNG.standard_normal(shape), jnp.float32) for _ in range(4))


def _mesh(n: int) -> jax.sharding.Mesh:
    return jax.sharding.Mesh(np.array(jax.devices()[:n]), ("sp",))


def outputs() -> dict:
    """max |ring - dense| of the outputs, and the work per device, for every P, causal flag, layout, length."""
    found = {}
    for n in (1, 2, 4, 8):
        for seq in ((32, 37) if n == 8 else (37,)):
            q, k, v, _ = _inputs(2, seq, 3, 8)
            for causal in (False, True):
                dense = dot_product_attention(q, k, v, is_causal=causal)
                for layout in LAYOUTS:
                    out, work = jax.jit(lambda q, k, v: sharded_ring_attention(
                        q, k, v, is_causal=causal, mesh=_mesh(n), layout=layout, return_work=True))(q, k, v)
                    found[f"P={n} seq={seq} causal={causal} {layout}"] = {
                        "error": float(jnp.abs(out - dense).max()), "work": np.asarray(work).tolist()}
    return found


def gradients() -> dict:
    """max |ring grad - dense grad| of dq, dk, dv for the loss sum(out * cotangent): P = 2 and 8, P = 4 causal."""
    found = {}
    for n, causal in ((2, False), (4, True), (8, False), (8, True)):
        q, k, v, cotangent = _inputs(2, 21, 2, 4)

        def loss(fn, q, k, v):
            return jnp.sum(fn(q, k, v, is_causal=causal) * cotangent)

        def ring(q, k, v, **options):
            return sharded_ring_attention(q, k, v, **options, mesh=_mesh(n))

        with jax.set_mesh(_mesh(n)):
            got = jax.jit(jax.grad(lambda *a: loss(ring, *a), argnums=(0, 1, 2)))(q, k, v)
        want = jax.grad(lambda *a: loss(dot_product_attention, *a), argnums=(0, 1, 2))(q, k, v)
        found[f"P={n} causal={causal}"] = max(float(jnp.abs(a - b).max()) for a, b in zip(got, want))
    return found


if __name__ == "__main__":
    result = {"devices": jax.device_count(), "outputs": outputs(), "gradients": gradients()}
    with open(sys.argv[1], "w") as out:
        json.dump(result, out, indent=1)
