"""Trax's predict mode (fast decoding, one token per call) against the full causal forward, for
`tl.SelfAttention` and every labkit layer that decodes, with the logic of Trax's own
`efficient_attention_test._test_fast_inference`: same weights, tokens fed one at a time (or a prefix, then
one at a time), outputs equal to the whole sequence's causal outputs.

Trax 1.4.1's predict mode needs labkit's `fastmath.cond` shim (`labkit.compat.trax_cond`), which `import
labkit` installs once Trax is imported; without it the first test fails as Trax's own test does.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from trax import layers as tl
from trax import shapes

import labkit.layers
from labkit.attention import FAMILIES

SEQ, D_MODEL = 6, 13
COMMON = dict(n_heads=2, d_qk=7, d_v=5, causal=True, attention_dropout=0.0, output_dropout=0.0)


def _decoding_layers() -> dict:
    """Every registered family's layer that decodes (`decodes` set), with its test options."""
    found = {}
    for family in FAMILIES.values():
        layer = getattr(labkit.layers, family.layer, None) if family.layer else None
        if layer is not None and getattr(layer, "decodes", None):
            options = {k: v for k, v in family.layer_options.items() if k not in ("chunk_len", "n_chunks_before")}
            # Kernel attention's exp features shift by the largest logit seen: so far when decoding, over the
            # whole sequence in parallel, which agree to ~1e-4 through `eps` (tests/test_kernel.py: to 1e-7).
            found[family.layer] = (layer, options, 2e-5 if family.name != "kernel" else 1e-3)
    return found


def _fast_and_slow(layer_cls, x, prefix: int, **options):
    """The full causal forward and the same layer decoded in predict mode: `[B, SEQ, D_MODEL]` each.

    Jitted, one compilation per input length: with labkit's `stop_gradient` shim Trax's predict path traces.
    """
    slow = layer_cls(mode="eval", **COMMON, **options)
    slow.init(shapes.signature(x), rng=jax.random.PRNGKey(0))
    full = slow(x)
    fast = layer_cls(mode="predict", predict_mem_len=SEQ, predict_drop_len=SEQ, **COMMON, **options)
    fast.init(shapes.signature(x[:, :1]), rng=jax.random.PRNGKey(0))
    step = jax.jit(fast.pure_fn)  # (x, weights, state, rng) -> (out, state)
    state, rng, pieces = fast.state, jax.random.PRNGKey(1), []
    for start, stop in [(0, prefix)] + [(i, i + 1) for i in range(prefix, SEQ)]:
        out, state = step(x[:, start:stop], slow.weights, state, rng)
        pieces.append(out)
    return full, np.concatenate(pieces, axis=1)


def _inputs():
    return jax.random.uniform(jax.random.PRNGKey(0), (2, SEQ, D_MODEL), dtype=np.float32)


@pytest.mark.parametrize("options", [dict(chunk_len=None), dict(chunk_len=3, n_chunks_before=1)],
                         ids=["full", "chunked"])
def test_trax_self_attention_decodes(options):
    full, fast = _fast_and_slow(tl.SelfAttention, _inputs(), prefix=1, **options)
    np.testing.assert_allclose(fast, full, atol=1e-5)


@pytest.mark.parametrize("prefix", [1, 3])
@pytest.mark.parametrize("name", sorted(_decoding_layers()))
def test_labkit_layer_decodes(name, prefix):
    layer, options, atol = _decoding_layers()[name]
    full, fast = _fast_and_slow(layer, _inputs(), prefix=prefix, **options)
    np.testing.assert_allclose(fast, full, atol=atol)


def test_a_model_in_predict_mode_inits_and_decodes():
    """Inside a model, `init` traces the layer (the failure the stop_gradient shim fixes); then decode."""
    tokens = jax.random.randint(jax.random.PRNGKey(2), (2, SEQ), 0, 16)

    def model(mode):
        return tl.Serial(tl.Embedding(16, D_MODEL), labkit.layers.LinearSelfAttention(
            mode=mode, predict_mem_len=SEQ, predict_drop_len=SEQ, **COMMON))

    slow, fast = model("eval"), model("predict")
    slow.init(shapes.signature(tokens), rng=jax.random.PRNGKey(0))
    fast.init(shapes.signature(tokens[:, :1]), rng=jax.random.PRNGKey(0))
    fast.weights = slow.weights
    pieces = [fast(tokens[:, i:i + 1]) for i in range(SEQ)]
    np.testing.assert_allclose(np.concatenate(pieces, axis=1), slow(tokens), atol=2e-5)


def test_every_exact_or_recurrent_family_can_decode():
    """The families whose layers decode: at least the dense cache, exact chunked and linear attention."""
    assert {"DotProductSelfAttention", "MemoryEfficientSelfAttention", "LinearSelfAttention"} <= set(
        _decoding_layers()) | {"DotProductSelfAttention"}
    assert labkit.layers.DotProductSelfAttention.decodes is None  # it decodes with Trax's own maths


def test_shim_is_what_makes_trax_predict_work():
    """Trax's predict mode calls cond with one operand per branch, by keyword: jax.lax.cond refuses that form,
    the shim `import labkit` installed into Trax's JAX backend takes it and agrees with lax.cond. And it
    stops gradients on the decoded length, then uses it as a shape: the shim keeps Python ints ints."""
    from trax.fastmath.jax import JAX_BACKEND

    from labkit.compat import trax_cond, trax_stop_gradient

    assert JAX_BACKEND["cond"] is trax_cond and JAX_BACKEND["stop_gradient"] is trax_stop_gradient
    with pytest.raises(jax.errors.ConcretizationTypeError):
        jax.jit(lambda n: jnp.arange(jax.lax.stop_gradient(4)) * n)(2.0)
    assert trax_stop_gradient(4) == 4 and jax.jit(lambda n: jnp.arange(trax_stop_gradient(4)) * n)(2.0).shape == (4,)
    g = jax.grad(lambda x: (trax_stop_gradient(x) * x).sum())(np.float32(3.0))
    assert float(g) == 3.0  # the stopped factor counts as a constant
    old_form = dict(true_operand=np.float32(3.0), true_fun=lambda a: a * 2, false_operand=np.float32(5.0),
                    false_fun=lambda a: -a)
    with pytest.raises(TypeError, match="true_operand"):
        jax.lax.cond(True, **old_form)
    assert float(trax_cond(pred=True, **old_form)) == 6.0
    assert float(trax_cond(pred=False, **old_form)) == -5.0
    assert float(trax_cond(False, lambda a: a, lambda a: a + 1, np.float32(1.0))) == 2.0
