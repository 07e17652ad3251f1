"""Kernel attention (labkit.attention.kernel, labkit.layers.KernelSelfAttention) against independent references:
numpy float64 feature formulas, the quadratic masked form of the same features in float64 (causal, windowed),
statistical checks of the estimator with fixed seeds, exact softmax attention, Trax's tl.FavorAttention /
tl.CausalFavorAttention and tl.SelfAttention."""

import functools
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import qkv_of_shape

from labkit.attention import kernel as ka
from labkit.attention.dense import dot_product_attention


_qkv = functools.partial(qkv_of_shape, scale=0.5)


def quadratic(phi_q, phi_k, v, weights=None, eps=1e-6):
    """`(A * weights) V / ((A * weights) 1 + eps)` with `A = phi_q phi_k^T`, float64; weights `[T, S]` or None."""
    phi_q, phi_k, v = (np.asarray(a, np.float64) for a in (phi_q, phi_k, v))
    a = np.einsum("...tnm,...snm->...nts", phi_q, phi_k)
    if weights is not None:
        a = a * weights
    num = np.einsum("...nts,...snv->...tnv", a, v)
    return num / (np.swapaxes(a.sum(-1), -1, -2)[..., None] + eps)


def window_weights_loop(t, chunk, window, decay, padding):
    """Brute force: weight of key j for query i in the windowed causal form."""
    pad = (-t % chunk) if padding == "left" else 0
    w = np.zeros((t, t))
    for i in range(t):
        for j in range(t):
            dist = (i + pad) // chunk - (j + pad) // chunk
            if 0 <= dist < window:
                w[i, j] = 1.0 if decay is None else decay ** dist
    return w


def _features(q, k, transform, m, key=0, scale=None):
    """The features kernel_attention uses (sqrt(scale) on both sides), for the quadratic references."""
    d = q.shape[-1]
    proj = ka.random_projection(jax.random.PRNGKey(key), m, d) if m else None
    root = np.float32((1 / np.sqrt(d) if scale is None else scale) ** 0.5)
    qs, ks = jnp.asarray(q) * root, jnp.asarray(k) * root
    return (ka.kernel_features(qs, proj, transform, is_query=True, other=ks),
            ka.kernel_features(ks, proj, transform, is_query=False, other=qs))


# ---------------------------------------------------------------- projections and features

def test_projection_is_seeded_orthogonal_and_gaussian_sized():
    a = ka.random_projection(jax.random.PRNGKey(3), 20, 8)
    np.testing.assert_array_equal(a, ka.random_projection(jax.random.PRNGKey(3), 20, 8))
    assert a.shape == (20, 8) and not np.allclose(a, ka.random_projection(jax.random.PRNGKey(4), 20, 8))
    for block in (a[:8], a[8:16], a[16:]):  # rows inside a block are orthogonal
        unit = block / np.linalg.norm(block, axis=1, keepdims=True)
        np.testing.assert_allclose(unit @ unit.T, np.eye(len(block)), atol=1e-5)
    norms = np.linalg.norm(ka.random_projection(jax.random.PRNGKey(0), 4096, 8), axis=1) ** 2
    assert abs(norms.mean() - 8) < 0.5  # chi-square(8) lengths: mean 8


@pytest.mark.parametrize("name,fn", [("relu", lambda z: np.maximum(z, 0) + 1e-3),
                                     ("elu", lambda z: np.where(z > 0, z + 1, np.exp(np.minimum(z, 0)))),
                                     ("square", np.square), ("identity", lambda z: z)])
@pytest.mark.parametrize("m", [0, 24])
def test_deterministic_transforms_match_numpy(name, fn, m):
    x = np.random.default_rng(0).normal(size=(2, 5, 3, 8)).astype(np.float32)
    proj = ka.random_projection(jax.random.PRNGKey(1), m, 8) if m else None
    z = x.astype(np.float64) if proj is None else x.astype(np.float64) @ np.asarray(proj, np.float64).T
    want = fn(z) / (np.sqrt(m) if m else 1.0)
    np.testing.assert_allclose(ka.kernel_features(x, proj, name, is_query=True), want, rtol=1e-5, atol=1e-5)


