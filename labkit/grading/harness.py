"""Running candidates fast: functions under `jit`, and a learner's Trax layer on the weights of Trax's own.

Trax is imported when a case runs, never when the registries load. Each case builds Trax's layer,
initialises it from a seed, and runs the learner's layer with those weights and that state. The call is
jitted, as Trax does when it trains: one compilation per case instead of one per operation (a check
takes about a second, not ten). `forward_unbatched` is wrapped so a wrong return structure is reported
in plain words rather than as a `vmap` error.
"""

from __future__ import annotations

from typing import Any, Callable

import jax

from labkit.grading.explain import guard_forward_unbatched


def _static(value: Any) -> bool:
    return value is None or callable(value) or isinstance(value, (bool, int, str))


def run_jitted(candidate: Callable, args: tuple, kwargs: dict) -> Any:
    """Run a function candidate jit-compiled (arguments that are Python scalars, None or functions stay static).

    One compilation per case instead of one per operation, so a check answers in a second or two. Code that
    `jit` cannot trace (a Python `if` on values, numpy calls) runs again as written, so the learner sees the
    error their own code raises, if any.
    """
    positions = tuple(i for i, a in enumerate(args) if _static(a))
    names = tuple(name for name, value in kwargs.items() if _static(value))
    if len(positions) == len(args) and len(names) == len(kwargs):
        return candidate(*args, **kwargs)  # no array argument: nothing to compile (and ints stay Python ints)
    try:
        return jax.jit(candidate, static_argnums=positions, static_argnames=names)(*args, **kwargs)
    except Exception:  # noqa: BLE001 - run it eagerly: its own error (if any) is the one to report
        return candidate(*args, **kwargs)


def trax_layer(name: str) -> type:
    """The Trax layer class `trax.layers.<name>`, imported on first use."""
    from trax import layers as tl

    return getattr(tl, name)


class LazyTraxLayer:
    """Stands for a Trax layer class (e.g. "SelfAttention") without importing Trax until a case runs."""

    def __init__(self, name: str):
        self.name = name

    def __call__(self, **kwargs):
        return trax_layer(self.name)(**kwargs)

    def load(self) -> type:
        """The Trax class itself."""
        return trax_layer(self.name)


def _output_only(output: Any, state: Any) -> Any:
    return output


def run_with_weights_of(name: str, graded: Callable[[Any, Any], Any] = _output_only
                        ) -> Callable[[Any, tuple, dict], Any]:
    """A `run` for layer exercises: `(layer_cls, (x, seed), kwargs) -> graded(output, new state)`.

    The learner's `layer_cls(**kwargs)` runs with the weights and state of `trax.layers.<name>(**kwargs)`
    initialised from `seed`, on `x [batch, seq, d_model]`; by default only the output is graded.
    """

    def run(layer_cls, args, kwargs):
        from trax import shapes

        x, seed = args
        reference = trax_layer(name)(**kwargs)
        reference.init(shapes.signature(x), rng=jax.random.PRNGKey(seed))
        layer = guard_forward_unbatched(layer_cls(**kwargs))
        output, state = jax.jit(layer.pure_fn)(x, reference.weights, reference.state, jax.random.PRNGKey(seed + 1))
        return graded(output, state)

    return run


def self_attention_with(attend: Callable) -> Callable[..., Any]:
    """A factory of tl.SelfAttention subclasses whose per-head attention is `attend(q, k, v, causal)`.

    `attend` gets one head's q `[T, d_qk]`, k `[T, d_qk]`, v `[T, d_v]` and the layer's `causal` flag;
    used to write out layer mistakes.
    """

    def build(**kwargs):
        class PerHead(trax_layer("SelfAttention")):
            def forward_unbatched(self, x, mask=None, *, weights, state, rng, update_state):
                w_q, w_k, w_v, w_o = weights
                return attend(x @ w_q, x @ w_k, x @ w_v, self._causal) @ w_o, state

        return PerHead(**kwargs)

    return build
