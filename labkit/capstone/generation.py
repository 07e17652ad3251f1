"""Generation with a cache: the capstone LM's predict-mode twin (Trax's fast decoding), greedy decoding, timing.

`predict_twin` builds `models.language_model(..., mode='predict')` with the trained model's weights: each call
takes ONE token `[batch, 1]` and keeps what the attention needs in the model's state (Trax's memory of past
inputs for dense attention, the recurrent state for linear, kernel and LEAP attention; the position for the
positional encoding). `generate` decodes greedily one token per call; `time_per_token` measures a call's wall
time against the size of the cache (`max_len` positions): dense attention attends over the whole cache at every
step, a recurrent state costs the same at any length.
"""

from __future__ import annotations

import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

import labkit  # noqa: F401  (before Trax: the predict-mode shims)
from labkit.capstone import models


@dataclasses.dataclass
class Twin:
    """A predict-mode model, its weights and its empty decoding state; `step` is its jitted `pure_fn`."""

    model: object
    weights: object
    state: object
    batch: int

    def __post_init__(self):
        self.step = jax.jit(self.model.pure_fn)  # (tokens [B, 1], weights, state, rng) -> (logits, state)


def predict_twin(family: str, vocab: int, weights=None, *, batch: int = 1, seed: int = 0, **shape) -> Twin:
    """The predict-mode twin of `language_model(family, vocab, **shape)`, carrying `weights` (fresh if None).

    `shape`: `d_model`, `n_layers`, `n_heads`, `max_len` as given to `models.language_model`; `max_len` is also
    the number of positions the cache holds.
    """
    from trax import shapes

    model = models.language_model(family, vocab, mode="predict", **shape)
    model.init(shapes.ShapeDtype((batch, 1), jnp.int32), rng=jax.random.PRNGKey(seed))
    return Twin(model, model.weights if weights is None else weights, model.state, batch)


def decode(twin: Twin, tokens: np.ndarray) -> np.ndarray:
    """Feed `tokens [batch, T]` one per call from an empty cache -> logits `[batch, T, vocab]` (teacher forcing)."""
    state, rng, logits = twin.state, jax.random.PRNGKey(0), []
    for t in range(tokens.shape[1]):
        out, state = twin.step(jnp.asarray(tokens[:, t:t + 1]), twin.weights, state, rng)
        logits.append(np.asarray(out))
    return np.concatenate(logits, axis=1)


def generate(twin: Twin, prompt: np.ndarray, n_new: int) -> np.ndarray:
    """Greedy decoding: `prompt [batch, P]` fed token by token, then `n_new` argmax tokens -> `[batch, P + n_new]`."""
    state, rng = twin.state, jax.random.PRNGKey(0)
    tokens = [jnp.asarray(prompt[:, t:t + 1]) for t in range(prompt.shape[1])]
    for t in range(prompt.shape[1] + n_new - 1):
        logits, state = twin.step(tokens[t], twin.weights, state, rng)
        if t + 1 >= len(tokens):
            tokens.append(jnp.argmax(logits[:, -1:], axis=-1).astype(jnp.int32))
    return np.concatenate([np.asarray(t) for t in tokens], axis=1)


def time_per_token(twin: Twin, n_tokens: int = 32, repeats: int = 3) -> float:
    """Median wall time (s) of one decoding call, over `n_tokens` calls after a compiling one, best of `repeats`."""
    token, rng = jnp.zeros((twin.batch, 1), jnp.int32), jax.random.PRNGKey(0)
    best = np.inf
    for _ in range(repeats):
        state = twin.state
        _, state = twin.step(token, twin.weights, state, rng)  # compiles once; also the first position
        times = []
        for _ in range(n_tokens):
            start = time.perf_counter()
            out, state = twin.step(token, twin.weights, state, rng)
            jax.block_until_ready(out)
            times.append(time.perf_counter() - start)
        best = min(best, float(np.median(times)))
    return best
