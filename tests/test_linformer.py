"""Linformer attention against independent references: float64 numpy, dense attention, Trax's SelfAttention."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_qkv

from labkit.attention.dense import dot_product_attention
from labkit.attention.linformer import (init_projections, k_schedule, linformer_attention, num_projection_params,
                                        projection_shape)


_qkv = functools.partial(random_qkv, batch=(2,), t=10)


def _numpy_linformer(q, k, v, e, f, valid=None):
    """Float64 loop over batch and heads: softmax(q (E k)^T / sqrt(d)) (F v), hidden keys zeroed first."""
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    b, s, nh, _ = k.shape
    n = e.shape[-1]
    out = np.zeros(q.shape[:-1] + (v.shape[-1],))
    for i in range(b):
        for hd in range(nh):
            kk = np.zeros((n, k.shape[-1]))
            vv = np.zeros((n, v.shape[-1]))
            keep = np.ones(s, bool) if valid is None else valid[i]
            kk[:s] = k[i, :, hd] * keep[:, None]
            vv[:s] = v[i, :, hd] * keep[:, None]
            ee = np.asarray(e[hd] if e.ndim == 3 else e, np.float64)
            ff = np.asarray(f[hd] if f.ndim == 3 else f, np.float64)
            logits = q[i, :, hd] @ (ee @ kk).T / np.sqrt(q.shape[-1])
            p = np.exp(logits - logits.max(-1, keepdims=True))
            p /= p.sum(-1, keepdims=True)
            out[i, :, hd] = p @ (ff @ vv)
    return out


def test_identity_projection_with_k_equal_n_is_dense_attention(rng):
    q, k, v = _qkv(rng, t=7, s=12, hv=6)
    eye = jnp.eye(12)
    np.testing.assert_allclose(linformer_attention(q, k, v, e_proj=eye, f_proj=eye), dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)
    per_head = jnp.stack([eye, eye])  # [N, n, n]
    np.testing.assert_allclose(linformer_attention(q, k, v, e_proj=per_head), dot_product_attention(q, k, v),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("per_head,kv_shared", [(True, False), (False, False), (True, True), (False, True)])
def test_random_projections_match_float64_loop(rng, per_head, kv_shared):
    q, k, v = _qkv(rng, t=9, s=16, hv=3)
    shape = (2, 5, 16) if per_head else (5, 16)
    e = rng.normal(size=shape).astype(np.float32) / np.sqrt(5)
    f = e if kv_shared else rng.normal(size=shape).astype(np.float32) / np.sqrt(5)
    got = linformer_attention(q, k, v, e_proj=e, f_proj=None if kv_shared else f)
    np.testing.assert_allclose(got, _numpy_linformer(q, k, v, e, f), atol=2e-5, rtol=1e-4)


def test_shorter_inputs_are_padded_and_masked_keys_ignored(rng):
    q, k, v = _qkv(rng, t=6, s=9)
    e = rng.normal(size=(2, 4, 16)).astype(np.float32)
    f = rng.normal(size=(2, 4, 16)).astype(np.float32)
    valid = np.ones((2, 9), bool)
    valid[0, 5:] = False
    valid[1, ::3] = False
    got = linformer_attention(q, k, v, e_proj=e, f_proj=f, mask=valid[..., None, None, :])
    np.testing.assert_allclose(got, _numpy_linformer(q, k, v, e, f, valid), atol=2e-5, rtol=1e-4)
    # Whatever sits at hidden positions does not matter.
    k2, v2 = k.copy(), v.copy()
    k2[~valid] = 1e3
    v2[~valid] = -1e3
    np.testing.assert_allclose(linformer_attention(q, k2, v2, e_proj=e, f_proj=f, mask=valid[..., None, None, :]), got, atol=1e-5)


def test_padding_equals_explicit_zero_columns(rng):
    q, k, v = _qkv(rng, t=5, s=7)
    e = rng.normal(size=(3, 10)).astype(np.float32)
    np.testing.assert_allclose(linformer_attention(q, k, v, e_proj=e), linformer_attention(q, k, v, e_proj=e[:, :7]),
                               atol=1e-5)


def test_longer_inputs_raise_naming_both_lengths(rng):
    q, k, v = _qkv(rng, t=5, s=20)
    with pytest.raises(ValueError, match=r"S = 20.*n = 16"):
        linformer_attention(q, k, v, e_proj=np.ones((4, 16), np.float32))


def test_bad_arguments_raise():
    q = np.zeros((1, 4, 2, 3), np.float32)
    with pytest.raises(ValueError, match="e_proj and f_proj"):
        linformer_attention(q, q, q, e_proj=np.ones((3, 4, 8), np.float32))  # 3 heads of E for 2 heads
    with pytest.raises(ValueError, match="causal"):
        linformer_attention(q, q, q, e_proj=np.ones((4, 4), np.float32), is_causal=True)
    with pytest.raises(ValueError, match="hides keys for all queries"):
        linformer_attention(q, q, q, e_proj=np.ones((4, 4), np.float32), mask=np.ones((4, 4), bool))
    with pytest.raises(ValueError, match="stride"):
        linformer_attention(q, q, q, downsample="mean")


def test_mean_pool_with_stride_one_is_masked_dense_attention(rng):
    q, k, v = _qkv(rng, t=6, s=8)
    valid = rng.random((2, 8)) > 0.3
    valid[:, 0] = True
    want = dot_product_attention(q, k, v, mask=valid[:, None, None, :])
    np.testing.assert_allclose(linformer_attention(q, k, v, downsample="mean", stride=1, mask=valid[..., None, None, :]), want,
                               atol=1e-5, rtol=1e-5)
    ones = np.ones((1,), np.float32)
    np.testing.assert_allclose(linformer_attention(q, k, v, e_proj=ones, downsample="conv", mask=valid[..., None, None, :]), want,
                               atol=1e-5, rtol=1e-5)


def test_mean_pool_and_conv_against_numpy_blocks(rng):
    q, k, v = _qkv(rng, t=5, s=10)  # stride 4 does not divide 10: padded to 12, k = 3
    r = 4
    kp = np.zeros((2, 12, 2, 4))
    vp = np.zeros((2, 12, 2, 4))
    kp[:, :10], vp[:, :10] = k, v
    counts = np.minimum(r, 10 - np.arange(0, 12, r))  # real keys per block: 4, 4, 2
    mk = kp.reshape(2, 3, r, 2, 4).sum(2) / counts[None, :, None, None]
    mv = vp.reshape(2, 3, r, 2, 4).sum(2) / counts[None, :, None, None]
    want = dot_product_attention(q.astype(np.float64), mk, mv)
    np.testing.assert_allclose(linformer_attention(q, k, v, downsample="mean", stride=r), want, atol=1e-5)
    kernel = rng.normal(size=(2, r)).astype(np.float32)  # one kernel per head
    ck = np.einsum("nr,bkrnh->bknh", kernel, kp.reshape(2, 3, r, 2, 4))
    cv = np.einsum("nr,bkrnh->bknh", kernel, vp.reshape(2, 3, r, 2, 4))
    np.testing.assert_allclose(linformer_attention(q, k, v, e_proj=kernel, downsample="conv"),
                               dot_product_attention(q.astype(np.float64), ck, cv), atol=1e-5, rtol=1e-5)


def test_fully_hidden_block_is_hidden_in_the_softmax(rng):
    q, k, v = _qkv(rng, t=4, s=8, batch=())
    valid = np.array([True] * 4 + [False] * 4)
    got = linformer_attention(q, k, v, downsample="mean", stride=4, mask=valid[..., None, None, :])
    # Only the first block is visible: every query returns its mean value.
    np.testing.assert_allclose(got, np.broadcast_to(v[:4].mean(0), got.shape), atol=1e-5)


def test_gradients_match_float64_finite_differences(rng):
    q, k, v = _qkv(rng, t=4, s=6, batch=())
    e = jnp.asarray(rng.normal(size=(2, 3, 6)), jnp.float32)
    loss = lambda e: jnp.sum(jnp.sin(linformer_attention(q, k, v, e_proj=e)))
    grad = jax.grad(loss)(e)
    direction = rng.normal(size=e.shape)
    eps = 1e-3
    fd = (_loss64(q, k, v, np.asarray(e) + eps * direction) - _loss64(q, k, v, np.asarray(e) - eps * direction))
    np.testing.assert_allclose(np.sum(np.asarray(grad) * direction), fd / (2 * eps), rtol=1e-3)


def _loss64(q, k, v, e):
    return np.sum(np.sin(_numpy_linformer(q[None], k[None], v[None], e, e)))


def test_sharing_modes_parameter_counts():
    kw = dict(n_heads=4, proj_k=8, max_len=64)
    assert projection_shape("none", **kw) == (4, 8, 64)
    assert projection_shape("headwise", **kw) == (8, 64)
    assert num_projection_params("none", n_layers=3, **kw) == 3 * 2 * 4 * 8 * 64
    assert num_projection_params("headwise", n_layers=3, **kw) == 3 * 2 * 8 * 64
    assert num_projection_params("kv", n_layers=3, **kw) == 3 * 8 * 64
    assert num_projection_params("layerwise", n_layers=3, **kw) == 8 * 64
    for sharing in ("none", "headwise", "kv", "layerwise"):
        layers = init_projections(jax.random.PRNGKey(0), n_layers=3, sharing=sharing, **kw)
        unique = {id(a): a.size for layer in layers for a in layer if a is not None}
        assert sum(unique.values()) == num_projection_params(sharing, n_layers=3, **kw), sharing


def test_k_schedule_shrinks_and_counts():
    ks = k_schedule(64, 4, decay=0.5, min_k=10)
    assert ks == [64, 32, 16, 10]
    assert num_projection_params("none", n_heads=2, proj_k=ks, max_len=128, n_layers=4) == 2 * 2 * 128 * sum(ks)
    layers = init_projections(jax.random.PRNGKey(1), n_layers=4, n_heads=2, max_len=128, proj_k=ks)
    assert [e.shape[1] for e, _ in layers] == ks
    with pytest.raises(ValueError, match="layerwise"):
        num_projection_params("layerwise", n_heads=2, proj_k=ks, max_len=128, n_layers=4)


# ---------------------------------------------------------------- the Trax layer

def _trax_pair(x, sharing="none", **kw):
    from trax import layers as tl
    from trax import shapes

    from labkit.layers import LinformerSelfAttention

    kwargs = dict(n_heads=2, d_qk=4, d_v=3, mode="eval", **kw)
    ref = tl.SelfAttention(**kwargs)
    ref.init(shapes.signature(x), rng=jax.random.PRNGKey(0))
    t = x.shape[1]
    ours = LinformerSelfAttention(max_len=t, proj_k=t, sharing=sharing, **kwargs)
    ours.init(shapes.signature(x), rng=jax.random.PRNGKey(1))
    return ref, ours


@pytest.mark.parametrize("sharing,use_reference_code", [("none", False), ("headwise", True), ("kv", False)])
def test_layer_with_identity_projections_matches_trax(sharing, use_reference_code):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 10, 8)), jnp.float32)
    ref, ours = _trax_pair(x, sharing, use_reference_code=use_reference_code, bias=True)
    eye = jnp.eye(10) if sharing != "none" else jnp.stack([jnp.eye(10)] * 2)
    weights = tuple(ref.weights) + (eye,) * ours.n_projections  # q/k/v/o transferred from Trax
    assert [w.shape for w in ours.weights[:-ours.n_projections]] == [w.shape for w in ref.weights]
    rng = jax.random.PRNGKey(3)
    want, _ = ref.pure_fn(x, ref.weights, ref.state, rng)
    got, _ = ours.pure_fn(x, weights, ours.state, rng)
    np.testing.assert_allclose(got, want, atol=1e-5)
    g_want = jax.grad(lambda w: jnp.sum(jnp.sin(ref.pure_fn(x, w, ref.state, rng)[0])))(ref.weights)
    g_got = jax.grad(lambda w: jnp.sum(jnp.sin(ours.pure_fn(x, w + weights[len(w):], ours.state, rng)[0])))(
        tuple(ref.weights))
    for a, b in zip(g_got, g_want):
        np.testing.assert_allclose(a, b, atol=1e-5)


def test_layer_padding_mask_and_parameter_counts():
    from trax import shapes

    from labkit.layers import LinformerSelfAttention

    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, 6, 8)), jnp.float32)
    mask = np.array([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], bool)
    counts = {}
    for sharing in ("none", "headwise", "kv"):
        layer = LinformerSelfAttention(n_heads=2, d_qk=4, d_v=4, max_len=16, proj_k=5, sharing=sharing,
                                       masked=True, mode="eval")
        layer.init((shapes.signature(x), shapes.signature(mask)), rng=jax.random.PRNGKey(0))
        counts[sharing] = sum(w.size for w in layer.weights[-layer.n_projections:])
        out = layer((x, mask))
        # Padding (beyond T = 6 up to n = 16) and masked tokens change nothing: compare with the function.
        qkvo = layer.weights[:4]
        e = layer.weights[4]
        f = layer.weights[5] if layer.n_projections == 2 else e
        q, k, v = (jnp.einsum("btd,ndh->btnh", x, w) for w in qkvo[:3])
        want = jnp.einsum("btnh,nhd->btd", linformer_attention(q, k, v, e_proj=e, f_proj=f, mask=mask[..., None, None, :]), qkvo[3])
        np.testing.assert_allclose(out, want, atol=1e-5)
    assert counts == {"none": 2 * 2 * 5 * 16, "headwise": 2 * 5 * 16, "kv": 5 * 16}
    with pytest.raises(Exception, match="S = 20.*n = 16"):  # Trax wraps the ValueError in a LayerError
        layer((jnp.zeros((1, 20, 8)), np.ones((1, 20), bool)))


@pytest.mark.parametrize("sharing", ["none", "headwise"])
def test_checkpoint_levels_give_the_same_outputs_and_gradients(sharing):
    from labkit.attention.linformer import linformer_self_attention

    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(2, 12, 8)), jnp.float32)
    qkvo = tuple(jnp.asarray(rng.normal(size=s) * 0.3, jnp.float32) for s in [(3, 8, 4)] * 3 + [(3, 4, 8)])
    e_shape = (3, 5, 16) if sharing == "none" else (5, 16)
    e, f = (jnp.asarray(rng.normal(size=e_shape) / 2, jnp.float32) for _ in range(2))

    def loss(level):
        def fn(x, qkvo, e, f):
            return jnp.sum(jnp.sin(linformer_self_attention(x, qkvo, e, f, checkpoint=level)))
        return jax.jit(jax.value_and_grad(fn, argnums=(0, 1, 2, 3)))(x, qkvo, e, f)

    value0, grads0 = loss("C0")
    for level in ("C1", "C2"):
        value, grads = loss(level)
        np.testing.assert_allclose(value, value0, rtol=1e-6)
        for a, b in zip(jax.tree_util.tree_leaves(grads), jax.tree_util.tree_leaves(grads0)):
            np.testing.assert_allclose(a, b, atol=2e-5, rtol=1e-5)  # float32 rounding on values up to ~30
    # And C0 against the float64 reference, summing heads through w_o.
    want = 0.0
    for h in range(3):
        qh, kh, vh = (np.asarray(x, np.float64) @ np.asarray(w[h], np.float64) for w in qkvo[:3])
        eh, fh = (np.asarray(a[h] if a.ndim == 3 else a) for a in (e, f))
        want = want + _numpy_linformer(qh[:, :, None], kh[:, :, None], vh[:, :, None], eh, fh)[:, :, 0] @ qkvo[3][h]
    np.testing.assert_allclose(value0, np.sum(np.sin(want)), rtol=1e-5)


def test_layer_trains_inside_a_trax_model():
    from trax import layers as tl
    from trax import shapes

    from labkit.layers import LinformerSelfAttention

    model = tl.Serial(tl.Embedding(16, 8), tl.Residual(LinformerSelfAttention(
        n_heads=2, d_qk=4, d_v=4, max_len=8, proj_k=4, sharing="kv", checkpoint="C2")), tl.Dense(16))
    x = np.arange(16).reshape(2, 8) % 16
    model.init(shapes.signature(x))
    loss = lambda w: jnp.mean(model.pure_fn(x, w, model.state, jax.random.PRNGKey(0))[0] ** 2)
    grads = jax.grad(loss)(model.weights)
    assert all(np.isfinite(g).all() for g in jax.tree_util.tree_leaves(grads))
    e_grads = [g for g in jax.tree_util.tree_leaves(grads) if g.shape == (4, 8)]  # E = F: [proj_k, max_len]
    assert len(e_grads) == 1 and float(jnp.abs(e_grads[0]).sum()) > 0


# ---------------------------------------------------------------- the layer's downsampling, sharing and k schedule

def _layer_reference(x, qkvo, e, f, **options):
    """Trax's projections by einsum, all heads at once through `linformer_attention`, heads summed by `w_o`."""
    q, k, v = (jnp.einsum("btd,ndh->btnh", x, w) for w in qkvo[:3])
    return jnp.einsum("btnh,nhd->btd", linformer_attention(q, k, v, e_proj=e, f_proj=f, **options), qkvo[3])


