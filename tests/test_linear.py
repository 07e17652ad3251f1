"""Linear attention (labkit.attention.linear, labkit.layers.LinearSelfAttention) against independent references:
the quadratic masked form computed densely in float64 numpy, float64 autodiff of that form, Trax's own
SelfAttention weights, and a subprocess memory measurement."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import qkv_of_shape

from labkit.attention import linear as la
from recall_lm import train_recall_lm


def _elu1(x):
    return np.where(x > 0, x + 1.0, np.exp(np.minimum(x, 0.0)))


def _relu(x):
    return np.maximum(x, 0.0)


NUMPY_MAPS = {"elu": _elu1, "relu": _relu, "identity": lambda x: x}


def dense_linear(q, k, v, *, causal, fm=_elu1, key_mask=None, eps=1e-6):
    """Quadratic form in float64: `(phi(Q) phi(K)^T * mask) V / ((phi(Q) phi(K)^T * mask) 1 + eps)`."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    a = np.einsum("...tnd,...snd->...nts", fm(q), fm(k))
    if causal:
        a = a * np.tril(np.ones(a.shape[-2:]))
    if key_mask is not None:  # [..., S] -> hide those keys for every query and head
        a = a * key_mask[..., None, None, :]
    num = np.einsum("...nts,...snv->...tnv", a, v)
    den = np.swapaxes(a.sum(-1), -1, -2)[..., None]
    return num / (den + eps)


_qkv = qkv_of_shape


# ---------------------------------------------------------------- forward: every form vs the dense formula

SHAPES = [(1, 1, 4), (7, 3, 4), (2, 16, 2, 8), (2, 3, 13, 2, 5)]
FORMS = [dict(is_causal=False), dict(is_causal=True), dict(is_causal=True, chunk_size=1),
         dict(is_causal=True, chunk_size=3), dict(is_causal=True, chunk_size=64)]


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("form", FORMS, ids=lambda f: f"causal={f['is_causal']},chunk={f.get('chunk_size')}")
def test_forms_match_dense_formula(shape, form):
    q, k, v = _qkv(sum(shape), shape, dv=shape[-1] + 2)
    got = la.linear_attention(q, k, v, **form)
    assert got.shape == v.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, dense_linear(q, k, v, causal=form["is_causal"]), atol=2e-6, rtol=1e-5)


def test_non_causal_with_more_keys_than_queries():
    q, _, _ = _qkv(2, (2, 5, 3, 4))
    _, k, v = _qkv(3, (2, 9, 3, 4), dv=6)
    np.testing.assert_allclose(la.linear_attention(q, k, v), dense_linear(q, k, v, causal=False),
                               atol=2e-6, rtol=1e-5)


def test_prefix_and_chunkwise_agree_on_long_sequence():
    q, k, v = _qkv(1, (1, 500, 2, 16))
    causal = jax.jit(la.linear_attention, static_argnames=("is_causal", "chunk_size"))
    prefix = causal(q, k, v, is_causal=True)
    for chunk in (7, 128):
        np.testing.assert_allclose(causal(q, k, v, is_causal=True, chunk_size=chunk), prefix, atol=1e-5)


@pytest.mark.parametrize("name", ["elu", "relu", "identity"])
def test_named_feature_maps(name):
    q, k, v = _qkv(3, (2, 9, 2, 4))
    if name == "identity":  # keep denominators away from 0 so float32 can be compared with float64
        q, k = np.abs(q) + 0.1, np.abs(k) + 0.1
    for causal in (False, True):
        for chunk in (None, 4):
            got = la.linear_attention(q, k, v, is_causal=causal, feature_map=name, chunk_size=chunk)
            np.testing.assert_allclose(got, dense_linear(q, k, v, causal=causal, fm=NUMPY_MAPS[name]),
                                       atol=2e-6, rtol=1e-5)


def test_custom_feature_map_may_change_the_feature_dim():
    q, k, v = _qkv(4, (11, 2, 4), dv=3)
    both = lambda x: jnp.concatenate([jax.nn.relu(x), jax.nn.relu(-x)], -1) + 0.01
    both_np = lambda x: np.concatenate([_relu(x), _relu(-x)], -1) + 0.01
    for chunk in (None, 5):
        got = la.linear_attention(q, k, v, is_causal=True, feature_map=both, chunk_size=chunk)
        np.testing.assert_allclose(got, dense_linear(q, k, v, causal=True, fm=both_np), atol=2e-6, rtol=1e-5)


