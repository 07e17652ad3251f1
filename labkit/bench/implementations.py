"""What the benchmark can measure: every family in `labkit.attention.FAMILIES`, plus a few outside labkit.

Each registered family is an implementation of the same name, called through `Family.apply` (which fills in
its extra inputs, e.g. LEAP's focus or Linformer's projections) with the family's default `options`, and
estimated with the family's own memory model. `EXTRA_IMPLEMENTATIONS` adds what is not a family: JAX's and
torch's built-in attention, the Keras layers of lab 03, and the chunkwise variant of linear attention.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any, Callable

from labkit.attention import FAMILIES, Family, Problem


@dataclasses.dataclass(frozen=True)
class Implementation:
    """How to build one attention implementation for the benchmark.

    `make(causal=..., **options)` returns `fn(query, key, value) -> out` on `[batch, seq, heads, dim]` arrays
    of its framework (`"jax"` arrays, `"torch"` tensors, or `"keras"`: jax arrays through a Keras layer on the
    JAX backend); `requires` names modules that must import, else the point is skipped; `causal` lists the
    `is_causal` values it supports; `memory(problem, options)` estimates the peak extra bytes of one call.
    """

    description: str
    make: Callable[..., Callable]
    memory: Callable[[Problem, dict], int]
    framework: str = "jax"
    requires: tuple[str, ...] = ()
    causal: tuple[bool, ...] = (False, True)


def _make_family(family: Family, defaults: dict, *, causal: bool, **options) -> Callable:
    """`fn(query, key, value)` calling the family with `defaults` updated by `options`."""
    import jax

    options = {**defaults, **options}
    prng_key = jax.random.PRNGKey(0)

    def attend(query, key, value):
        # Extra inputs depend on shapes only: computed once while tracing, they are constants of the compiled
        # program instead of work timed in every call.
        with jax.ensure_compile_time_eval():
            extras, rest = family.inputs(prng_key, query, key, value, options)
        return family.function(query, None if family.shared_qk else key, value, is_causal=causal,
                               **{**extras, **rest})

    return attend


def _family_memory(family: Family, defaults: dict, problem: Problem, options: dict) -> int:
    return family.memory(problem, {**defaults, **options})


def _describe(family: Family, defaults: dict) -> str:
    kind = "exact" if family.exact else "approximate"
    settings = "".join(f", {name}={value!r}" for name, value in defaults.items())
    return f"{family.function.__module__}.{family.function.__name__} ({kind}, {family.lab}{settings})"


def family_implementation(family: Family, defaults: dict | None = None,
                          description: str | None = None) -> Implementation:
    """The benchmark entry of a registered family; `defaults` update the family's own default options."""
    defaults = {**family.options, **(defaults or {})}
    return Implementation(description or _describe(family, defaults), functools.partial(_make_family, family, defaults),
                          functools.partial(_family_memory, family, defaults), causal=family.causal)


def _make_jax(*, causal: bool, **options) -> Callable:
    import jax

    return functools.partial(jax.nn.dot_product_attention, is_causal=causal, **options)


def _make_torch(*, causal: bool, **options) -> Callable:
    import torch.nn.functional as F

    def sdpa(query, key, value):
        # torch wants [batch, heads, seq, dim]; transposed views keep the last dim contiguous.
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             is_causal=causal, **options)
        return out.transpose(1, 2)

    return sdpa


def _make_keras(memory_efficient: bool, *, causal: bool, **options) -> Callable:
    """Keras's MultiHeadAttention, or labkit's drop-in, on the JAX backend: `fn(q, k, v)` projects and attends.

    Inputs `[batch, seq, heads, dim]` are flattened to Keras's `[batch, seq, heads * dim]`; the layer is built
    on the first (eager) call, then jitted like every other implementation.
    """
    os.environ.setdefault("KERAS_BACKEND", "jax")
    import keras

    from labkit.keras import MemoryEfficientMultiHeadAttention

    cls = MemoryEfficientMultiHeadAttention if memory_efficient else keras.layers.MultiHeadAttention
    built: dict[str, Any] = {}

    def attend(query, key, value):
        if "layer" not in built:
            built["layer"] = cls(num_heads=query.shape[2], key_dim=query.shape[3], **options)
        b = query.shape[0]
        flat = [x.reshape(b, x.shape[1], -1) for x in (query, key, value)]  # [B, L, N * H]
        return built["layer"](flat[0], flat[2], key=flat[1], use_causal_mask=causal)

    return attend


def _with_projections(memory: Callable[[Problem, dict], int], defaults: dict, problem: Problem,
                      options: dict) -> int:
    # The Keras layers also hold the projected q, k, v.
    return memory(problem, {**defaults, **options}) + 3 * problem.io_bytes


def _extra_implementations() -> dict[str, Implementation]:
    dense, blockwise = FAMILIES["dense"].memory, FAMILIES["memory_efficient"].memory
    chunks = {"query_chunk_size": 512, "key_chunk_size": 512}
    return {
        "jax": Implementation("jax.nn.dot_product_attention (XLA, full score matrix on CPU)", _make_jax, dense),
        "torch": Implementation("torch.nn.functional.scaled_dot_product_attention (CPU flash kernel)",
                                _make_torch, blockwise, framework="torch", requires=("torch",)),
        # Lab 03, the Keras drop-in: projections included, so memory is compared between these two entries.
        "keras_mha": Implementation("keras.layers.MultiHeadAttention (JAX backend)",
                                    functools.partial(_make_keras, False),
                                    functools.partial(_with_projections, dense, {}), framework="keras",
                                    requires=("keras",)),
        "keras_chunked": Implementation(
            "labkit.keras.MemoryEfficientMultiHeadAttention (JAX backend, chunks of 512)",
            functools.partial(_make_keras, True), functools.partial(_with_projections, blockwise, chunks),
            framework="keras", requires=("keras",)),
        # Lab 04: a lax.scan over chunks with a constant-memory custom gradient, instead of prefix sums.
        "linear_chunkwise": family_implementation(
            FAMILIES["linear"], {"chunk_size": 128},
            "labkit.attention.linear.linear_attention(chunk_size=128): lax.scan over chunks, constant-memory grad"),
    }


EXTRA_IMPLEMENTATIONS: dict[str, Implementation] = _extra_implementations()
IMPLEMENTATIONS: dict[str, Implementation] = {
    **{name: family_implementation(family) for name, family in FAMILIES.items()}, **EXTRA_IMPLEMENTATIONS}