@pytest.mark.parametrize("downsample,sharing,masked", [
    ("mean", "none", True), ("conv", "none", False), ("conv", "headwise", True), ("conv", "kv", False),
    ("linear", "layerwise", True), ("conv", "layerwise", False)])
def test_layer_downsampling_and_sharing_match_the_function(downsample, sharing, masked):
    from trax import shapes

    from labkit.layers import LinformerSelfAttention, linformer_attention_stack

    rng = np.random.default_rng(4)
    x = jnp.asarray(rng.normal(size=(2, 10, 8)), jnp.float32)
    mask = np.ones((2, 10), bool)
    mask[0, 7:] = False
    (layer,) = linformer_attention_stack(1, max_len=12, proj_k=4, sharing=sharing, downsample=downsample, n_heads=2,
                                         d_qk=4, d_v=3, masked=masked, mode="eval")
    inputs = (x, mask) if masked else x
    layer.init(shapes.signature(inputs), rng=jax.random.PRNGKey(0))
    attention = layer.sublayers[1] if sharing == "layerwise" else layer
    assert isinstance(attention, LinformerSelfAttention)
    proj = (layer.sublayers[0].weights[0],) if sharing == "layerwise" else tuple(attention.weights[4:])
    # conv: a kernel of r = ceil(n / k) = 3 positions, one per head unless shared; mean: no weights.
    want_shapes = {"mean": [], "conv": [(2, 3)] * 2 if sharing == "none" else [(3,)] * (2 if sharing == "headwise"
                                                                                   else 1)}
    if downsample in want_shapes:
        assert [p.shape for p in proj] == want_shapes[downsample]
    e = proj[0] if proj else None
    f = proj[1] if len(proj) == 2 else None
    want = _layer_reference(x, attention.weights[:4], e, f, downsample=downsample,
                            stride=None if downsample == "linear" else 3,
                            mask=mask[:, None, None, :] if masked else None)
    np.testing.assert_allclose(layer(inputs), want, atol=1e-5)


