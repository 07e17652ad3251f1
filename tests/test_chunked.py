"""memory_efficient_attention against the dense reference and a float64 brute force: values and gradients."""

import functools
import json
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_qkv

from labkit.attention.chunked import memory_efficient_attention
from labkit.attention.dense import dot_product_attention


def brute_force(q, k, v, bias=None, mask=None, causal=False):
    """Float64, one query at a time, on `[B, T, N, H]` arrays; hidden rows give the mean of the values."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b_, t_, n_, h_ = q.shape
    s_ = k.shape[1]
    bias = np.broadcast_to(0.0 if bias is None else np.asarray(bias, np.float64), (b_, n_, t_, s_))
    mask = np.broadcast_to(True if mask is None else np.asarray(mask), (b_, n_, t_, s_))
    out = np.zeros((b_, t_, n_, v.shape[-1]))
    for b in range(b_):
        for n in range(n_):
            for i in range(t_):
                keep = mask[b, n, i] & ((np.arange(s_) <= i) if causal else True)
                if not keep.any():
                    out[b, i, n] = v[b, :, n].mean(0)
                    continue
                s = k[b, :, n] @ q[b, i, n] / np.sqrt(h_) + bias[b, n, i]
                s = np.where(keep, s, -np.inf)
                p = np.exp(s - s.max())
                out[b, i, n] = p @ v[b, :, n] / p.sum()
    return out


_qkv = functools.partial(random_qkv, as_jax=True)


def _chunked(qc, kc, causal, checkpoint=True):
    """A jitted memory_efficient_attention (one compilation per configuration keeps the tests fast)."""
    fn = functools.partial(memory_efficient_attention, is_causal=causal, query_chunk_size=qc, key_chunk_size=kc,
                           checkpoint=checkpoint)
    return jax.jit(fn)


# (T, S, query_chunk, key_chunk): divisible, not divisible, length 1, chunks larger than the sequence, T != S.
SHAPES = [(16, 16, 4, 4), (13, 13, 4, 5), (1, 1, 4, 4), (6, 11, 512, 512), (9, 5, 2, 3)]


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("t,s,qc,kc", SHAPES)
def test_matches_dense_and_float64(t, s, qc, kc, causal):
    q, k, v = _qkv(0, (2,), t, s, hv=3)
    out = _chunked(qc, kc, causal)(q, k, v)
    assert out.shape == (2, t, 2, 3) and out.dtype == jnp.float32
    np.testing.assert_allclose(out, dot_product_attention(q, k, v, is_causal=causal), atol=1e-5)
    np.testing.assert_allclose(out, brute_force(q, k, v, causal=causal), atol=1e-5)


@pytest.mark.parametrize("causal", [False, True])
def test_mask_with_fully_hidden_rows_and_bias(causal):
    t, s = 11, 11
    q, k, v = _qkv(1, (2,), t, s)
    rng = np.random.default_rng(2)
    mask = rng.random((2, 1, t, s)) > 0.5  # broadcast over heads
    mask[0, 0, 3] = False  # row 3 of example 0 sees nothing: the mean of the values, as dense
    mask[1, 0, :, 4:] = False  # with causal, rows 0-3 still see keys; later rows only the first four
    bias = jnp.asarray(rng.normal(size=(2, t, 1)), jnp.float32)  # [N, T, 1]: per head and query
    out = jax.jit(functools.partial(memory_efficient_attention, is_causal=causal, query_chunk_size=4,
                                    key_chunk_size=3))(q, k, v, bias, mask)
    np.testing.assert_allclose(out, dot_product_attention(q, k, v, bias, mask, is_causal=causal), atol=1e-5)
    np.testing.assert_allclose(out, brute_force(q, k, v, bias, mask, causal), atol=1e-5)
    np.testing.assert_allclose(out[0, 3], v[0].mean(0), atol=1e-6)


@pytest.mark.parametrize("bias_shape", [(7, 9), (2, 1, 9), (3, 2, 7, 9), (1, 1, 1, 7, 1)])
def test_bias_broadcasting_and_batch_dims(bias_shape):
    q, k, v = _qkv(3, (3,), 7, 9)
    bias = jnp.asarray(np.random.default_rng(4).normal(size=bias_shape) * 3, jnp.float32)
    if len(bias_shape) == 5:  # one more leading axis than [batch, N, T, S]: batch dims (1, 3)
        q, k, v = (a[None] for a in (q, k, v))
    out = jax.jit(functools.partial(memory_efficient_attention, query_chunk_size=3, key_chunk_size=4))(q, k, v, bias)
    np.testing.assert_allclose(out, dot_product_attention(q, k, v, bias), atol=1e-5)


def test_no_batch_dims_and_large_logits():
    q, k, v = _qkv(5, (), 20, 20, h=8, scale=40.0)  # logits up to ~1e4
    logits = np.einsum("tnh,snh->nts", q, k) / np.sqrt(8)
    assert np.abs(logits).max() > 5e3
    for causal in (False, True):
        out = _chunked(8, 6, causal)(q, k, v)
        assert np.isfinite(out).all()
        np.testing.assert_allclose(out, brute_force(q[None], k[None], v[None], causal=causal)[0], atol=1e-5)


def test_causal_skips_key_chunks_above_the_diagonal():
    # NaN values in keys 4..7: queries 0..3 only see them if their (skipped) block is computed.
    q, k, v = _qkv(6, (1,), 8, 8)
    v = v.at[:, 4:].set(jnp.nan)
    out = memory_efficient_attention(q, k, v, is_causal=True, query_chunk_size=4, key_chunk_size=4)
    np.testing.assert_allclose(out[:, :4], dot_product_attention(q[:, :4], k[:, :4], v[:, :4], is_causal=True),
                               atol=1e-5)


@pytest.mark.parametrize("causal,masked,checkpoint", [(False, False, True), (True, False, True), (True, True, True),
                                                      (True, True, False)])
def test_gradients_match_dense(causal, masked, checkpoint):
    q, k, v = _qkv(7, (2,), 10, 10)
    rng = np.random.default_rng(8)
    mask = None
    if masked:
        mask = rng.random((2, 2, 10, 10)) > 0.4
        mask[0, 1, 5] = False  # a fully hidden row: its gradient flows only into the values
    bias = jnp.asarray(rng.normal(size=(2, 10, 10)), jnp.float32)
    cotangent = jnp.asarray(rng.normal(size=(2, 10, 2, 4)), jnp.float32)

    def loss(fn):
        return lambda q, k, v, b: jnp.sum(fn(q, k, v, b, mask, is_causal=causal) * cotangent)

    ours = functools.partial(memory_efficient_attention, query_chunk_size=4, key_chunk_size=3, checkpoint=checkpoint)
    grads = jax.jit(jax.grad(loss(ours), argnums=(0, 1, 2, 3)))(q, k, v, bias)
    expected = jax.grad(loss(dot_product_attention), argnums=(0, 1, 2, 3))(q, k, v, bias)
    for name, g, e in zip("qkvb", grads, expected):
        np.testing.assert_allclose(g, e, atol=1e-5, err_msg=f"gradient w.r.t. {name}")


def test_checkpoint_flag_recomputes_in_the_backward_pass():
    q, k, v = _qkv(9, (1,), 8, 8)

    def grad_jaxpr(checkpoint, custom_backward=False):
        fn = functools.partial(memory_efficient_attention, query_chunk_size=4, key_chunk_size=4,
                               checkpoint=checkpoint, custom_backward=custom_backward)
        return str(jax.make_jaxpr(jax.grad(lambda q: fn(q, k, v).sum()))(q))

    assert "checkpoint" in grad_jaxpr(True) or "remat" in grad_jaxpr(True)
    assert "checkpoint" not in grad_jaxpr(False) and "remat" not in grad_jaxpr(False)
    # The custom backward recomputes blocks from the log-sum-exp itself: no remat of the forward's scan.
    assert "checkpoint" not in grad_jaxpr(True, True) and "remat" not in grad_jaxpr(True, True)


# ---------------------------------------------------------------- the FlashAttention-2 backward (custom_vjp)

# (T, S, query_chunk, key_chunk, batch, causal, bias shape or None, mask kind or None)
BACKWARD_CASES = [
    (13, 13, 4, 5, (2,), False, None, None),  # neither chunk size divides the length
    (13, 13, 4, 5, (2,), True, None, None),
    (12, 12, 4, 4, (2,), True, (2, 12, 12), None),  # causal, chunks that divide, a per-head bias
    (11, 11, 4, 3, (2,), False, (2, 1, 1, 11), "keys"),  # key-padding mask, bias per example and key
    (11, 11, 3, 4, (2,), True, (11, 1), "hidden rows"),  # rows that see no key, a per-query bias
    (6, 13, 4, 5, (2,), False, (2, 2, 6, 13), "keys"),  # cross-attention, more keys than queries
    (9, 5, 2, 3, (2,), True, None, "hidden rows"),  # cross-attention, more queries than keys, causal
    (7, 7, 3, 4, (2, 3), True, (3, 2, 7, 7), "hidden rows"),  # two batch dims
    (1, 1, 4, 4, (), False, None, None),  # length 1, no batch dims
]


def _mask(kind, batch, t, s, rng):
    if kind is None:
        return None
    if kind == "keys":
        keep = np.ones((*batch, 1, 1, s), bool)
        keep[0, ..., -3:] = False
        keep[-1, ..., 1] = False
        return keep
    keep = rng.random((*batch, 2, t, s)) > 0.4
    keep.reshape(-1, t, s)[1, min(t - 1, 2)] = False  # one row of one example and head sees no key
    return keep


@pytest.mark.parametrize("t,s,qc,kc,batch,causal,bias_shape,mask_kind", BACKWARD_CASES)
def test_custom_backward_gradients_equal_dense(t, s, qc, kc, batch, causal, bias_shape, mask_kind):
    rng = np.random.default_rng(t * 100 + s)
    q, k, v = _qkv(rng, batch, t, s, hv=3)
    bias = None if bias_shape is None else jnp.asarray(rng.normal(size=bias_shape), jnp.float32)
    mask = _mask(mask_kind, batch, t, s, rng)
    cotangent = jnp.asarray(rng.normal(size=(*batch, t, 2, 3)), jnp.float32)
    argnums = (0, 1, 2) if bias is None else (0, 1, 2, 3)

    def loss(fn, **options):
        return lambda q, k, v, b: jnp.sum(fn(q, k, v, b, mask, is_causal=causal, **options) * cotangent)

    ours = jax.jit(jax.grad(loss(memory_efficient_attention, query_chunk_size=qc, key_chunk_size=kc),
                            argnums=argnums))(q, k, v, bias)
    expected = jax.grad(loss(dot_product_attention), argnums=argnums)(q, k, v, bias)
    for name, g, e in zip("qkvb", ours, expected):
        assert g.shape == e.shape, name
        np.testing.assert_allclose(g, e, atol=2e-5, rtol=1e-5, err_msg=f"gradient w.r.t. {name}")


def test_custom_backward_skips_the_causal_blocks_above_the_diagonal():
    # NaN values in keys 4..7 and a loss on queries 0..3 only: block (0, 1) would turn dQ of those queries into
    # NaN if the backward computed it (0 * NaN), even masked.
    q, k, v = _qkv(13, (1,), 8, 8)
    v = v.at[:, 4:].set(jnp.nan)
    fn = functools.partial(memory_efficient_attention, is_causal=True, query_chunk_size=4, key_chunk_size=4)
    dq = jax.grad(lambda q: fn(q, k, v)[:, :4].sum())(q)
    expected = jax.grad(lambda q: dot_product_attention(q, k[:, :4], v[:, :4], is_causal=True).sum())(q[:, :4])
    np.testing.assert_allclose(dq[:, :4], expected, atol=1e-5)


@pytest.mark.parametrize("t,s,qc,kc,masked", [(64, 64, 16, 16, False), (37, 37, 8, 16, False), (40, 40, 16, 8, False),
                                           (33, 33, 5, 7, False), (33, 33, 5, 7, True), (20, 20, 32, 32, False)])
def test_causal_loop_ranges_visit_exactly_the_blocks_the_switch_computes(t, s, qc, kc, masked):
    # The reference is block_kind, block by block: the ranges must list the same SKIP / PLAIN / MASKED blocks.
    from labkit.attention.chunked_blocks import MASKED, PLAIN, SKIP, block_kind, key_ranges, make_plan, query_ranges

    qc, kc = min(qc, t), min(kc, s)
    plan = make_plan(None, jnp.ones((t, s), bool) if masked else None, (1,), 1, t, s, qc, kc, True, True)
    nq = -(-t // qc)
    kinds = np.array([[int(block_kind(plan, i, j)) for j in range(plan.nk)] for i in range(nq)])
    for i in range(nq):
        n_plain, n_needed = map(int, key_ranges(plan, i))
        assert list(kinds[i]) == [PLAIN] * n_plain + [MASKED] * (n_needed - n_plain) + [SKIP] * (plan.nk - n_needed)
    for j in range(plan.nk):
        first, first_plain = map(int, query_ranges(plan, j, nq))
        assert list(kinds[:, j]) == [SKIP] * first + [MASKED] * (first_plain - first) + [PLAIN] * (nq - first_plain)


@pytest.mark.parametrize("masked", [False, True])
def test_transposed_block_scores_are_the_same_scores(masked):
    # The backward pass computes S^T directly; it must equal the forward's block, transposed, masks and bias too.
    from labkit.attention.chunked_blocks import block_scores, make_plan, to_chunks

    t, s, qc, kc = 20, 18, 8, 8
    q, k, _ = _qkv(15, (2,), t, s, n=3)
    rng = np.random.default_rng(15)
    bias = jnp.asarray(rng.normal(size=(2, 3, t, s)), jnp.float32)
    mask = jnp.asarray(rng.random((2, 1, 1, s)) > 0.3) if masked else None
    plan = make_plan(bias, mask, (2,), 3, t, s, qc, kc, True, True)
    q_chunks, k_chunks = to_chunks(q, qc), to_chunks(k, kc)
    for i, j in [(0, 0), (1, 0), (2, 1), (2, 2)]:
        plain = block_scores(plan, q_chunks[i], k_chunks[j], i, j, masked)
        transposed = block_scores(plan, q_chunks[i], k_chunks[j], i, j, masked, transposed=True)
        np.testing.assert_allclose(transposed, jnp.swapaxes(plain, -1, -2), atol=1e-6)


def test_custom_backward_products_contract_along_rows():
    # XLA:CPU runs a product that sums over the first axis of a stored block at about half speed (chunked_backward's
    # docstring): in every product of the forward and the custom backward the left operand contracts its last axis.
    q, k, v = _qkv(16, (1,), 64, 64, n=2, h=8)
    loss = lambda q, k, v: memory_efficient_attention(q, k, v, is_causal=True, query_chunk_size=16,
                                                      key_chunk_size=16).sum()
    hlo = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).as_text()
    dots = re.findall(r"stablehlo.dot_general .*?contracting_dims = \[(\d+)\] x \[\d+\].*?: \((tensor<[^>]*>),", hlo)
    assert len(dots) >= 7, hlo  # two forward products, five backward ones
    for lhs_dim, lhs_type in dots:
        assert int(lhs_dim) == lhs_type.count("x") - 1, (lhs_dim, lhs_type)  # "1x2x16x8xf32": rank 4, last axis 3


def test_custom_backward_keeps_only_inputs_output_and_logsumexp():
    # What jax.vjp's backward function holds: linear in the length for the custom backward, the score blocks
    # of every query chunk (T x S per head) when autodiff goes through the scan without checkpoints.
    t, n, h = 64, 2, 4
    q, k, v = _qkv(14, (1,), t, n=n, h=h)

    def kept(**options):
        fn = functools.partial(memory_efficient_attention, is_causal=True, query_chunk_size=8, key_chunk_size=8,
                               **options)
        return sum(x.size for x in jax.tree_util.tree_leaves(jax.vjp(fn, q, k, v)[1]))

    linear = t * n * (4 * h + 1)  # q, k, v, the output and the log-sum-exp
    assert kept() <= linear + 8  # and a few scalars
    assert kept(custom_backward=False, checkpoint=False) > t * t * n  # the blocks: the check can tell them apart


def test_bad_arguments_name_themselves():
    q, k, v = _qkv(10, (1,), 4, 4)
    with pytest.raises(ValueError, match="query_chunk_size"):
        memory_efficient_attention(q, k, v, query_chunk_size=0)
    with pytest.raises(ValueError, match="key_chunk_size"):
        memory_efficient_attention(q, k, v, key_chunk_size=2.5)
    with pytest.raises(ValueError, match="bias"):
        memory_efficient_attention(q, k, v, jnp.zeros((3, 4)))
    with pytest.raises(ValueError, match="mask"):
        memory_efficient_attention(q, k, v, mask=jnp.ones((1, 2, 5, 4), bool))
    with pytest.raises(ValueError, match="same head dim"):
        memory_efficient_attention(q, k[..., :2], v)


# ---------------------------------------------------------------- the Trax layer

LAYER_CASES = [  # (tl.SelfAttention arguments, use_reference_code)
    (dict(), False),
    (dict(causal=True), True),
    (dict(causal=True, bias=True, d_v=6, output_dropout=0.3), False),
]


@pytest.mark.parametrize("config,use_reference_code", LAYER_CASES,
                         ids=lambda c: (",".join(f"{k}={v}" for k, v in c.items()) or "plain")
                         if isinstance(c, dict) else f"reference_code={c}")
def test_layer_matches_trax_self_attention(config, use_reference_code):
    from trax import layers as tl
    from trax import shapes

    from labkit.layers import MemoryEfficientSelfAttention

    x = jnp.asarray(np.random.default_rng(11).normal(size=(2, 13, 8)), jnp.float32)
    kwargs = dict(n_heads=2, d_qk=4, d_v=4, use_reference_code=use_reference_code)
    kwargs.update(config)
    ref = tl.SelfAttention(**kwargs)
    ref.init(shapes.signature(x), rng=jax.random.PRNGKey(0))
    ours = MemoryEfficientSelfAttention(query_chunk_size=4, key_chunk_size=5, **kwargs)
    ours.init(shapes.signature(x), rng=jax.random.PRNGKey(1))
    rng = jax.random.PRNGKey(3)

    def forward(layer):
        return jax.jit(lambda w, x: layer.pure_fn(x, w, ref.state, rng)[0])

    np.testing.assert_allclose(forward(ours)(ref.weights, x), forward(ref)(ref.weights, x), atol=1e-5)

    def gradients(layer):
        return jax.jit(jax.grad(lambda w, x: (forward(layer)(w, x) ** 2).sum(), argnums=(0, 1)))(ref.weights, x)

    for a, b in zip(jax.tree_util.tree_leaves(gradients(ours)), jax.tree_util.tree_leaves(gradients(ref))):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def test_layer_rejects_what_it_cannot_compute():
    from labkit.layers import MemoryEfficientSelfAttention

    for bad in (dict(share_qk=True), dict(chunk_len=4), dict(attention_dropout=0.1)):
        with pytest.raises(ValueError):
            MemoryEfficientSelfAttention(n_heads=2, d_qk=4, d_v=4, **bad)


def test_layer_trains_inside_a_trax_model():
    from trax import layers as tl
    from trax import shapes

    from labkit.layers import MemoryEfficientSelfAttention

    def model(attention):
        return tl.Serial(tl.Embedding(16, 8), tl.Residual(attention(n_heads=2, d_qk=4, d_v=4, causal=True)),
                         tl.Dense(16), tl.LogSoftmax())

    tokens = jnp.asarray(np.random.default_rng(12).integers(0, 16, size=(2, 12)), jnp.int32)
    ours = model(functools.partial(MemoryEfficientSelfAttention, query_chunk_size=4, key_chunk_size=4))
    ref = model(tl.SelfAttention)
    ref.init(shapes.signature(tokens), rng=jax.random.PRNGKey(0))
    ours.init(shapes.signature(tokens), rng=jax.random.PRNGKey(1))
    rng = jax.random.PRNGKey(2)

    def loss(layer, weights):
        log_probs, _ = layer.pure_fn(tokens[:, :-1], weights, ref.state, rng)
        return -jnp.mean(jnp.take_along_axis(log_probs, tokens[:, 1:, None], axis=-1))

    value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, ours)))(ref.weights)
    value_ref, grads_ref = jax.jit(jax.value_and_grad(functools.partial(loss, ref)))(ref.weights)
    np.testing.assert_allclose(value, value_ref, rtol=1e-6)
    for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads_ref)):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    stepped = jax.tree_util.tree_map(lambda w, g: w - 0.5 * g, ref.weights, grads)
    assert jax.jit(functools.partial(loss, ours))(stepped) < value  # one SGD step on the same batch lowers the loss


# ---------------------------------------------------------------- chunk sizes tuned per machine (the cache)

def test_chunk_sizes_come_from_the_cache_else_the_defaults(tmp_path, monkeypatch):
    from labkit.attention import chunk_sizes
    from labkit.attention.chunked import DEFAULT_KEY_CHUNK_SIZE, DEFAULT_QUERY_CHUNK_SIZE, chunk_sizes_for

    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path / "cache"))
    defaults = (DEFAULT_QUERY_CHUNK_SIZE, DEFAULT_KEY_CHUNK_SIZE)
    assert chunk_sizes_for(4096, 4096, 64) == defaults  # no cache file yet
    cpu = chunk_sizes.cpu_model()
    path = chunk_sizes.write_entries({chunk_sizes.entry_name(cpu, 64, 4096): (256, 128),
                                      chunk_sizes.entry_name(cpu, 64, 16384): (1024, 1024),
                                      chunk_sizes.entry_name("some other cpu", 64, 3000): (8, 8)})
    assert path.parent == tmp_path / "cache" and json.loads(path.read_text())
    assert chunk_sizes_for(4096, 4096, 64) == (256, 128)
    assert chunk_sizes_for(3000, 3000, 64) == (256, 128)  # 3000 rounds to 4096 in log scale
    assert chunk_sizes_for(100_000, 100_000, 64) == (1024, 1024)  # the nearest tuned length
    assert chunk_sizes_for(4096, 4096, 32) == defaults  # no tuning for this head dim
    assert chunk_sizes_for(4096, 4096, 64, 64, None) == (64, 128)  # what the caller gives wins
    path.write_text("{not json")
    assert chunk_sizes_for(4096, 4096, 64) == defaults  # a broken cache is ignored, never an error


def test_attention_without_chunk_sizes_uses_the_tuned_ones(tmp_path, monkeypatch):
    from labkit.attention import chunk_sizes

    monkeypatch.setenv("LABKIT_CACHE_DIR", str(tmp_path))
    q, k, v = _qkv(15, (1,), 24, 24)
    chunk_sizes.write_entries({chunk_sizes.entry_name(chunk_sizes.cpu_model(), 4, 32): (8, 6)})

    def scan_lengths(**options):
        text = str(jax.make_jaxpr(lambda q: memory_efficient_attention(q, k, v, **options))(q))
        return sorted(set(int(n) for n in re.findall(r"length=(\d+)", text)))

    assert scan_lengths() == [3, 4]  # 24 / 8 query chunks, 24 / 6 key chunks
    assert scan_lengths(query_chunk_size=12, key_chunk_size=12) == [2]
    np.testing.assert_allclose(memory_efficient_attention(q, k, v), dot_product_attention(q, k, v), atol=1e-5)
