"""FlashAttention in Pallas (labkit.attention.flash): outputs and gradients against dense attention.

On CPU every kernel runs in Pallas's interpret mode (slow), so the sizes stay small; the GPU test compiles the
kernels and runs only where JAX sees a GPU.
"""

from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labkit.attention.dense import dot_product_attention
from labkit.attention.flash import flash_attention

ON_GPU = jax.default_backend() == "gpu"


def _qkv(seed, batch, t, s, heads, h, hv=None, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    shapes = ((*batch, t, heads, h), (*batch, s, heads, h), (*batch, s, heads, hv or h))
    return tuple(jnp.asarray(rng.normal(size=shape), dtype) for shape in shapes)


# (batch dims, T, S, heads, H, Hv, block_q, block_k): blocks that divide, that do not, T != S, no batch dims.
SHAPES = [
    pytest.param((2,), 64, 64, 2, 16, 16, 16, 16, id="divides"),
    pytest.param((1,), 50, 37, 2, 8, 12, 16, 16, id="neither-divides-T>S"),
    pytest.param((), 37, 70, 1, 8, 8, 16, 32, id="no-batch-T<S-blocks-differ"),
    pytest.param((2, 1), 24, 24, 1, 4, 4, 8, 16, id="two-batch-dims"),
    pytest.param((1,), 1, 1, 1, 4, 4, 16, 16, id="length-1"),
]


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
@pytest.mark.parametrize("batch,t,s,heads,h,hv,bq,bk", SHAPES)
def test_forward_and_gradients_match_dense(batch, t, s, heads, h, hv, bq, bk, causal):
    q, k, v = _qkv(0, batch, t, s, heads, h, hv)
    cot = jnp.asarray(np.random.default_rng(1).normal(size=(*batch, t, heads, hv)), jnp.float32)

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) * cot)

    flash = lambda q, k, v: flash_attention(q, k, v, is_causal=causal, block_q=bq, block_k=bk)  # noqa: E731
    dense = lambda q, k, v: dot_product_attention(q, k, v, is_causal=causal)  # noqa: E731
    np.testing.assert_allclose(flash(q, k, v), dense(q, k, v), atol=1e-5, rtol=1e-5)
    got, want = jax.grad(loss(flash), (0, 1, 2))(q, k, v), jax.grad(loss(dense), (0, 1, 2))(q, k, v)
    for name, g, w in zip("qkv", got, want):
        np.testing.assert_allclose(g, w, atol=1e-5, rtol=1e-5, err_msg=f"d{name}")