def test_mean_downsampling_with_blocks_of_one_is_trax_self_attention():
    from trax import layers as tl
    from trax import shapes

    from labkit.layers import LinformerSelfAttention

    x = jnp.asarray(np.random.default_rng(5).normal(size=(2, 9, 8)), jnp.float32)
    mask = np.ones((2, 9), bool)
    mask[1, 4:] = False
    ref = tl.SelfAttention(n_heads=2, d_qk=4, d_v=4, masked=True, mode="eval")
    ref.init(shapes.signature((x, mask)), rng=jax.random.PRNGKey(0))
    ours = LinformerSelfAttention(n_heads=2, d_qk=4, d_v=4, masked=True, mode="eval", max_len=9, proj_k=9,
                                  downsample="mean")
    ours.init(shapes.signature((x, mask)), rng=jax.random.PRNGKey(1))
    assert ours.n_projections == 0
    ours.weights = ref.weights
    np.testing.assert_allclose(ours((x, mask)), ref((x, mask)), atol=1e-5)


def test_attention_stack_follows_the_k_schedule():
    from trax import shapes

    from labkit.layers import linformer_attention_stack

    x = jnp.zeros((1, 64, 8))
    kw = dict(max_len=64, proj_k=32, k_decay=0.5, min_k=6, n_heads=2, d_qk=4, d_v=4, mode="eval")
    layers = linformer_attention_stack(4, **kw)
    assert [layer.proj_k for layer in layers] == k_schedule(32, 4, decay=0.5, min_k=6) == [32, 16, 8, 6]
    for layer in layers:
        layer.init(shapes.signature(x))
    assert [layer.weights[4].shape for layer in layers] == [(2, k, 64) for k in (32, 16, 8, 6)]
    convs = linformer_attention_stack(4, downsample="conv", sharing="headwise", **kw)
    for layer in convs:
        layer.init(shapes.signature(x))
    assert [layer.weights[4].shape for layer in convs] == [(2,), (4,), (8,), (11,)]  # r = ceil(64 / k)
    assert [layer.proj_k for layer in linformer_attention_stack(2, **{**kw, "proj_k": [7, 3]})] == [7, 3]
    with pytest.raises(ValueError, match="same k"):
        linformer_attention_stack(4, sharing="layerwise", **kw)
    with pytest.raises(ValueError, match="no projection to share"):
        linformer_attention_stack(2, sharing="layerwise", downsample="mean", **{**kw, "k_decay": 1.0})