def test_exp_features_are_favor_plus_up_to_cancelling_shifts():
    x = np.random.default_rng(1).normal(size=(2, 6, 3, 8)).astype(np.float32) * 0.5
    proj = ka.random_projection(jax.random.PRNGKey(2), 32, 8)
    plain = np.exp(x.astype(np.float64) @ np.asarray(proj, np.float64).T
                   - 0.5 * (x.astype(np.float64) ** 2).sum(-1, keepdims=True)) / np.sqrt(32)
    np.testing.assert_allclose(ka.positive_random_features(x, proj), plain, rtol=1e-5)
    ratio_q = np.asarray(ka.kernel_features(x, proj, "exp", is_query=True)) / plain
    ratio_k = np.asarray(ka.kernel_features(x, proj, "exp", is_query=False)) / plain
    np.testing.assert_allclose(ratio_q, np.broadcast_to(ratio_q[..., :1], ratio_q.shape), rtol=1e-5)  # one factor per query row
    np.testing.assert_allclose(ratio_k, np.broadcast_to(ratio_k[..., :1, :, :1], ratio_k.shape), rtol=1e-5)  # one per (example, head) for keys


# ---------------------------------------------------------------- statistics (fixed seeds, loose bounds)

@pytest.mark.parametrize("orthogonal", [True, False])
def test_exp_estimator_is_unbiased(orthogonal):
    r = np.random.default_rng(0)
    x, y = (r.normal(size=(4, 8)) * 0.3).astype(np.float32), (r.normal(size=(4, 8)) * 0.3).astype(np.float32)

    def estimate(key):
        w = ka.random_projection(key, 16, 8, orthogonal=orthogonal)
        return ka.positive_random_features(x, w) @ ka.positive_random_features(y, w).T

    mean = jax.vmap(estimate)(jax.random.split(jax.random.PRNGKey(0), 2000)).mean(0)
    np.testing.assert_allclose(mean, np.exp(x.astype(np.float64) @ y.T.astype(np.float64)), rtol=0.03)


def test_orthogonal_features_have_lower_variance():
    r = np.random.default_rng(1)
    x, y = (r.normal(size=(6, 8)) * 0.5).astype(np.float32), (r.normal(size=(6, 8)) * 0.5).astype(np.float32)
    true = np.exp(x @ y.T)

    def mse(orthogonal):
        def sq_err(key):
            w = ka.random_projection(key, 8, 8, orthogonal=orthogonal)
            return (ka.positive_random_features(x, w) @ ka.positive_random_features(y, w).T - true) ** 2
        return float(jax.vmap(sq_err)(jax.random.split(jax.random.PRNGKey(5), 2000)).mean())

    assert mse(True) < 0.9 * mse(False)


@pytest.mark.parametrize("transform", ["exp", "expplus"])
def test_attention_error_falls_with_more_features(transform):
    q, k, v = _qkv(2, (1, 64, 2, 16))
    exact = dot_product_attention(q, k, v)

    def err(m):
        return np.mean([float(jnp.abs(ka.kernel_attention(q, k, v, feature_transform=transform, num_random_features=m,
                                                          prng_key=jax.random.PRNGKey(s)) - exact).mean())
                        for s in range(3)])

    e16, e256, e2048 = err(16), err(256), err(2048)
    assert e2048 < e256 < e16 and e2048 < 0.4 * e16 and e2048 < 0.01


# ---------------------------------------------------------------- each form vs the quadratic form of its features

@pytest.mark.parametrize("transform,causal,chunk", [
    ("exp", False, None), ("exp", True, None), ("exp", True, 5), ("expplus", False, None), ("expplus", True, 5),
    ("expmod", True, None), ("relu", True, 5), ("elu", False, None), ("square", True, None)])
def test_forms_match_quadratic_form_of_same_features(transform, causal, chunk):
    q, k, v = _qkv(7, (2, 13, 2, 8), dv=6)
    got = ka.kernel_attention(q, k, v, feature_transform=transform, num_random_features=24, is_causal=causal,
                              causal_chunk_length=chunk)
    phi_q, phi_k = _features(q, k, transform, 24)
    want = quadratic(phi_q, phi_k, v, np.tril(np.ones((13, 13))) if causal else None)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


