"""A tiny two-block Trax language model trained on a period-4 recall task, for any attention layer."""

import jax
import jax.numpy as jnp
import numpy as np
from trax import layers as tl
from trax import shapes

from helpers import momentum_sgd

VOCAB = 16


def train_recall_lm(make_attention, *, seq: int, steps: int, batch: int = 16) -> list[float]:
    """Train (SGD with momentum) and return the loss per step; `make_attention()` builds one attention layer."""
    model = tl.Serial(
        tl.ShiftRight(mode="train"), tl.Embedding(VOCAB, 32),
        tl.Residual(tl.LayerNorm(), make_attention()),
        tl.Residual(tl.LayerNorm(), tl.Dense(64), tl.Relu(), tl.Dense(32)),
        tl.Residual(tl.LayerNorm(), make_attention()),
        tl.LayerNorm(), tl.Dense(VOCAB))

    def data(step):
        pattern = np.random.default_rng(step).integers(0, VOCAB, (batch, 4))
        return np.tile(pattern, (1, seq // 4))

    model.init(shapes.signature(data(0)), rng=jax.random.PRNGKey(0))
    state = model.state

    def loss(weights, tokens):
        logits, _ = model.pure_fn(tokens, weights, state, jax.random.PRNGKey(0))
        logp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[..., None], -1)[:, 4:])  # after one period

    _, losses = momentum_sgd(loss, model.weights, (jnp.asarray(data(i)) for i in range(steps)), lr=0.05)
    return losses
