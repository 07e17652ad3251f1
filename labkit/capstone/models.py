"""Small Trax models whose attention is any registered family, and the training step they share.

`attention_layer(family, ...)` builds the family's `labkit.layers` class (named by `FAMILIES[family].layer`)
with the capstone's options; `language_model` (causal, for recall and generation) and `classifier` (mean-pooled,
for ListOps) stack pre-norm blocks around it. `Trainer` is a minimal Adam loop over a model's `pure_fn`, so
every family gets the same optimiser, steps and batches, and the loss counts only weighted positions.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

import labkit  # noqa: F401  (before Trax: quiet start-up and the predict-mode shim)
from labkit.attention import FAMILIES
from labkit.capstone.tasks import Batch

# Per-family options for the capstone's lengths (64..1024): blocks and features sized for short sequences.
CAPSTONE_OPTIONS = {
    "lsh": {"chunk_len": 16, "n_hashes": 2},
    "memory_efficient": {"query_chunk_size": 32, "key_chunk_size": 32},
    "kernel": {"num_random_features": 32},
    "leap": {},
    "linformer": {"proj_k": 16},
}
CAUSAL_FAMILIES = ("dense", "lsh", "memory_efficient", "linear", "kernel", "leap")


def attention_layer(family: str, *, d_model: int, n_heads: int, causal: bool, max_len: int,
                    mode: str = "train"):
    """The family's Trax self-attention layer, `[batch, seq, d_model] -> [batch, seq, d_model]`."""
    from labkit import layers

    record = FAMILIES[family]
    options = dict(CAPSTONE_OPTIONS.get(family, record.layer_options))
    if family == "linformer":
        options["max_len"] = max_len
    if mode == "predict":  # Trax keeps the last `predict_mem_len` inputs; drop none before `max_len`
        options.update(predict_mem_len=max_len, predict_drop_len=max_len)
    head = d_model // n_heads
    return getattr(layers, record.layer)(n_heads=n_heads, d_qk=head, d_v=head, causal=causal, mode=mode, **options)


def _blocks(family: str, d_model: int, n_layers: int, n_heads: int, causal: bool, max_len: int, mode: str):
    from trax import layers as tl

    return [tl.Serial(
        tl.Residual(tl.LayerNorm(), attention_layer(family, d_model=d_model, n_heads=n_heads, causal=causal,
                                                    max_len=max_len, mode=mode)),
        tl.Residual(tl.LayerNorm(), tl.Dense(4 * d_model), tl.Relu(), tl.Dense(d_model)),
    ) for _ in range(n_layers)]


def language_model(family: str, vocab: int, *, d_model: int = 64, n_layers: int = 2, n_heads: int = 2,
                   max_len: int = 2048, mode: str = "train"):
    """Causal LM: tokens `[batch, seq]` -> next-token logits `[batch, seq, vocab]`."""
    from trax import layers as tl

    return tl.Serial(tl.Embedding(vocab, d_model), tl.PositionalEncoding(max_len=max_len, mode=mode),
                     *_blocks(family, d_model, n_layers, n_heads, True, max_len, mode),
                     tl.LayerNorm(), tl.Dense(vocab))


def classifier(family: str, vocab: int, n_classes: int, *, d_model: int = 64, n_layers: int = 2,
               n_heads: int = 2, max_len: int = 2048):
    """Bidirectional encoder, mean-pooled: tokens `[batch, seq]` -> class logits `[batch, n_classes]`."""
    from trax import layers as tl

    return tl.Serial(tl.Embedding(vocab, d_model), tl.PositionalEncoding(max_len=max_len),
                     *_blocks(family, d_model, n_layers, n_heads, False, max_len, "train"),
                     tl.LayerNorm(), tl.Mean(axis=1), tl.Dense(n_classes))


def weighted_nll(logits, targets, weights):
    """Mean negative log-likelihood of `targets` over positions with weight 1: `logits [..., vocab]`."""
    logp = jax.nn.log_softmax(logits)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    return (nll * weights).sum() / weights.sum()


def count_params(weights) -> int:
    """Number of scalars in a Trax weights tree."""
    return int(sum(np.size(leaf) for leaf in jax.tree_util.tree_leaves(weights)))


@dataclasses.dataclass
class Trainer:
    """Adam (lr, b1 0.9, b2 0.99) on `model.pure_fn` with the weighted loss; one jitted step."""

    model: object
    lr: float = 3e-3
    seed: int = 0

    def __post_init__(self):
        self._step = jax.jit(self._update)
        self._forward = jax.jit(lambda weights, state, x, rng: self.model.pure_fn(x, weights, state, rng)[0])
        self.step_times: list[float] = []

    def init(self, example: Batch) -> None:
        """Initialise weights, state and Adam moments for inputs shaped like `example.inputs`."""
        from trax import shapes

        self.model.init(shapes.signature(jnp.asarray(example.inputs)), rng=jax.random.PRNGKey(self.seed))
        self.weights, self.state = self.model.weights, self.model.state
        zeros = jax.tree_util.tree_map(jnp.zeros_like, self.weights)
        self.opt = (zeros, zeros, jnp.zeros((), jnp.int32))
        # Compiled ahead of time, so the first step's run can be measured apart from its compilation.
        self._step = self._step.lower(self.weights, self.state, self.opt, *self._arrays(example),
                                      jax.random.PRNGKey(0)).compile()

    @staticmethod
    def _arrays(batch: Batch) -> tuple:
        return tuple(jnp.asarray(a) for a in (batch.inputs, batch.targets, batch.weights))

    def _update(self, weights, state, opt, x, y, w, rng):
        def loss(weights):
            logits, new_state = self.model.pure_fn(x, weights, state, rng)
            return weighted_nll(logits, y, w), new_state
        (value, state), grads = jax.value_and_grad(loss, has_aux=True)(weights)
        m, v, t = opt
        t = t + 1
        m = jax.tree_util.tree_map(lambda m, g: 0.9 * m + 0.1 * g, m, grads)
        v = jax.tree_util.tree_map(lambda v, g: 0.99 * v + 0.01 * g * g, v, grads)
        scale = self.lr * jnp.sqrt(1 - 0.99 ** t) / (1 - 0.9 ** t)
        weights = jax.tree_util.tree_map(lambda p, m, v: p - scale * m / (jnp.sqrt(v) + 1e-8), weights, m, v)
        return weights, state, (m, v, t), value

    def step(self, batch: Batch) -> float:
        """One training step on `batch`; records its wall time; returns the loss."""
        rng = jax.random.fold_in(jax.random.PRNGKey(self.seed), len(self.step_times))
        start = time.perf_counter()
        self.weights, self.state, self.opt, loss = self._step(self.weights, self.state, self.opt,
                                                              *self._arrays(batch), rng)
        loss = float(loss)
        self.step_times.append(time.perf_counter() - start)
        return loss

    def predict(self, batch: Batch):
        """The model's outputs on `batch.inputs` with the current weights."""
        return self._forward(self.weights, self.state, jnp.asarray(batch.inputs), jax.random.PRNGKey(self.seed))

    def fit(self, make_batch: Callable[[int], Batch], steps: int) -> list[float]:
        """`steps` steps on `make_batch(step)`; the losses."""
        return [self.step(make_batch(i)) for i in range(steps)]