def test_matches_jax_with_scale_under_jit_and_vmap():
    q, k, v = _qkv(2, (3,), 32, 32, 2, 8)
    want = jax.nn.dot_product_attention(q, k, v, scale=0.3, is_causal=True)
    fn = jax.jit(lambda q, k, v: flash_attention(q, k, v, scale=0.3, is_causal=True, block_q=16, block_k=8))
    np.testing.assert_allclose(fn(q, k, v), want, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(jax.vmap(fn)(q[:, None], k[:, None], v[:, None])[:, 0], want, atol=1e-5, rtol=1e-5)


def test_large_logits_stay_finite_and_exact():
    q, k, v = _qkv(3, (1,), 40, 40, 1, 8)
    q, k = q * 30, k * 30  # scores up to ~1e4: a softmax without the running maximum overflows
    out = flash_attention(q, k, v, block_q=16, block_k=16)
    assert np.isfinite(np.asarray(out)).all()
    np.testing.assert_allclose(out, dot_product_attention(q, k, v), atol=1e-5, rtol=1e-5)


def test_causal_never_reads_blocks_above_the_diagonal():
    # NaN values in the last key block reach every query row that visits that block (0 * NaN = NaN), even where
    # the mask gives it zero weight; rows in earlier query blocks must not visit it at all.
    q, k, v = _qkv(4, (1,), 64, 64, 1, 8)
    v = v.at[:, 48:].set(jnp.nan)
    out = np.asarray(flash_attention(q, k, v, is_causal=True, block_q=16, block_k=16))
    clean = dot_product_attention(q[:, :48], k[:, :48], v[:, :48], is_causal=True)
    np.testing.assert_allclose(out[:, :48], clean, atol=1e-5, rtol=1e-5)
    assert np.isnan(out[:, 48:]).all(), "the test needs the last block's rows to see the NaN values"


def _shapes_in(jaxpr) -> list[tuple]:
    """Every value's shape in `jaxpr` and in the jaxprs nested inside it (the kernels, their loops)."""
    shapes = []
    for eqn in jaxpr.eqns:
        shapes += [tuple(getattr(var.aval, "shape", ())) for var in eqn.outvars]
        for param in eqn.params.values():
            for sub in param if isinstance(param, (list, tuple)) else [param]:
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    shapes += _shapes_in(inner)
    return shapes


def test_no_score_matrix_anywhere_forward_or_backward():
    t = s = 128
    q, k, v = _qkv(5, (1,), t, s, 1, 8)
    grad = jax.grad(lambda q, k, v: jnp.sum(flash_attention(q, k, v, is_causal=True, block_q=32, block_k=32)),
                    (0, 1, 2))
    shapes = _shapes_in(jax.make_jaxpr(grad)(q, k, v).jaxpr)
    assert any(32 in shape for shape in shapes), "the walk must reach the kernels' tiles"
    big = [shape for shape in shapes if sum(d >= t for d in shape) >= 2]
    assert not big, f"arrays as large as [T, S]: {big}"
    # The same walk does see the score matrix in dense attention's gradient (the check above can fail).
    dense = jax.grad(lambda q, k, v: jnp.sum(dot_product_attention(q, k, v)), (0, 1, 2))
    assert any(sum(d >= t for d in shape) >= 2 for shape in _shapes_in(jax.make_jaxpr(dense)(q, k, v).jaxpr))


def test_keeps_value_dtype():
    q, k, v = _qkv(6, (1,), 16, 16, 1, 8, dtype=jnp.bfloat16)
    out = flash_attention(q, k, v, block_q=8, block_k=8)
    assert out.dtype == jnp.bfloat16
    want = dot_product_attention(q.astype(jnp.float32), k.astype(jnp.float32), v.astype(jnp.float32))
    np.testing.assert_allclose(np.asarray(out, np.float32), want, atol=3e-2)


@pytest.mark.parametrize("kwargs,message", [
    ({"bias": jnp.zeros((1, 1, 8, 8))}, "bias"),
    ({"mask": jnp.ones((1, 1, 8, 8), bool)}, "mask"),
    ({"block_q": 0}, "block_q"),
    ({"block_k": 2.5}, "block_k"),
])
def test_unsupported_arguments_raise_clear_errors(kwargs, message):
    q, k, v = _qkv(7, (1,), 8, 8, 1, 4)
    with pytest.raises(ValueError, match=message):
        flash_attention(q, k, v, **kwargs)


@pytest.mark.skipif(ON_GPU, reason="CPU-only behaviour")
def test_interpret_is_chosen_on_cpu():
    q, k, v = _qkv(8, (1,), 16, 16, 1, 4)
    np.testing.assert_allclose(flash_attention(q, k, v, block_q=8), dot_product_attention(q, k, v), atol=1e-5)


def _best_time(fn, *args, repeats: int = 5) -> float:
    jax.block_until_ready(fn(*args))
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        best = min(best, time.perf_counter() - start)
    return best


@pytest.mark.skipif(not ON_GPU, reason="needs a GPU: compiled Pallas (Triton) kernels")
def test_compiled_on_gpu_matches_and_keeps_up_with_jax():
    q, k, v = _qkv(9, (4,), 4096, 4096, 8, 64, dtype=jnp.float16)
    flash = jax.jit(lambda q, k, v: flash_attention(q, k, v, is_causal=True, block_q=64, block_k=64,
                                                    interpret=False))
    xla = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla"))
    np.testing.assert_allclose(np.asarray(flash(q, k, v), np.float32), np.asarray(xla(q, k, v), np.float32),
                               atol=2e-2)
    grads = jax.jit(jax.grad(lambda q, k, v: jnp.sum(flash(q, k, v).astype(jnp.float32)), (0, 1, 2)))(q, k, v)
    assert all(np.isfinite(np.asarray(g, np.float32)).all() for g in grads)
    t_flash, t_xla = _best_time(flash, q, k, v), _best_time(xla, q, k, v)
    print(f"seq 4096 causal fp16: flash {t_flash * 1e3:.2f} ms, jax.nn.dot_product_attention (xla) "
          f"{t_xla * 1e3:.2f} ms")
    assert t_flash < 2 * t_xla, "the fused kernel should not be much slower than XLA's unfused attention"


@pytest.mark.parametrize("causal", [False, True], ids=["full", "causal"])
def test_lab10_kernels_match_dense(causal):
    """Lab 10's solution kernels and dense tile references, run as Pallas kernels, against dense attention."""
    from labkit.grading.labs import lab10

    q, k, v = (np.asarray(a[0, :, 0]) for a in _qkv(10, (1,), 32, 32, 1, 8))
    want_out, want_lse = lab10.dense_np(q, k, v, causal=causal)
    solution = lab10.causal_kernel_solution if causal else lab10.forward_kernel_solution
    reference = lab10.causal_tiles_reference if causal else lab10.forward_tiles_reference
    for kernel in (solution, lab10.tiles_writer(reference)):
        out, lse = lab10.forward_with_kernel(kernel, q, k, v, 8, 16)
        np.testing.assert_allclose(out, want_out, atol=1e-5, rtol=1e-5)
        np.testing.assert_allclose(lse, want_lse, atol=1e-5, rtol=1e-5)
    if causal:
        return
    d_out = np.random.default_rng(11).normal(size=v.shape).astype(np.float32)
    delta = np.sum(want_out * d_out, axis=-1)
    want = jax.grad(lambda k, v: jnp.sum(dot_product_attention(q[:, None], k[:, None], v[:, None])[:, 0] * d_out),
                    (0, 1))(jnp.asarray(k), jnp.asarray(v))
    for kernel in (lab10.dkdv_kernel_solution, lab10.tiles_writer(lab10.dkdv_tiles_reference)):
        for got, expected in zip(lab10.dkdv_with_kernel(kernel, q, k, v, d_out, want_lse, delta, 8, 16), want):
            np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)