@pytest.mark.parametrize("t,chunk,window,decay,padding", [
    (9, 1, 3, None, None), (9, 3, 2, None, None), (12, 4, 2, 0.5, None), (10, 3, 2, None, "right"),
    (10, 3, 2, 0.7, "left"), (1, 1, 3, 0.5, None), (5, 8, 1, None, "right")])
def test_windowed_causal_matches_quadratic_masked_form(t, chunk, window, decay, padding):
    q, k, v = _qkv(t + chunk, (2, t, 2, 8))
    got = ka.kernel_attention(q, k, v, is_causal=True, num_random_features=16, causal_chunk_length=chunk,
                              causal_window_length=window, causal_window_decay=decay, causal_padding=padding)
    weights = window_weights_loop(t, chunk, window, decay, padding)
    np.testing.assert_allclose(ka.causal_window_weights(t, chunk_length=chunk, window_length=window,
                                                        window_decay=decay, padding=padding), weights, rtol=1e-6)
    want = quadratic(*_features(q, k, "exp", 16), v, weights)
    np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5)


def test_window_covering_everything_with_chunk_1_is_plain_causal():
    q, k, v = _qkv(3, (1, 11, 2, 8))
    plain = ka.kernel_attention(q, k, v, is_causal=True)
    windowed = ka.kernel_attention(q, k, v, is_causal=True, causal_window_length=11, causal_chunk_length=1)
    np.testing.assert_allclose(windowed, plain, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------- options change what they should, nothing else

def test_short_seq_and_begin_kernel_give_exact_softmax_where_documented():
    q, k, v = _qkv(4, (2, 10, 2, 8), scale=1.0)
    for causal in (False, True):
        exact = dot_product_attention(q, k, v, is_causal=causal)
        short = ka.kernel_attention(q, k, v, feature_transform=None, num_random_features=0, is_short_seq=True,
                                    is_causal=causal)
        np.testing.assert_allclose(short, exact, atol=1e-6)
        kernel = ka.kernel_attention(q, k, v, is_causal=causal)
        mixed = ka.kernel_attention(q, k, v, is_causal=causal, begin_kernel=4)
        np.testing.assert_allclose(mixed[:, :4], exact[:, :4], atol=1e-6)
        np.testing.assert_array_equal(mixed[:, 4:], kernel[:, 4:])


def test_short_seq_softmaxes_the_feature_scores():
    q, k, v = _qkv(5, (1, 6, 1, 8))
    root = np.float32(8 ** -0.25)  # is_short_seq puts the whole scale on the query: (q * root) * root, k
    phi_q, phi_k = (np.asarray(a, np.float64) for a in _features(q * root, k / root, "relu", 16))
    s = np.einsum("tnm,snm->nts", phi_q[0], phi_k[0])
    p = np.exp(s - s.max(-1, keepdims=True))
    want = np.einsum("nts,snv->tnv", p / p.sum(-1, keepdims=True), v[0])
    got = ka.kernel_attention(q, k, v, feature_transform="relu", num_random_features=16, is_short_seq=True)
    np.testing.assert_allclose(got[0], want, rtol=1e-4, atol=1e-5)


def test_scale_and_scale_by_length():
    q, k, v = _qkv(6, (2, 9, 2, 8))
    base = ka.kernel_attention(q, k, v, scale=0.3)
    assert not np.allclose(base, ka.kernel_attention(q, k, v))
    by_len = ka.kernel_attention(q, k, v, scale=0.3, scale_by_length=True)
    np.testing.assert_allclose(by_len, ka.kernel_attention(q, k, v, scale=0.3 * np.log(9) / np.log(512)), rtol=1e-5)
    mask = np.ones((2, 2, 1, 9), bool)
    mask[1, :, :, 5:] = False  # example 1 sees 5 keys: its scale uses log 5
    masked = ka.kernel_attention(q, k, v, mask=mask, scale=0.3, scale_by_length=True)
    np.testing.assert_allclose(masked[0], by_len[0], rtol=1e-5)
    five = ka.kernel_attention(q[1:, :], k[1:, :5], v[1:, :5], scale=0.3 * np.log(5) / np.log(512))
    np.testing.assert_allclose(masked[1:], five, rtol=1e-4, atol=1e-6)


def test_mask_hides_keys_in_every_form():
    q, k, v = _qkv(8, (1, 12, 2, 8))
    mask = np.ones((1, 2, 1, 12), bool)
    mask[..., 3] = mask[..., 7] = False
    k2, v2 = k.copy(), v.copy()
    k2[:, [3, 7]] += 5.0
    v2[:, [3, 7]] -= 9.0
    for opts in (dict(), dict(is_causal=True), dict(is_causal=True, causal_chunk_length=5),
                 dict(is_causal=True, causal_window_length=2, causal_chunk_length=3), dict(is_short_seq=True),
                 dict(begin_kernel=6), dict(feature_transform="relu")):
        a = ka.kernel_attention(q, k, v, mask=mask, **opts)
        b = ka.kernel_attention(q, k2, v2, mask=mask, **opts)
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=str(opts))


