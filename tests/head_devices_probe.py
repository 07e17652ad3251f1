"""Run by tests/test_head_devices.py in a worker process with 2 CPU devices (set before JAX starts)."""

from __future__ import annotations

import jax

jax.config.update("jax_num_cpu_devices", 2)

import jax.numpy as jnp  # noqa: E402  (after the device count)
import numpy as np  # noqa: E402

from labkit.attention.chunked import memory_efficient_attention  # noqa: E402
from labkit.attention.dense import dot_product_attention  # noqa: E402


def compare(spec: dict) -> dict:
    """Largest |spread over 2 devices - dense| of outputs and gradients, per case; and the device count."""
    rng = np.random.default_rng(0)
    q, k, v = (jnp.asarray(rng.normal(size=(2, 70, 4, 8)), jnp.float32) for _ in range(3))
    cases = {
        "plain": {},
        "causal": {"is_causal": True},
        "bias per head": {"bias": jnp.asarray(rng.normal(size=(4, 70, 70)), jnp.float32)},
        "bias for all heads": {"bias": jnp.asarray(rng.normal(size=(70, 70)), jnp.float32)},
        "padding mask": {"mask": jnp.asarray(np.arange(70) < np.array([70, 50])[:, None])[:, None, None, :],
                         "is_causal": True},
    }
    errors = {}
    for name, kw in cases.items():
        bias, kw = kw.get("bias"), {n: x for n, x in kw.items() if n != "bias"}
        argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)
        for custom in (True, False):
            def loss(attention, q, k, v, bias, **more):
                return jnp.sum(attention(q, k, v, bias=bias, **kw, **more) ** 2)

            # the bias's gradient too: a bias shared by the heads sums its gradient over both devices' heads
            want = jax.value_and_grad(lambda *x: loss(dot_product_attention, *x), argnums=argnums)(q, k, v, bias)
            got = jax.jit(jax.value_and_grad(
                lambda *x: loss(memory_efficient_attention, *x, devices=2, query_chunk_size=32, key_chunk_size=24,
                                custom_backward=custom), argnums=argnums))(q, k, v, bias)
            errors[f"{name}, custom_backward={custom}"] = max(
                float(jnp.max(jnp.abs(jnp.asarray(g) - jnp.asarray(w)))) / (1 + float(jnp.max(jnp.abs(w))))
                for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)))
    program = jax.jit(lambda q: memory_efficient_attention(q, k, v, devices=2)).lower(q).as_text()
    return {"devices": len(jax.devices()), "errors": errors, "sharded": "sdy.manual_computation" in program}
