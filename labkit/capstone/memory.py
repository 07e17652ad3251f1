"""Peak training memory of the Reformer's memory reforms, each point in a fresh process (`labkit.bench`).

* `depth_point`: one jitted forward + backward of a stack of `depth` blocks (self-attention `F`, feed-forward
  `G`), either the plain residual stack or the reversible one, same width and sequence.
* `ff_point`: one forward + backward of a feed-forward layer over a long sequence, whole or in chunks.

Each returns the peak extra resident memory of the compiled call (`PeakMemory`: compilation and inputs are
excluded) and the size of the weights, so a reader can tell activations from parameters.
"""

from __future__ import annotations

from labkit.bench.memory import MIB, PeakMemory
from labkit.bench.worker import run_in_worker

DEPTH_TARGET = "labkit.capstone.memory:depth_point"
FF_TARGET = "labkit.capstone.memory:ff_point"


def attention_block(w, x):
    """Causal multi-head self-attention `x [batch, seq, d] -> [batch, seq, d]`; `w = (w_qkv [d, 3, heads, h], w_o)`."""
    import jax

    w_qkv, w_o = w
    q, k, v = (jax.numpy.einsum("btd,dnh->btnh", x, w_qkv[:, i]) for i in range(3))
    return jax.numpy.einsum("btnh,nhd->btd", jax.nn.dot_product_attention(q, k, v, is_causal=True), w_o)


def ff_block(w, x):
    """Feed-forward block `relu(x @ w1) @ w2`: `x [batch, seq, d]`, `w = (w1 [d, d_ff], w2 [d_ff, d])`."""
    import jax

    return jax.nn.relu(x @ w[0]) @ w[1]


def _depth_inputs(spec: dict):
    """Seeded stacked weights `((w_qkv, w_o), (w1, w2))` with leading axis `depth`, and `x [batch, seq, d]`."""
    import jax

    depth, d, heads, d_ff = spec["depth"], spec["d_model"], spec["heads"], spec["d_ff"]
    keys = jax.random.split(jax.random.PRNGKey(0), 5)
    shapes = [(depth, d, 3, heads, d // heads), (depth, heads, d // heads, d), (depth, d, d_ff), (depth, d_ff, d)]
    w = [jax.random.normal(key, shape) * 0.02 for key, shape in zip(keys, shapes)]
    x = jax.random.normal(keys[4], (spec["batch"], spec["seq"], d))
    return ((w[0], w[1]), (w[2], w[3])), x


def _measure(step, *args) -> dict:
    """Peak extra MiB of one call of a compiled `step` (compiled before the measurement starts)."""
    import jax

    compiled = jax.jit(step).lower(*args).compile()
    peak = PeakMemory()
    peak.start()
    jax.block_until_ready(compiled(*args))
    return {"peak_extra_mib": peak.stop() / MIB, "method": peak.method}


def depth_point(spec: dict) -> dict:
    """Worker side: peak extra MiB of forward + backward of a `spec["kind"]` ("plain"/"reversible") stack."""
    import jax
    import jax.numpy as jnp

    from labkit.capstone.reversible import residual_stack, reversible_stack

    weights, x = _depth_inputs(spec)

    def loss(weights, x):
        if spec["kind"] == "reversible":
            y1, y2 = reversible_stack(attention_block, ff_block, weights, x, x)
            return jnp.sum((y1 + y2) ** 2)
        return jnp.sum(residual_stack(attention_block, ff_block, weights, x) ** 2)

    params = sum(leaf.size for leaf in jax.tree_util.tree_leaves(weights))
    return {**_measure(jax.grad(loss), weights, x), "param_mib": params * 4 / MIB}


def ff_point(spec: dict) -> dict:
    """Worker side: peak extra MiB of forward + backward of a feed-forward, whole or `spec["chunk"]` at a time."""
    import jax
    import jax.numpy as jnp

    from labkit.capstone.reversible import chunked_feed_forward, feed_forward

    keys = jax.random.split(jax.random.PRNGKey(0), 3)
    d, d_ff = spec["d_model"], spec["d_ff"]
    w = (jax.random.normal(keys[0], (d, d_ff)) * 0.05, jnp.zeros(d_ff),
         jax.random.normal(keys[1], (d_ff, d)) * 0.05, jnp.zeros(d))
    x = jax.random.normal(keys[2], (spec["batch"], spec["seq"], d))
    chunk = spec.get("chunk")

    def loss(w, x):
        out = chunked_feed_forward(x, *w, chunk) if chunk else feed_forward(x, *w)
        return jnp.sum(out ** 2)

    return _measure(jax.grad(loss), w, x)


def memory_rows(target: str, specs: list[dict], *, timeout_s: float = 300) -> list[dict]:
    """Run each spec in a fresh worker: the spec's fields plus the measurement, or `error`."""
    rows = []
    for spec in specs:
        done = run_in_worker(target, spec, timeout_s=timeout_s)
        rows.append({**spec, **(done.value if done.ok else {"error": done.error})})
    return rows
