"""One ready-to-call, already compiled step per framework: what a benchmark point times.

`STEPS[framework](fn, inputs, backward)` takes `fn(query, key, value)` and numpy inputs `[batch, seq, heads,
dim]` and returns `step()`, which runs one call (forward, or forward + gradient w.r.t. q, k, v) and waits for it.
"""

from __future__ import annotations

from typing import Any, Callable

Step = Callable[[], Any]


def jax_step(fn: Callable, inputs: list, backward: bool) -> Step:
    """`fn` jit-compiled ahead of time (compilation is not part of the step); `block_until_ready` each call."""
    import jax
    import jax.numpy as jnp

    if backward:
        # Gradient of a fixed random projection of the output, so no cotangent is trivially zero or one.
        out_shape = inputs[0].shape[:-1] + (inputs[2].shape[-1],)
        cotangent = jax.random.normal(jax.random.PRNGKey(1), out_shape, jnp.float32)
        program = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent), argnums=(0, 1, 2))
    else:
        program = fn
    arrays = [jnp.asarray(x) for x in inputs]
    compiled = jax.jit(program).lower(*arrays).compile()
    return lambda: jax.block_until_ready(compiled(*arrays))


def torch_step(fn: Callable, inputs: list, backward: bool) -> Step:
    """`fn` on torch tensors: under `no_grad` for the forward pass, else `.backward()` of a random projection."""
    import torch

    tensors = [torch.from_numpy(x).requires_grad_(backward) for x in inputs]
    if not backward:
        def step():
            with torch.no_grad():
                return fn(*tensors)
        return step
    generator = torch.Generator().manual_seed(1)
    cotangent = torch.randn(inputs[0].shape[:-1] + (inputs[2].shape[-1],), generator=generator)

    def step_backward():
        for t in tensors:
            t.grad = None
        (fn(*tensors) * cotangent).sum().backward()
        return [t.grad for t in tensors]
    return step_backward


def keras_step(fn: Callable, inputs: list, backward: bool) -> Step:
    """A Keras layer on the JAX backend: built eagerly on a short slice, then jitted like any JAX function."""
    if backward:
        raise ValueError("the Keras entries measure inference only")
    fn(*[x[:, :8] for x in inputs])  # builds the layer's weights eagerly, outside the jitted program
    return jax_step(fn, inputs, backward)


STEPS: dict[str, Callable[[Callable, list, bool], Step]] = {"jax": jax_step, "torch": torch_step,
                                                           "keras": keras_step}
