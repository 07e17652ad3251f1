"""Reversible residual blocks and the chunked feed-forward: the Reformer's two other memory reforms.

A reversible block (RevNet, used by the Reformer, Kitaev et al., 2020) keeps two streams and computes
`y1 = x1 + F(x2)`, `y2 = x2 + G(y1)`. Its inputs can be recomputed from its outputs (`x2 = y2 - G(y1)`,
`x1 = y1 - F(x2)`), so a stack of them needs to keep only the last block's outputs for the backward pass:
activation memory O(1) in the depth instead of O(depth), for one extra forward pass of F and G.

`reversible_stack` does exactly that with `jax.custom_vjp`: the forward keeps nothing per layer, the backward
walks the layers in reverse, rebuilding each block's inputs and taking its vector-Jacobian product.
`residual_stack` is the ordinary residual stack it is compared with.

The chunked feed-forward applies a position-wise feed-forward `relu(x W1 + b1) W2 + b2` to a block of positions
at a time, so its `[seq, d_ff]` hidden activation exists one chunk at a time (and, with `jax.checkpoint`, the
backward pass recomputes it chunk by chunk instead of keeping it).
"""

from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax import lax

Block = Callable[[Any, jax.Array], jax.Array]  # (weights, x [..., d]) -> [..., d]


def reversible_forward(x1, x2, f: Callable, g: Callable):
    """One reversible block: `(x1, x2) -> (y1, y2)` with `y1 = x1 + f(x2)`, `y2 = x2 + g(y1)`."""
    y1 = x1 + f(x2)
    return y1, x2 + g(y1)


def reversible_reverse(y1, y2, f: Callable, g: Callable):
    """The block's inputs from its outputs: `x2 = y2 - g(y1)`, then `x1 = y1 - f(x2)`."""
    x2 = y2 - g(y1)
    return y1 - f(x2), x2


def residual_stack(f: Block, g: Block, weights, x):
    """Plain pre-activation residual stack: per layer `x += f(wf, x); x += g(wg, x)`; `weights` stacked [L, ...]."""
    def layer(x, w):
        x = x + f(w[0], x)
        return x + g(w[1], x), None
    return lax.scan(layer, x, weights)[0]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def reversible_stack(f: Block, g: Block, weights, x1, x2):
    """A stack of reversible blocks over `weights = (wf, wg)` stacked [L, ...]: `(x1, x2) -> (y1, y2)`.

    Gradients keep only the final outputs and rebuild every block's inputs in the backward pass.
    """
    def layer(carry, w):
        return reversible_forward(*carry, functools.partial(f, w[0]), functools.partial(g, w[1])), None
    return lax.scan(layer, (x1, x2), weights)[0]


def _stack_forward(f, g, weights, x1, x2):
    outputs = reversible_stack(f, g, weights, x1, x2)
    return outputs, (weights, outputs)  # no per-layer activations: the point of reversibility


def _stack_backward(f, g, saved, cotangents):
    weights, (y1, y2) = saved

    def layer(carry, w):
        y1, y2, dy1, dy2 = carry
        g_out, g_vjp = jax.vjp(g, w[1], y1)
        x2 = y2 - g_out
        dwg, dy1_via_g = g_vjp(dy2)
        dy1 = dy1 + dy1_via_g  # y1 reaches the loss directly and through y2 = x2 + g(y1)
        f_out, f_vjp = jax.vjp(f, w[0], x2)
        dwf, dx2_via_f = f_vjp(dy1)
        return (y1 - f_out, x2, dy1, dy2 + dx2_via_f), (dwf, dwg)

    (_, _, dx1, dx2), dweights = lax.scan(layer, (y1, y2, *cotangents), weights, reverse=True)
    return dweights, dx1, dx2


reversible_stack.defvjp(_stack_forward, _stack_backward)


def feed_forward(x, w1, b1, w2, b2):
    """Position-wise feed-forward `relu(x @ w1 + b1) @ w2 + b2`: `x [..., d]`, `w1 [d, d_ff]`, `w2 [d_ff, d]`."""
    return jax.nn.relu(x @ w1 + b1) @ w2 + b2


def chunked_feed_forward(x, w1, b1, w2, b2, chunk_size: int):
    """`feed_forward` over `x [batch, seq, d]`, `chunk_size` positions at a time (`lax.map`, rematerialised).

    The sequence is padded to a whole number of chunks and the padding dropped again; each chunk is wrapped in
    `jax.checkpoint`, so the backward pass recomputes its `[chunk, d_ff]` hidden activation instead of keeping
    all of them.
    """
    *batch, seq, d = x.shape
    chunk_size = min(chunk_size, seq)
    n_chunks = -(-seq // chunk_size)
    pad = n_chunks * chunk_size - seq
    x = jnp.pad(x, [(0, 0)] * len(batch) + [(0, pad), (0, 0)])
    chunks = jnp.moveaxis(x.reshape(*batch, n_chunks, chunk_size, d), -3, 0)
    step = jax.checkpoint(lambda c: feed_forward(c, w1, b1, w2, b2))
    out = jnp.moveaxis(lax.map(step, chunks), 0, -3).reshape(*batch, n_chunks * chunk_size, -1)
    return out[..., :seq, :]