def test_the_projection_comes_from_prng_key():
    q, k, v = _qkv(9, (1, 8, 2, 8))
    fixed = ka.kernel_attention(q, k, v, num_random_features=32, prng_key=jax.random.PRNGKey(7))
    np.testing.assert_array_equal(fixed, ka.kernel_attention(q, k, v, num_random_features=32,
                                                             prng_key=jax.random.PRNGKey(7)))
    assert not np.allclose(fixed, ka.kernel_attention(q, k, v, num_random_features=32,
                                                      prng_key=jax.random.PRNGKey(8)))
    w = ka.random_projection(jax.random.PRNGKey(7), 32, 8)
    np.testing.assert_array_equal(fixed, ka.kernel_attention(q, k, v, projection=w))


def test_bad_arguments_are_named():
    q, k, v = _qkv(0, (1, 6, 1, 4))
    with pytest.raises(ValueError, match="feature_transform"):
        ka.kernel_attention(q, k, v, feature_transform="cosine")
    with pytest.raises(ValueError, match="bias"):
        ka.kernel_attention(q, k, v, bias=np.zeros((6, 6)))
    with pytest.raises(ValueError, match="is_causal"):
        ka.kernel_attention(q, k, v, causal_window_length=2)
    with pytest.raises(ValueError, match="causal_padding"):
        ka.kernel_attention(q, k, v, is_causal=True, causal_window_length=2, causal_chunk_length=4)
    with pytest.raises(ValueError, match="projection"):
        ka.kernel_attention(q, k, v, projection=np.ones((8, 3), np.float32))


def test_gradients_are_finite_and_match_the_quadratic_form():
    q, k, v = _qkv(10, (1, 10, 1, 4))

    def loss(fn):
        return lambda q, k, v: jnp.sum(fn(q, k, v) ** 2)

    got = jax.grad(loss(lambda q, k, v: ka.kernel_attention(q, k, v, is_causal=True, causal_chunk_length=3,
                                                            num_random_features=8)), (0, 1, 2))(q, k, v)

    def quad(q, k, v):
        phi_q, phi_k = _features(q, k, "exp", 8)
        a = jnp.einsum("tnm,snm->nts", phi_q[0], phi_k[0]) * jnp.tril(jnp.ones((10, 10)))
        return (jnp.einsum("nts,snv->tnv", a, v[0]) / (a.sum(-1).T[..., None] + 1e-6))[None]

    want = jax.grad(loss(quad), (0, 1, 2))(q, k, v)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=2e-3, atol=2e-4)


# ---------------------------------------------------------------- Trax: tl.FavorAttention, tl.CausalFavorAttention

