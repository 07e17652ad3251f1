"""The attention contract, for every family in `labkit.attention.FAMILIES`: a new family is tested by registering.

Each test states one promise of labkit/attention/__init__.py's contract and checks it against an independent
reference (dense attention, the same call without batch dims or without jit, a perturbation that must not
matter), on small inputs whose lengths the families' small chunk sizes do not divide.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_qkv

from labkit.attention import FAMILIES, Problem, dot_product_attention

NAMES = list(FAMILIES)
T = 13  # no family's small chunk or block size divides it


def _call(family, q, k, v, bias=None, mask=None, *, is_causal=False, **options):
    return family.apply(q, k, v, bias, mask, is_causal=is_causal, **{**family.small_options, **options})


def _inputs(seed=0, batch=(2,), t=T, s=None, hv=3):
    return tuple(jnp.asarray(a) for a in random_qkv(seed, batch, t, s, 2, 4, hv))


def _family_and_mode(names=NAMES):
    return [pytest.param(name, causal, id=f"{name}-{'causal' if causal else 'full'}")
            for name in names for causal in FAMILIES[name].causal]


@pytest.mark.parametrize("name,causal", _family_and_mode())
def test_shape_dtype_and_finite_on_lengths_the_chunks_do_not_divide(name, causal):
    family = FAMILIES[name]
    q, k, v = _inputs()
    out = _call(family, q, k, v, is_causal=causal)
    assert out.shape == (2, T, 2, 3) and out.dtype == jnp.float32
    assert np.isfinite(np.asarray(out)).all()
    half = _call(family, *(a.astype(jnp.bfloat16) for a in (q, k, v)), is_causal=causal)
    assert half.dtype == jnp.bfloat16, "the output keeps value's dtype"


@pytest.mark.parametrize("name,causal", _family_and_mode([n for n in NAMES if FAMILIES[n].exact]))
def test_exact_families_equal_dense_attention(name, causal):
    family = FAMILIES[name]
    q, k, v = _inputs(1)
    np.testing.assert_allclose(_call(family, q, k, v, is_causal=causal),
                               dot_product_attention(q, k, v, is_causal=causal), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,causal", _family_and_mode())
def test_batch_dims_are_independent_examples(name, causal):
    family = FAMILIES[name]
    q, k, v = _inputs(2, batch=(2, 3))
    both = _call(family, q, k, v, is_causal=causal)
    for b in (0, 1):
        for c in (0, 2):
            one = _call(family, q[b, c], k[b, c], v[b, c], is_causal=causal)  # no batch dims at all
            if family.shared_qk:  # LSH draws its rotations per example and head: only the shape must agree
                assert one.shape == both[b, c].shape
                continue
            np.testing.assert_allclose(both[b, c], one, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name,causal", _family_and_mode())
def test_jit_gives_the_eager_result(name, causal):
    family = FAMILIES[name]
    q, k, v = _inputs(3)
    eager = _call(family, q, k, v, is_causal=causal)
    jitted = jax.jit(lambda q, k, v: _call(family, q, k, v, is_causal=causal))(q, k, v)
    np.testing.assert_allclose(jitted, eager, atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name,causal", _family_and_mode())
def test_vmap_over_an_outer_axis_equals_a_loop(name, causal):
    family = FAMILIES[name]
    q, k, v = _inputs(4, batch=(3,))
    mapped = jax.vmap(lambda q, k, v: _call(family, q, k, v, is_causal=causal))(q, k, v)
    for b in range(3):
        np.testing.assert_allclose(mapped[b], _call(family, q[b], k[b], v[b], is_causal=causal),
                                   atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("name,causal", _family_and_mode())
def test_gradients_are_finite_and_exact_ones_match_dense(name, causal):
    family = FAMILIES[name]
    q, k, v = _inputs(5)
    w = jnp.asarray(np.random.default_rng(6).normal(size=(2, T, 2, 3)), jnp.float32)
    loss = lambda fn: (lambda q, k, v: jnp.sum(fn(q, k, v) * w))
    got = jax.grad(loss(lambda q, k, v: _call(family, q, k, v, is_causal=causal)), argnums=(0, 1, 2))(q, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in got)
    if family.exact:
        want = jax.grad(loss(lambda q, k, v: dot_product_attention(q, k, v, is_causal=causal)),
                        argnums=(0, 1, 2))(q, k, v)
        for g, d, what in zip(got, want, "qkv"):
            np.testing.assert_allclose(g, d, atol=2e-5, rtol=1e-4, err_msg=f"d{what}")


@pytest.mark.parametrize("name", [n for n in NAMES if FAMILIES[n].mask != "none"])
def test_a_key_padding_mask_hides_those_keys(name):
    family = FAMILIES[name]
    q, k, v = _inputs(7)
    keep = np.ones((2, 1, 1, T), bool)
    keep[0, ..., [2, 9]] = False
    keep[1, ..., -3:] = False
    hidden = ~keep[:, 0, 0, :, None, None]
    k2 = k if family.shared_qk else jnp.where(hidden, 50.0, k)  # whatever hidden keys hold must not matter
    v2 = jnp.where(hidden, -50.0, v)
    causal = family.causal[0]
    a = _call(family, q, k, v, mask=jnp.asarray(keep), is_causal=causal)
    b = _call(family, q, k2, v2, mask=jnp.asarray(keep), is_causal=causal)
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)
    if family.exact:
        np.testing.assert_allclose(a, dot_product_attention(q, k, v, mask=jnp.asarray(keep), is_causal=causal),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [n for n in NAMES if True in FAMILIES[n].causal])
def test_causal_outputs_do_not_see_later_values(name):
    family = FAMILIES[name]
    q, k, v = _inputs(8)
    later = np.arange(T)[None, :, None, None] > 6
    v2 = jnp.where(later, 100.0, v)
    a = _call(family, q, k, v, is_causal=True)
    b = _call(family, q, k, v2, is_causal=True)
    np.testing.assert_allclose(a[:, :7], b[:, :7], atol=1e-4, rtol=1e-4)
    assert not np.allclose(a[:, 7:], b[:, 7:]), "later values must change later outputs"


@pytest.mark.parametrize("name", [n for n in NAMES if not FAMILIES[n].self_only])
def test_cross_attention_with_more_keys_than_queries(name):
    family = FAMILIES[name]
    q, k, v = _inputs(9, t=6, s=T)
    out = _call(family, q, k, v)
    assert out.shape == (2, 6, 2, 3)
    if family.exact:
        np.testing.assert_allclose(out, dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_bad_arguments_are_named_with_the_shapes_seen(name):
    family = FAMILIES[name]
    q, k, v = _inputs(10)
    with pytest.raises((ValueError, TypeError), match="value"):
        _call(family, q, k, v[:, :, :1])  # a different number of heads
    if not family.bias:
        with pytest.raises(ValueError, match=r"bias.*\(2, 2, 13, 13\)|\(2, 2, 13, 13\).*bias"):
            _call(family, q, k, v, bias=jnp.zeros((2, 2, T, T)), is_causal=family.causal[0])
    if family.mask == "keys":
        with pytest.raises(ValueError, match=r"mask.*\(2, 2, 13, 13\)"):
            _call(family, q, k, v, mask=jnp.ones((2, 2, T, T), bool), is_causal=family.causal[0])
    if family.shared_qk:
        with pytest.raises(ValueError, match="key=None"):
            family.function(q, k, v, **family.small_options, **family.extra_inputs(jax.random.PRNGKey(0), q, k, v))


@pytest.mark.parametrize("name", NAMES)
def test_memory_model_is_positive_and_grows_with_length(name):
    family = FAMILIES[name]
    small, large = (family.memory(Problem(1, n, 4, 64, causal=family.causal[-1]), family.options)
                    for n in (1024, 4096))
    assert 0 < small < large
