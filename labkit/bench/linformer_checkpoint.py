"""Lab 06: peak memory of a Linformer stack's training step at each checkpoint level, one worker per level.

`linformer_self_attention(..., checkpoint=level)` trades compute for memory in the backward pass; this
measures what each level really saves on this machine: the peak extra resident memory of one jitted
forward + backward of a residual stack of `depth` Linformer layers, in a fresh process per level.
"""

from __future__ import annotations

from labkit.attention.linformer import CHECKPOINT_LEVELS, linformer_self_attention
from labkit.bench.memory import MIB, PeakMemory
from labkit.bench.worker import run_in_worker


def _stack(spec: dict):
    """Seeded weights `[(qkvo, e_proj)]` per layer and an input `x [batch, seq, d_model]`."""
    import jax
    import numpy as np

    b, t, d, n_heads, dh, k, depth = (spec[name] for name in ("batch", "seq", "d_model", "heads", "head_dim",
                                                               "proj_k", "depth"))
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    x = jax.random.normal(keys[0], (b, t, d))
    shapes = [(n_heads, d, dh)] * 3 + [(n_heads, dh, d)]  # w_q, w_k, w_v, w_o as in tl.SelfAttention
    layers = [(tuple(jax.random.normal(jax.random.fold_in(keys[i], layer), shape) * 0.05
                     for i, shape in zip(range(1, 5), shapes)),
               jax.random.normal(jax.random.fold_in(keys[5], layer), (n_heads, k, t)) / np.sqrt(k))
              for layer in range(depth)]
    return layers, x


def checkpoint_point(spec: dict) -> dict:
    """Worker side: peak extra resident MiB of one compiled forward + backward at `spec["level"]`."""
    import jax
    import jax.numpy as jnp

    layers, x = _stack(spec)

    def loss(layers, x):
        for qkvo, e in layers:
            x = x + linformer_self_attention(x, qkvo, e, checkpoint=spec["level"])
        return jnp.sum(x ** 2)

    step = jax.jit(jax.grad(loss)).lower(layers, x).compile()
    peak = PeakMemory()
    peak.start()
    jax.block_until_ready(step(layers, x))
    return {"peak_extra_mib": peak.stop() / MIB, "method": peak.method}


def checkpoint_memory_table(levels=CHECKPOINT_LEVELS, *, batch: int = 2, seq: int = 4096, d_model: int = 128,
                            heads: int = 4, head_dim: int = 64, proj_k: int = 256, depth: int = 3,
                            timeout_s: float = 600) -> list[dict]:
    """One row per level: the sizes, and `peak_extra_mib` + `method`, or `error` if that worker failed."""
    rows = []
    for level in levels:
        spec = dict(level=level, batch=batch, seq=seq, d_model=d_model, heads=heads, head_dim=head_dim,
                    proj_k=proj_k, depth=depth)
        done = run_in_worker("labkit.bench.linformer_checkpoint:checkpoint_point", spec, timeout_s=timeout_s)
        rows.append({**spec, **(done.value if done.ok else {"error": done.error})})
    return rows