# ---------------------------------------------------------------- P-bar dropout (attention probabilities)

def _probability_probe(rng, t=5, s=6):
    """q, k and one-hot values `[S, N, S]`: with mean pooling over blocks of 1 the output IS the (dropped) P-bar."""
    q, k, _ = random_qkv(rng, t=t, s=s, h=s, as_jax=True)  # jax.nn wants value dim = query dim
    value = jnp.broadcast_to(jnp.eye(s)[:, None, :], (s, 2, s))
    return q, k, value


def test_pbar_dropout_rate_zero_is_no_dropout(rng):
    q, k, value = _probability_probe(rng)
    probs = jax.nn.dot_product_attention(q, k, value)  # [T, N, S]: the attention weights themselves
    got = linformer_attention(q, k, value, downsample="mean", stride=1, dropout_rate=0.0,
                              prng_key=jax.random.PRNGKey(3))
    np.testing.assert_allclose(got, probs, atol=1e-6)


def test_pbar_dropout_drops_probabilities_and_keeps_the_expectation(rng):
    q, k, value = _probability_probe(rng)
    probs = np.asarray(jax.nn.dot_product_attention(q, k, value))
    rate, draws = 0.25, 4000
    attend = jax.vmap(lambda key: linformer_attention(q, k, value, downsample="mean", stride=1, dropout_rate=rate,
                                                      prng_key=key))
    outs = np.asarray(attend(jax.random.split(jax.random.PRNGKey(0), draws)))  # [draws, T, N, S]
    dropped = np.isclose(outs, 0.0, atol=1e-7)
    # Each probability is either dropped or kept and rescaled by 1 / (1 - rate) (inverted dropout).
    assert np.all(dropped | np.isclose(outs, probs / (1 - rate), rtol=1e-5))
    assert abs(dropped.mean() - rate) < 0.01
    tolerance = 5 * probs * np.sqrt(rate / (1 - rate) / draws) + 1e-6  # 5 standard errors of the mean
    assert np.all(np.abs(outs.mean(0) - probs) <= tolerance)
    # The pattern depends on the key: the same key gives the same draw, different keys different ones.
    assert np.array_equal(outs[0], np.asarray(attend(jax.random.split(jax.random.PRNGKey(0), draws)[:1])[0]))
    assert not np.array_equal(dropped[0], dropped[1])