def test_matches_trax_favor_relu_noncausal_and_causal():
    from trax import layers as tl

    q, k, v = _qkv(11, (2, 9, 1, 8), scale=1.0)
    three = [jnp.asarray(a[:, :, 0]) for a in (q, k, v)]  # Trax: [batch * heads, T, d]
    ours = dict(feature_transform="relu", num_random_features=0, scale=1.0)
    trax_out, _ = tl.FavorAttention(d_feature=8, n_heads=1).forward((*three, jnp.ones((2, 9), bool)))
    np.testing.assert_allclose(ka.kernel_attention(q, k, v, **ours)[:, :, 0], trax_out, rtol=2e-5, atol=2e-6)
    trax_causal = tl.CausalFavorAttention().forward(three)
    np.testing.assert_allclose(ka.kernel_attention(q, k, v, is_causal=True, **ours)[:, :, 0], trax_causal,
                               rtol=2e-5, atol=2e-6)


def test_trax_favor_softmax_features_are_ours_plus_its_epsilon():
    from trax import layers as tl

    layer = tl.FavorAttention(d_feature=8, n_heads=1, n_random_features=16, use_approximate_softmax=True,
                              normalize_data=True)
    x = jnp.asarray(np.random.default_rng(12).normal(size=(2, 7, 8)).astype(np.float32))
    proj = layer._projection_matrix
    for is_query in (True, False):
        theirs = np.asarray(layer.nonnegative_softmax_kernel_feature_creator(x, is_query))
        theirs = theirs - 1e-4 / np.sqrt(16)  # Trax adds epsilon=1e-4 (times 1/sqrt(m)) to every feature
        ours = np.asarray(ka.kernel_features(x[:, :, None] * 8 ** -0.25, proj, "exp", is_query=is_query))[:, :, 0]
        ratio = theirs / ours  # equal up to the (cancelling) stabilising shift
        axes = (-1,) if is_query else (-2, -1)
        np.testing.assert_allclose(ratio, np.broadcast_to(ratio.mean(axis=axes, keepdims=True), ratio.shape),
                                   rtol=2e-3)


# ---------------------------------------------------------------- the Trax layer

def _layers(x, **kw):
    from trax import layers as tl
    from trax import shapes

    from labkit.layers import KernelSelfAttention

    ref = tl.SelfAttention(n_heads=2, d_qk=8, d_v=8, **{k: v for k, v in kw.items() if k in ("causal", "mode",
                                                                                           "use_reference_code")})
    ref.init(shapes.signature(x), rng=jax.random.PRNGKey(0))
    layer = KernelSelfAttention(n_heads=2, d_qk=8, d_v=8, **kw)
    layer.init(shapes.signature(x), rng=jax.random.PRNGKey(1))
    return ref, layer


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(causal=True, use_reference_code=True),
                                dict(mode="eval")], ids=str)
def test_layer_with_self_attention_weights_is_exact_softmax_when_asked(kw):
    x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 12, 16)).astype(np.float32))
    for exact in (dict(feature_transform=None, num_random_features=0, is_short_seq=True), dict(begin_kernel=12)):
        ref, layer = _layers(x, **kw, **exact)
        rng = jax.random.PRNGKey(3)
        want, _ = ref.pure_fn(x, ref.weights, ref.state, rng)
        got, _ = layer.pure_fn(x, ref.weights, ref.state, rng)
        np.testing.assert_allclose(got, want, atol=1e-5)


def test_layer_favor_heads_match_the_function_and_redraw_only_in_training():
    x = jnp.asarray(np.random.default_rng(1).normal(size=(1, 10, 16)).astype(np.float32) * 0.3)
    ref, layer = _layers(x, causal=True, num_random_features=32, seed=4)
    out, _ = layer.pure_fn(x, ref.weights, ref.state, jax.random.PRNGKey(0))
    w_q, w_k, w_v, w_o = ref.weights
    q, k, v = (jnp.einsum("btm,nmh->btnh", x, w) for w in (w_q, w_k, w_v))
    heads = ka.kernel_attention(q, k, v, is_causal=True, num_random_features=32, prng_key=jax.random.PRNGKey(4))
    np.testing.assert_allclose(out, jnp.einsum("btnh,nhm->btm", heads, w_o), rtol=1e-4, atol=1e-5)
    for mode, differ in (("train", True), ("eval", False)):
        _, redraw = _layers(x, causal=True, num_random_features=32, seed=4, redraw=True, mode=mode)
        a, _ = redraw.pure_fn(x, ref.weights, ref.state, jax.random.PRNGKey(1))
        b, _ = redraw.pure_fn(x, ref.weights, ref.state, jax.random.PRNGKey(2))
        assert (not np.allclose(a, b)) == differ
        if not differ:
            np.testing.assert_allclose(a, out, rtol=1e-5, atol=1e-6)