def test_relu_rows_with_no_features_give_zero_not_nan():
    q, k, v = _qkv(5, (6, 1, 3))
    q[2] = -1.0  # relu(q_2) = 0: numerator and denominator are both 0
    got = np.asarray(la.linear_attention(q, k, v, feature_map="relu", is_causal=True, chunk_size=4))
    assert np.isfinite(got).all() and np.all(got[2] == 0)


def test_scale_multiplies_queries():
    q, k, v = _qkv(6, (8, 2, 4))
    np.testing.assert_allclose(la.linear_attention(q, k, v, scale=0.5),
                               dense_linear(0.5 * q, k, v, causal=False), atol=2e-6, rtol=1e-5)


def test_key_mask_hides_keys():
    q, k, v = _qkv(7, (2, 10, 3, 4))
    keep = np.random.default_rng(8).random((2, 10)) > 0.4
    for causal, chunk in ((False, None), (True, None), (True, 3)):
        got = la.linear_attention(q, k, v, mask=keep[:, None, None, :], is_causal=causal, chunk_size=chunk)
        np.testing.assert_allclose(got, dense_linear(q, k, v, causal=causal, key_mask=keep), atol=2e-6, rtol=1e-5)


def test_bad_arguments_raise_clear_errors():
    q, k, v = _qkv(9, (5, 2, 4))
    with pytest.raises(ValueError, match="bias"):
        la.linear_attention(q, k, v, bias=np.zeros((2, 5, 5)))
    with pytest.raises(ValueError, match="feature_map"):
        la.linear_attention(q, k, v, feature_map="softmax")
    with pytest.raises(ValueError, match="chunk_size"):
        la.linear_attention(q, k, v, is_causal=True, chunk_size=0)
    with pytest.raises(ValueError, match="is_causal"):
        la.linear_attention(q[:3], k, v, is_causal=True)
    with pytest.raises(ValueError, match="mask"):
        la.linear_attention(q, k, v, mask=np.ones((2, 5, 5), bool))  # per-query masks cannot be factorised
    with pytest.raises(TypeError, match="mask"):
        la.linear_attention(q, k, v, mask=np.ones((2, 1, 5)))
    with pytest.raises(ValueError, match="head dim"):
        la.linear_attention(q, k[..., :3], v)


# ---------------------------------------------------------------- gradients

def _dense_loss_x64(q, k, v, w):
    """float64 autodiff of the quadratic form, elu + 1 map: an independent gradient reference."""
    with jax.enable_x64(True):
        q, k, v, w = (jnp.asarray(np.asarray(a, np.float64)) for a in (q, k, v, w))

        def loss(q, k, v):
            a = jnp.einsum("tnd,snd->nts", jax.nn.elu(q) + 1, jax.nn.elu(k) + 1) * jnp.tril(jnp.ones((q.shape[0],) * 2))
            out = jnp.einsum("nts,snv->tnv", a, v) / (jnp.swapaxes(a.sum(-1), 0, 1)[..., None] + 1e-6)
            return jnp.sum(out * w)

        return [np.asarray(g) for g in jax.grad(loss, argnums=(0, 1, 2))(q, k, v)]


@pytest.mark.parametrize("chunk", [None, 1, 4, 5, 32])
def test_gradients_match_float64_dense(chunk):
    q, k, v = _qkv(10, (13, 2, 4), dv=3)
    w = np.random.default_rng(11).normal(size=(13, 2, 3)).astype(np.float32)
    loss = lambda q, k, v: jnp.sum(la.linear_attention(q, k, v, is_causal=True, chunk_size=chunk) * w)
    for got, want in zip(jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v), _dense_loss_x64(q, k, v, w)):
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_custom_vjp_matches_autodiff_of_plain_forms():
    q, k, v = _qkv(12, (2, 50, 3, 8), dv=6)
    w = np.random.default_rng(13).normal(size=(2, 50, 3, 6)).astype(np.float32)
    keep = np.random.default_rng(14).random((2, 1, 1, 50)) > 0.2

    def grads(**kw):
        loss = lambda q, k, v: jnp.sum(la.linear_attention(q, k, v, mask=keep, is_causal=True, **kw) * w)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    plain = grads()  # prefix sums, differentiated by JAX
    for kw in (dict(chunk_size=16), dict(chunk_size=7), dict(chunk_size=16, recompute_grad=False)):
        for got, want in zip(grads(**kw), plain):
            np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4)