def test_pbar_dropout_expectation_with_learned_projections(rng):
    q, k, v = random_qkv(rng, t=4, s=8, as_jax=True)
    e, f = (jnp.asarray(rng.normal(size=(2, 3, 8)) / np.sqrt(3), jnp.float32) for _ in range(2))
    want = np.asarray(linformer_attention(q, k, v, e_proj=e, f_proj=f))
    attend = jax.vmap(lambda key: linformer_attention(q, k, v, e_proj=e, f_proj=f, dropout_rate=0.3, prng_key=key))
    outs = np.asarray(attend(jax.random.split(jax.random.PRNGKey(1), 4000)))
    standard_error = outs.std(0) / np.sqrt(len(outs))
    assert np.all(np.abs(outs.mean(0) - want) <= 5 * standard_error + 1e-6)
    assert np.abs(outs[0] - want).max() > 1e-2  # one draw really is perturbed


def test_layer_pbar_dropout_in_train_mode_only():
    from trax import shapes

    from labkit.layers import LinformerSelfAttention

    x = jnp.asarray(np.random.default_rng(6).normal(size=(2, 8, 8)), jnp.float32)
    layers = {}
    for mode in ("train", "eval"):
        layers[mode] = LinformerSelfAttention(n_heads=2, d_qk=4, d_v=4, max_len=8, proj_k=3, attention_dropout=0.5,
                                              mode=mode)
        layers[mode].init(shapes.signature(x), rng=jax.random.PRNGKey(0))
    train, evaluate = layers["train"], layers["eval"]
    run = lambda layer, seed: np.asarray(layer.pure_fn(x, train.weights, layer.state, jax.random.PRNGKey(seed))[0])
    qkvo, e, f = train.weights[:4], train.weights[4], train.weights[5]
    want = _layer_reference(x, qkvo, e, f)
    np.testing.assert_allclose(run(evaluate, 1), want, atol=1e-5)
    np.testing.assert_array_equal(run(evaluate, 1), run(evaluate, 2))  # eval: deterministic, no dropout
    np.testing.assert_array_equal(run(train, 1), run(train, 1))
    assert np.abs(run(train, 1) - run(train, 2)).max() > 1e-3  # train: the draw follows the rng
    assert np.abs(run(train, 1) - want).max() > 1e-3