def test_layer_windowed_options_and_training_in_a_model():
    from trax import layers as tl
    from trax import shapes

    from labkit.layers import KernelSelfAttention

    x = jnp.asarray(np.random.default_rng(2).normal(size=(2, 9, 16)).astype(np.float32))
    _, win = _layers(x, causal=True, use_causal_windowed=True, causal_chunk_length=2, causal_window_length=2,
                     causal_window_decay=0.5, causal_padding="right")
    _, plain = _layers(x, causal=True)
    a, _ = win.pure_fn(x, win.weights, win.state, jax.random.PRNGKey(0))
    b, _ = plain.pure_fn(x, win.weights, win.state, jax.random.PRNGKey(0))
    assert a.shape == x.shape and not np.allclose(a, b)
    with pytest.raises(ValueError, match="causal"):
        KernelSelfAttention(n_heads=1, use_causal_windowed=True)

    model = tl.Serial(tl.Embedding(32, 16), KernelSelfAttention(n_heads=2, d_qk=8, d_v=8, causal=True,
                                                                num_random_features=16), tl.Dense(32))
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, 32, (2, 7)))
    model.init(shapes.signature(tokens))

    def loss(weights):
        return jnp.mean(model.pure_fn(tokens, weights, model.state, jax.random.PRNGKey(0))[0] ** 2)

    grads = jax.grad(loss)(model.weights)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree_util.tree_leaves(grads))


# ---------------------------------------------------------------- streaming: the cache, step by step

STREAMED = ("exp", "expmod", "relu", "elu", "square", "identity")  # every transform with a causal form
WINDOWS = [dict(), dict(causal_window_length=3), dict(causal_window_length=2, causal_chunk_length=3,
                                                      causal_window_decay=0.5)]


def _stream(q, k, v, steps, mask=None, **opts):
    """Feed `kernel_attention_step` the sequence in calls of the lengths `steps`; concatenated outputs."""
    cache = ka.init_kernel_cache(q.shape[:-3], q.shape[-2], q.shape[-1], v.shape[-1],
                                 num_random_features=opts.get("num_random_features", 256),
                                 causal_window_length=opts.get("causal_window_length"))
    outs, start = [], 0
    for n in steps:
        part = slice(start, start + n)
        cache, out = ka.kernel_attention_step(cache, q[..., part, :, :], k[..., part, :, :], v[..., part, :, :],
                                              None if mask is None else mask[..., part], **opts)
        outs.append(out)
        start += n
    return jnp.concatenate(outs, axis=-3)