def test_gradient_memory_does_not_grow_like_the_states():
    """Peak extra RSS of fwd+bwd (fresh subprocess via labkit.bench): chunkwise + custom VJP stays within a
    few input-sized arrays; the prefix-sum form stores every [d, dv] state (loose bounds: RSS is noisy)."""
    from labkit import bench

    kw = dict(causal=True, backward=True, heads=4, head_dim=32, repeats=1, warmup=1)
    n = 8192
    io_mib = n * 4 * 32 * 4 / 2**20  # one [seq, heads, dim] float32 array
    chunkwise = bench.measure("linear_chunkwise", n, **kw)
    prefix = bench.measure("linear", n, **kw)
    assert chunkwise.ok and prefix.ok, (chunkwise.message, prefix.message)
    assert chunkwise.peak_extra_mib < 16 * io_mib + 64, chunkwise.peak_extra_mib
    assert prefix.peak_extra_mib > 2 * chunkwise.peak_extra_mib, (prefix.peak_extra_mib, chunkwise.peak_extra_mib)


# ---------------------------------------------------------------- recurrent form and generation

def test_recurrent_steps_equal_causal_attention():
    q, k, v = _qkv(15, (2, 12, 3, 4), dv=5)
    state = la.init_state((2,), 3, 4, 5)
    outs = []
    for t in range(12):
        state, out = la.recurrent_step(state, q[:, t], k[:, t], v[:, t])
        outs.append(out)
    np.testing.assert_allclose(np.stack(outs, 1), dense_linear(q, k, v, causal=True), atol=2e-6, rtol=1e-5)
    assert state.kv.shape == (2, 3, 4, 5) and state.k_sum.shape == (2, 3, 4)


def test_recurrent_step_rejects_a_mismatched_state():
    q, k, v = _qkv(16, (3, 4))
    with pytest.raises(ValueError, match="state"):
        la.recurrent_step(la.init_state((), 3, 5, 4), q, k, v)


def _toy_decoder(vocab=11, heads=2, dim=4, seed=17):
    r = np.random.default_rng(seed)
    emb = jnp.asarray(r.normal(size=(vocab, 8)).astype(np.float32))
    w_qkv = jnp.asarray(r.normal(size=(3, 8, heads, dim)).astype(np.float32))
    w_out = jnp.asarray(r.normal(size=(heads, dim, vocab)).astype(np.float32))
    project = lambda tok: tuple(jnp.einsum("be,enh->bnh", emb[tok], w) for w in w_qkv)
    readout = lambda tok, out: jnp.argmax(jnp.einsum("bnh,bnhv->bv", out, w_out[None]), -1)
    return project, readout


def test_generate_matches_the_parallel_form_on_its_own_output():
    project, readout = _toy_decoder()
    first = jnp.array([1, 5, 7])
    state, toks, outs = la.generate(project, readout, first, 20, la.init_state((3,), 2, 4, 4))
    assert toks.shape == (20, 3) and outs.shape == (20, 3, 2, 4)
    # Teacher-force the generated tokens through the parallel form: [T, B] -> [T * B] -> [B, T, N, H].
    q, k, v = (np.asarray(a).reshape(20, 3, 2, 4).swapaxes(0, 1) for a in project(toks.reshape(-1)))
    np.testing.assert_allclose(np.swapaxes(outs, 0, 1), dense_linear(q, k, v, causal=True), atol=5e-6, rtol=1e-5)
    # Continuing from the returned state is the same as one longer run.
    nxt = readout(toks[-1], outs[-1])
    _, toks2, _ = la.generate(project, readout, nxt, 5, state)
    _, toks_all, _ = la.generate(project, readout, first, 25, la.init_state((3,), 2, 4, 4))
    np.testing.assert_array_equal(np.concatenate([toks, toks2]), toks_all)


# ---------------------------------------------------------------- the Trax layer

def _layer_pair(x, **kw):
    from trax import layers as tl
    from trax import shapes

    from labkit.layers import LinearSelfAttention

    ref = tl.SelfAttention(**{k: a for k, a in kw.items() if k not in ("feature_map",)})
    ref.init(shapes.signature(x), rng=jax.random.PRNGKey(0))
    layer = LinearSelfAttention(**kw)
    layer.init(shapes.signature(x), rng=jax.random.PRNGKey(1))
    return ref, layer