@pytest.mark.parametrize("transform", STREAMED)
def test_step_by_step_equals_the_parallel_causal_form(transform):
    q, k, v = _qkv(20, (2, 12, 2, 8), dv=5)
    for opts in WINDOWS:
        chunk = opts.get("causal_chunk_length", 1)
        opts = dict(opts, feature_transform=transform, num_random_features=16, prng_key=jax.random.PRNGKey(5))
        # eps=0: the exp forms' shifts (running maximum here, whole-sequence one there) then cancel exactly
        want = ka.kernel_attention(q, k, v, is_causal=True, eps=0.0, **opts)
        got = _stream(q, k, v, [chunk] * (12 // chunk), eps=0.0, **opts)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=str(opts))
    if transform == "exp":  # with eps, the two shifts give eps different weights: equal to its order
        plain = dict(feature_transform=transform, num_random_features=16)
        np.testing.assert_allclose(_stream(q, k, v, [1] * 12, **plain),
                                   ka.kernel_attention(q, k, v, is_causal=True, **plain), rtol=1e-4, atol=1e-4)


def test_prefill_and_padding_masks():
    q, k, v = _qkv(21, (2, 10, 2, 8))
    opts = dict(num_random_features=16, eps=0.0)
    want = ka.kernel_attention(q, k, v, is_causal=True, **opts)
    np.testing.assert_allclose(_stream(q, k, v, [6, 1, 3], **opts), want, rtol=2e-4, atol=2e-5)
    win = dict(opts, causal_chunk_length=3, causal_window_length=2, causal_window_decay=0.7)
    for padding, front, back in (("left", 2, 0), ("right", 0, 2)):  # 10 tokens in chunks of 3: 2 pad positions
        want = ka.kernel_attention(q, k, v, is_causal=True, causal_padding=padding, **win)
        padded = [np.pad(a, [(0, 0), (front, back), (0, 0), (0, 0)], constant_values=7.0) for a in (q, k, v)]
        real = np.pad(np.ones(10, bool), (front, back))
        got = _stream(*padded, [6, 6], mask=real, **win)  # two chunks per call
        np.testing.assert_allclose(got[:, front:front + 10], want, rtol=2e-4, atol=2e-5, err_msg=padding)


def test_generate_decodes_with_the_shared_scan():
    q, k, v = (jnp.asarray(a) for a in _qkv(22, (2, 9, 2, 8)))
    opts = dict(num_random_features=16, causal_window_length=4)
    cache = ka.init_kernel_cache((2,), 2, 8, 8, **opts)
    _, steps, outs = jax.jit(lambda c: ka.generate(lambda t: (q[:, t], k[:, t], v[:, t]), lambda t, o: t + 1,
                                                   jnp.int32(0), 9, c, **opts))(cache)
    np.testing.assert_array_equal(steps, np.arange(9))
    np.testing.assert_allclose(jnp.moveaxis(outs, 0, 1), ka.kernel_attention(q, k, v, is_causal=True, **opts),
                               rtol=1e-3, atol=1e-4)


def test_step_refuses_what_has_no_streaming_form():
    q, k, v = _qkv(23, (1, 4, 1, 4))
    cache = ka.init_kernel_cache((1,), 1, 4, 4, num_random_features=8)
    with pytest.raises(ValueError, match="expplus"):
        ka.kernel_attention_step(cache, q, k, v, feature_transform="expplus", num_random_features=8)
    with pytest.raises(ValueError, match="whole chunks"):
        ka.kernel_attention_step(ka.init_kernel_cache((1,), 1, 4, 4, num_random_features=8, causal_window_length=2),
                                 q[:, :2], k[:, :2], v[:, :2], num_random_features=8, causal_chunk_length=3,
                                 causal_window_length=2)
    with pytest.raises(ValueError, match="cache.kv"):
        ka.kernel_attention_step(cache, q, k, v, num_random_features=16)
    for bad in (dict(is_short_seq=True), dict(begin_kernel=2), dict(scale_by_length=True)):
        with pytest.raises(ValueError):
            ka.check_streamable("exp", **bad)


def test_hidden_keys_have_no_say_in_the_exp_shift():
    q, k, v = _qkv(24, (1, 8, 2, 8))
    mask = np.ones((1, 1, 1, 8), bool)
    mask[..., 2] = False
    k2 = k.copy()
    k2[:, 2] = 60.0  # an expmod exponent of hundreds: shifting by it would underflow every real key
    for transform in ("exp", "expmod"):
        opts = dict(feature_transform=transform, num_random_features=16)
        want = quadratic(*_features(q[:, [0, 1, 3, 4, 5, 6, 7]], k[:, [0, 1, 3, 4, 5, 6, 7]], transform, 16),
                         v[:, [0, 1, 3, 4, 5, 6, 7]])
        got = ka.kernel_attention(q[:, [0, 1, 3, 4, 5, 6, 7]], k2, v, mask=mask, **opts)
        np.testing.assert_allclose(got, want, rtol=2e-4, atol=2e-5, err_msg=transform)


# ---------------------------------------------------------------- Model Garden's call form

def test_cross_attention_call_form_key_defaults_to_value():
    q, _, _ = _qkv(25, (2, 5, 2, 8))
    k, v, _ = _qkv(26, (2, 11, 2, 8))
    opts = dict(num_random_features=16, prng_key=jax.random.PRNGKey(2))
    np.testing.assert_allclose(ka.kernel_cross_attention(q, v, **opts),
                               quadratic(*_features(q, v, "exp", 16, key=2), v), rtol=2e-4, atol=2e-5)
    attention_mask = np.ones((2, 11), np.int32)  # tfm's [B, S], 1 = attend
    attention_mask[1, 7:] = 0
    weights = np.broadcast_to(attention_mask[:, None, None, :], (2, 2, 5, 11))
    np.testing.assert_allclose(ka.kernel_cross_attention(q, v, k, attention_mask, **opts),
                               quadratic(*_features(q, k, "exp", 16, key=2), v, weights), rtol=2e-4, atol=2e-5)


# ---------------------------------------------------------------- the layer: predict mode and the mask path

@pytest.mark.parametrize("kw,calls", [(dict(use_causal_windowed=True, causal_window_decay=0.5, n_parallel_heads=1),
                                       (1,) * 6)], ids=["windowed-one-head-at-a-time"])
def test_layer_predict_mode_token_by_token_equals_the_full_causal_output(kw, calls):
    """The logic of Trax's own `_test_fast_inference` (efficient_attention_test.py), on this layer's windowed
    form; the plain form with a prompt is decoded with every other decoding layer in tests/test_predict.py."""
    from trax import shapes

    from labkit.layers import KernelSelfAttention

    x = jax.random.uniform(jax.random.PRNGKey(0), (2, 6, 13), dtype=jnp.float32)
    common = dict(n_heads=3, d_qk=7, d_v=5, causal=True, num_random_features=16, **kw)
    ref = KernelSelfAttention(mode="eval", **common)
    weights, state = ref.init(shapes.signature(x))
    want, _ = jax.jit(ref.pure_fn)(x, weights, state, jax.random.PRNGKey(0))
    layer = KernelSelfAttention(mode="predict", **common)
    cur = layer.init(shapes.signature(x[:, :1]))[1]
    step, outs, start = jax.jit(layer.pure_fn), [], 0
    for n in calls:
        out, cur = step(x[:, start:start + n], weights, cur, jax.random.PRNGKey(0))
        outs.append(out)
        start += n
    np.testing.assert_allclose(jnp.concatenate(outs, axis=1), want, rtol=1e-3, atol=1e-3)
    for bad in (dict(causal=False), dict(feature_transform="expplus"), dict(is_short_seq=True)):
        with pytest.raises(ValueError):
            KernelSelfAttention(mode="predict", **{**common, **bad})


def test_layer_mask_padding_changes_no_real_output():
    from trax import shapes

    from labkit.layers import KernelSelfAttention

    r = np.random.default_rng(30)
    x = r.normal(size=(2, 9, 16)).astype(np.float32)
    mask = np.ones((2, 9), bool)
    mask[1, 6:] = False  # example 1: 6 real tokens, 3 of padding
    x2 = x.copy()
    x2[1, 6:] = r.normal(size=(3, 16)) * 20.0  # whatever padding holds
    for transform in ("exp", "expmod"):
        layer = KernelSelfAttention(n_heads=2, d_qk=8, d_v=8, masked=True, num_random_features=16,
                                    feature_transform=transform)
        layer.init(shapes.signature((jnp.asarray(x), jnp.asarray(mask))), rng=jax.random.PRNGKey(1))
        a, b = (layer.pure_fn((jnp.asarray(xx), jnp.asarray(mask)), layer.weights, layer.state,
                              jax.random.PRNGKey(0))[0] for xx in (x, x2))
        np.testing.assert_allclose(a[1, :6], b[1, :6], rtol=1e-5, atol=1e-6)
        w_q, w_k, w_v, w_o = layer.weights
        q, k, v = (jnp.einsum("tm,nmh->tnh", x[1, :6], w) for w in (w_q, w_k, w_v))  # the unpadded sequence
        heads = ka.kernel_attention(q, k, v, num_random_features=16, feature_transform=transform)
        np.testing.assert_allclose(a[1, :6], jnp.einsum("tnh,nhm->tm", heads, w_o), rtol=1e-4, atol=1e-5)