def _layer_numpy(x, weights, *, causal, bias, fm, key_mask=None):
    """Per head: project with the Trax weights, dense linear attention in float64, sum of heads' w_o."""
    x = np.asarray(x, np.float64)
    w = [np.asarray(a, np.float64) for a in weights]
    w_q, w_k, w_v, w_o = w[:4]
    q, k, v = (np.einsum("btm,nmd->btnd", x, a) for a in (w_q, w_k, w_v))
    if bias:
        q, k, v = q + w[4][None, None], k + w[5][None, None], v + w[6][None, None]
    o = dense_linear(q, k, v, causal=causal, fm=fm, key_mask=key_mask)
    return np.einsum("btnv,nvm->btm", o, w_o)


@pytest.mark.parametrize("kw", [
    dict(n_heads=3, d_qk=4, d_v=5, feature_map="identity"),
    dict(n_heads=3, d_qk=4, d_v=5, causal=True),
    dict(n_heads=2, d_qk=4, d_v=3, causal=True, bias=True, chunk_len=3),
    dict(n_heads=2, d_qk=4, d_v=4, causal=True, use_reference_code=True, mode="eval"),
    dict(n_heads=2, d_qk=4, d_v=4, masked=True),
], ids=lambda kw: ",".join(f"{k}={v}" for k, v in kw.items()))
def test_layer_uses_trax_weights_like_tl_self_attention(kw):
    x = jnp.asarray(np.random.default_rng(18).normal(size=(2, 7, 12)).astype(np.float32))
    ref, layer = _layer_pair(x, **kw)
    assert [w.shape for w in layer.weights] == [w.shape for w in ref.weights]
    fm = NUMPY_MAPS[kw.get("feature_map", "elu")]
    key_mask = None
    inputs = x
    if kw.get("masked"):
        key_mask = np.ones((2, 7), bool)
        key_mask[0, 5:] = False
        inputs = (x, jnp.asarray(key_mask))
    got, _ = layer.pure_fn(inputs, ref.weights, ref.state, jax.random.PRNGKey(2))
    want = _layer_numpy(x, ref.weights, causal=kw.get("causal", False), bias=kw.get("bias", False), fm=fm,
                        key_mask=key_mask)
    tol = 1e-3 if fm is NUMPY_MAPS["identity"] else 1e-5  # identity: denominators can be small
    np.testing.assert_allclose(got, want, atol=tol, rtol=tol)


def test_layer_output_dropout_uses_trax_rng_split():
    x = jnp.asarray(np.random.default_rng(19).normal(size=(2, 6, 8)).astype(np.float32))
    ref, layer = _layer_pair(x, n_heads=2, d_qk=4, d_v=4, causal=True, output_dropout=0.5)
    rng = jax.random.PRNGKey(3)
    zero_ref = np.asarray(ref.pure_fn(x, ref.weights, ref.state, rng)[0]) == 0
    zero_lin = np.asarray(layer.pure_fn(x, ref.weights, ref.state, rng)[0]) == 0
    assert zero_ref.any() and np.array_equal(zero_ref, zero_lin)


def test_layer_rejects_what_it_cannot_do():
    from labkit.layers import LinearSelfAttention

    with pytest.raises(ValueError, match="share_qk"):
        LinearSelfAttention(share_qk=True)
    with pytest.raises(ValueError, match="n_chunks"):
        LinearSelfAttention(chunk_len=4, n_chunks_before=1)
    with pytest.raises(ValueError, match="predict.*causal=True"):
        LinearSelfAttention(mode="predict")  # decoding is causal; tests/test_predict.py decodes causal layers


def test_layer_trains_inside_a_small_language_model():
    """Two LinearSelfAttention blocks learn to continue a random period-4 pattern: loss falls."""
    from labkit.layers import LinearSelfAttention

    make = lambda: LinearSelfAttention(n_heads=2, d_qk=16, d_v=16, causal=True, chunk_len=8)
    losses = train_recall_lm(make, seq=32, steps=60)
    assert np.isfinite(losses).all()
    assert np.mean(losses[-5:]) < 0.7 * np.mean(losses[:3]), losses
