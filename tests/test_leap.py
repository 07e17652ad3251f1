"""LEAP (labkit.attention.leap, labkit.attention.positional, labkit.layers.LEAPSelfAttention) against
independent references: a direct per-position loop in float64 numpy (the definition, window by window),
autodiff of a dense `[T, T]` form, and float64 finite differences."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from labkit.attention import leap
from labkit.attention.positional import alibi_slopes, rotary
from recall_lm import VOCAB, train_recall_lm


def _causal_leap(q, f, k, v, **options):
    """Decoder LEAP with the focus in the (q, f, k, v) order the recurrences here are written in."""
    return leap.leap_attention(q, k, v, focus=f, is_causal=True, **options)


def rope(x, start=0):
    """RoPE by hand, float64: pair (x_2i, x_2i+1) of position p turned by the angle p 10000^(-2i/d)."""
    x = np.asarray(x, np.float64)
    d = x.shape[-1]
    angle = (start + np.arange(x.shape[0]))[:, None, None] * 10000.0 ** (-np.arange(0, d, 2) / d)
    out = np.empty_like(x)
    out[..., 0::2] = x[..., 0::2] * np.cos(angle) - x[..., 1::2] * np.sin(angle)
    out[..., 1::2] = x[..., 0::2] * np.sin(angle) + x[..., 1::2] * np.cos(angle)
    return out


def leap_loop(q, f, k, v, *, window=None, mask=None, scale=None, rescale=None, alibi=None, rotary=False):
    """The definition, one head and position at a time, float64: q/f/k `[T, N, d]`, v `[T, N, dv]`, mask `[T]`.
    `rotary`: q, f, k turned by their positions after the standardisation of `rescale`."""
    q, f, k, v = (np.asarray(a, np.float64) for a in (q, f, k, v))
    t_len, n_heads, d = q.shape
    if rescale is not None:
        std = lambda x: (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-5)
        q, f, k, v = map(std, (q, f, k, v))
        scale = rescale / d if scale is None else scale
    if rotary:
        q, f, k = map(rope, (q, f, k))
    s = 1 / np.sqrt(d) if scale is None else scale
    out = np.zeros(v.shape)
    for n in range(n_heads):
        for t in range(t_len):
            lo = 0 if window is None else max(0, t - window + 1)
            js = [j for j in range(lo, t + 1) if mask is None or mask[j]]
            if not js:
                continue
            a = np.array([s * f[j, n] @ k[j, n] + (0.0 if alibi is None else alibi[n] * j) for j in js])
            p = np.exp(a - a.max())
            p /= p.sum()
            k_avg = sum(pj * k[j, n] for pj, j in zip(p, js))
            v_avg = sum(pj * v[j, n] for pj, j in zip(p, js))
            z = s * q[t, n] @ k_avg
            out[t, n] = np.exp(-np.logaddexp(0.0, -z)) * v_avg  # sigmoid without overflow
    return out


def _qfkv(seed, t, n, d, dv=None, scale=1.0):
    r = np.random.default_rng(seed)
    q, f, k = (r.normal(size=(t, n, d)).astype(np.float32) * scale for _ in range(3))
    return q, f, k, r.normal(size=(t, n, dv or d)).astype(np.float32)


# ---------------------------------------------------------------- parallel form

@pytest.mark.parametrize("t", [1, 2, 7])
def test_every_window_matches_the_direct_loop(t):
    q, f, k, v = _qfkv(t, t, 2, 4, 3)
    for window in list(range(1, t + 2)) + [None]:  # every window size, including w = T and w > T
        got = leap.leap_attention(q, k, v, focus=f, is_causal=True, window=window)
        np.testing.assert_allclose(got, leap_loop(q, f, k, v, window=window), atol=2e-6, rtol=1e-5,
                                   err_msg=f"window={window}")


def test_batch_axes_and_options_match_the_loop():
    r = np.random.default_rng(1)
    q, f, k, v = (r.normal(size=(2, 3, 9, 2, 4)).astype(np.float32) for _ in range(4))
    slopes = np.array([0.5, -0.25], np.float32)
    got = leap.leap_attention(q, k, v, focus=f, is_causal=True, window=4, rescale=8.0, alibi=slopes)
    assert got.shape == v.shape and got.dtype == jnp.float32
    for b in np.ndindex(2, 3):
        np.testing.assert_allclose(got[b], leap_loop(q[b], f[b], k[b], v[b], window=4, rescale=8.0, alibi=slopes),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("window", [None, 1, 3, 8])
def test_padding_mask_positions_get_no_focus(window):
    q, f, k, v = _qfkv(2, 12, 2, 4)
    mask = np.random.default_rng(3).random(12) > 0.4
    mask[:3] = False  # a leading run of padding: those outputs have nothing to attend to -> 0
    got = leap.leap_attention(q, k, v, focus=f, is_causal=True, window=window, mask=mask[None, None, :])
    np.testing.assert_allclose(got, leap_loop(q, f, k, v, window=window, mask=mask), atol=2e-6, rtol=1e-5)
    np.testing.assert_array_equal(got[:3], 0.0)


@pytest.mark.parametrize("window", [None, 2, 5])
def test_large_logits_stay_finite_and_exact(window):
    """Focus logits of several thousand: exp() alone would overflow float32 (and float64) here."""
    q, f, k, v = _qfkv(4, 20, 2, 8, scale=30.0)
    logits = np.einsum("tnd,tnd->tn", f, k) / np.sqrt(8)
    assert np.abs(logits).max() > 1e3
    got = leap.leap_attention(q, k, v, focus=f, is_causal=True, window=window)
    assert np.isfinite(np.asarray(got)).all()
    np.testing.assert_allclose(got, leap_loop(q, f, k, v, window=window), atol=1e-5, rtol=1e-5)


def test_windowed_sums_do_not_cancel_where_prefix_differences_do():
    """Large early logits followed by small ones: prefix(t) - prefix(t - w) loses everything in float32."""
    t, w = 24, 4
    logits = np.concatenate([np.full(8, 30.0), np.zeros(16)]).astype(np.float32)[:, None]
    x = np.random.default_rng(5).normal(size=(t, 1, 3)).astype(np.float32)
    m, l, s = leap.window_scan(jnp.asarray(logits)[None], jnp.asarray(x)[None], w)
    got = np.asarray(s / l[..., None])[0]
    want = np.stack([(np.exp(logits[max(0, i - w + 1):i + 1, :, None].astype(np.float64))
                      * x[max(0, i - w + 1):i + 1]).sum(0)
                     / np.exp(logits[max(0, i - w + 1):i + 1].astype(np.float64)).sum(0)[..., None]
                     for i in range(t)])
    np.testing.assert_allclose(got, want, atol=1e-6, rtol=1e-5)
    e = np.exp(logits[:, :, None])  # the naive way: subtract shifted prefix sums
    num, den = np.cumsum(e * x, 0), np.cumsum(e, 0)
    num[w:], den[w:] = num[w:] - num[:-w], den[w:] - den[:-w]
    with np.errstate(invalid="ignore", divide="ignore"):
        naive = num / den
    assert not np.allclose(naive[12:], want[12:], atol=1e-2)


# ---------------------------------------------------------------- recurrent form and generation

@pytest.mark.parametrize("position_embedding", ["none", "rotary", "alibi"])
@pytest.mark.parametrize("window", [None, 1, 3])
def test_loop_of_steps_equals_parallel_form_and_the_loop(window, position_embedding):
    q, f, k, v = _qfkv(6, 10, 2, 4, 5, scale=3.0)
    mask = np.ones(10, bool)
    mask[[0, 4, 5]] = False
    pe = dict(position_embedding=position_embedding, rescale=2.0 if position_embedding == "rotary" else None)
    state = leap.init_state((), 2, 4, 5, window=window)
    step = jax.jit(functools.partial(leap.leap_step, **pe))
    outs = []
    for t in range(10):
        state, out_t = step(state, q[t], f[t], k[t], v[t], mask_t=mask[t])
        outs.append(out_t)
    parallel = leap.leap_attention(q, k, v, focus=f, is_causal=True, window=window, mask=mask[None, None], **pe)
    np.testing.assert_allclose(np.stack(outs), parallel, atol=1e-5, rtol=1e-5)
    slopes = np.asarray(alibi_slopes(2)) if position_embedding == "alibi" else None
    want = leap_loop(q, f, k, v, window=window, mask=mask, alibi=slopes, rotary=position_embedding == "rotary",
                     rescale=pe["rescale"])
    np.testing.assert_allclose(parallel, want, atol=1e-5, rtol=1e-5)
    expected_size = 2 * (4 + 5 + 2) if window is None else window * 2 * (4 + 5 + 1)
    assert sum(np.size(a) for a in state) - 1 == expected_size  # O(1) (or O(w)) state, not O(T)


@pytest.mark.parametrize("window", [None, 3])
def test_generate_feeds_outputs_back_and_matches_the_parallel_form(window):
    r = np.random.default_rng(7)
    w_in = jnp.asarray(r.normal(size=(4, 3, 4 * 4)).astype(np.float32))  # x [B, 4] -> q, f, k, v per head

    def project(x):
        h = jnp.einsum("bi,ino->bno", x, w_in)
        return jnp.split(h, 4, axis=-1)

    def readout(x, out):
        return jnp.tanh(out.sum(-2))  # [B, N, 4] -> next x [B, 4]

    x0 = jnp.asarray(r.normal(size=(2, 4)).astype(np.float32))
    state = leap.init_state((2,), 3, 4, 4, window=window)
    _, inputs, outputs = leap.generate(project, readout, x0, 9, state)
    q, f, k, v = project(inputs.reshape(-1, 4))
    q, f, k, v = (a.reshape(9, 2, 3, 4).transpose(1, 0, 2, 3) for a in (q, f, k, v))
    parallel = leap.leap_attention(q, k, v, focus=f, is_causal=True, window=window)
    np.testing.assert_allclose(outputs.transpose(1, 0, 2, 3), parallel, atol=1e-5, rtol=1e-5)
    np.testing.assert_allclose(inputs[1:], readout(None, outputs[:-1]), atol=1e-6)


# ---------------------------------------------------------------- bidirectional and explanations

def test_bidirectional_is_the_mean_of_both_directions():
    q, f, k, v = _qfkv(8, 9, 2, 4)
    mask = np.ones(9, bool)
    mask[6] = False
    got = leap.leap_attention(q, k, v, focus=f, window=3, mask=mask[None, None])
    rev = lambda a: a[::-1]
    want = (leap_loop(q, f, k, v, window=3, mask=mask)
            + rev(leap_loop(rev(q), rev(f), rev(k), rev(v), window=3, mask=mask[::-1]))) / 2
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-5)
    both = leap.leap_attention(q, k, v, focus=f, combine="concat")
    assert both.shape == (9, 2, 8)


@pytest.mark.parametrize("window", [None, 4])
def test_explanation_weights_reproduce_the_output(window):
    q, f, k, v = _qfkv(9, 11, 2, 4)
    mask = np.ones(11, bool)
    mask[2] = False
    expl = leap.leap_explain(q, k, v, focus=f, window=window, mask=mask[None, None])
    assert expl.shape == (2, 11, 11)
    e = np.asarray(expl)
    assert (np.triu(e[0], 1) == 0).all() and (e[:, :, 2] == 0).all()
    if window:
        assert (np.tril(e[0], -window) == 0).all()
    np.testing.assert_allclose(np.einsum("ntj,jnv->tnv", e, v), leap_loop(q, f, k, v, window=window, mask=mask),
                               atol=2e-6, rtol=1e-5)


def test_logits_are_the_focus_and_gate_logits_of_the_definition():
    q, f, k, v = _qfkv(21, 9, 2, 4, scale=3.0)
    for rescale, window in ((None, None), (2.0, 3)):
        focus, gate = leap.leap_logits(q, k, v, focus=f, window=window, rescale=rescale)
        qs, fs, ks = (q, f, k) if rescale is None else (
            (a - a.mean(-1, keepdims=True)) / np.sqrt(a.var(-1, keepdims=True) + 1e-5) for a in (q, f, k))
        s = 0.5 if rescale is None else rescale / 4
        a = s * np.einsum("tnd,tnd->tn", fs, ks)
        np.testing.assert_allclose(focus, a, atol=1e-4, rtol=1e-5)
        for t in (0, 5, 8):
            lo = 0 if window is None else max(0, t - window + 1)
            p = np.exp(a[lo:t + 1] - a[lo:t + 1].max(0))
            k_avg = np.einsum("jn,jnd->nd", p / p.sum(0), ks[lo:t + 1])
            np.testing.assert_allclose(gate[t], s * np.einsum("nd,nd->n", qs[t], k_avg), atol=1e-4, rtol=1e-4)
        if rescale is not None:
            assert np.abs(focus).max() <= rescale and np.abs(gate).max() <= rescale
    assert np.abs(leap.leap_logits(q, k, v, focus=f)[0]).max() > 2.0  # unbounded without rescale


# ---------------------------------------------------------------- gradients

def _dense_leap(q, f, k, v, window, mask):
    """Independent dense form: output = explain-matrix @ v (autodiff differentiates the [T, T] softmax)."""
    return jnp.einsum("ntj,jnv->tnv", leap.leap_explain(q, k, v, focus=f, window=window, mask=mask), v)


@pytest.mark.parametrize("window,masked", [(None, False), (1, True), (3, True)])
def test_custom_vjp_gradient_matches_autodiff(window, masked):
    q, f, k, v = _qfkv(10, 10, 2, 4, 3, scale=2.0)
    mask = None
    if masked:
        m = np.ones(10, bool)
        m[[0, 1, 6]] = False
        mask = m[None, None]
    cot = jnp.asarray(np.random.default_rng(11).normal(size=(10, 2, 3)).astype(np.float32))
    args = tuple(map(jnp.asarray, (q, f, k, v)))
    custom = jax.grad(lambda *a: jnp.sum(cot * _causal_leap(*a, window=window, mask=mask)),
                      argnums=(0, 1, 2, 3))(*args)
    scans = jax.grad(lambda *a: jnp.sum(cot * _causal_leap(*a, window=window, mask=mask, recompute_grad=False)),
                     argnums=(0, 1, 2, 3))(*args)
    dense = jax.grad(lambda *a: jnp.sum(cot * _dense_leap(*a, window, mask)), argnums=(0, 1, 2, 3))(*args)
    for name, c, s, d in zip("qfkv", custom, scans, dense):
        np.testing.assert_allclose(c, d, atol=2e-5, rtol=1e-4, err_msg=f"d{name} vs dense")
        np.testing.assert_allclose(c, s, atol=2e-5, rtol=1e-4, err_msg=f"d{name} vs scans")


def test_gradient_is_finite_and_matches_finite_differences_at_large_logits():
    q, f, k, v = _qfkv(12, 8, 1, 4, scale=20.0)
    direction = [np.random.default_rng(13 + i).normal(size=a.shape) for i, a in enumerate((q, f, k, v))]
    loss = lambda *a: jnp.sum(jnp.sin(_causal_leap(*a, window=3)))
    grads = jax.grad(loss, argnums=(0, 1, 2, 3))(q, f, k, v)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)
    eps = 1e-3
    loop_loss = lambda sgn: np.sum(np.sin(leap_loop(*[a + sgn * eps * d for a, d in zip((q, f, k, v), direction)],
                                                    window=3)))
    numeric = (loop_loss(1) - loop_loss(-1)) / (2 * eps)
    analytic = sum(float(np.sum(np.asarray(g, np.float64) * d)) for g, d in zip(grads, direction))
    np.testing.assert_allclose(analytic, numeric, rtol=2e-2, atol=2e-2)


def test_custom_gradient_keeps_training_memory_linear():
    """Peak extra RSS of forward + backward (fresh subprocesses via labkit.bench, as tests/test_linear.py does):
    with the custom VJP it grows about linearly (x4 length: well under x16) and stays within a few input-sized
    arrays. Autodiff of the scans (recompute_grad=False) stores every level: it needed ~40 such arrays at
    16384 (321 MiB against the custom gradient's 118, AMD EPYC), so it fails the bound (loose: RSS is noisy)."""
    from labkit import bench

    kw = dict(causal=True, backward=True, heads=4, head_dim=32, repeats=1, warmup=1)
    io_mib = lambda n: n * 4 * 32 * 4 / 2**20  # one [seq, heads, dim] float32 array
    small, large = bench.measure("leap", 4096, **kw), bench.measure("leap", 16384, **kw)
    assert small.ok and large.ok, (small.message, large.message)
    assert large.peak_extra_mib < 20 * io_mib(16384) + 32, large.peak_extra_mib
    assert large.peak_extra_mib < 8 * max(small.peak_extra_mib, io_mib(4096)), (small.peak_extra_mib,
                                                                                 large.peak_extra_mib)


# ---------------------------------------------------------------- positions and validation

def test_rotary_makes_leap_depend_only_on_relative_positions():
    q, f, k, v = _qfkv(14, 12, 2, 8)
    out = lambda offset: _causal_leap(*(rotary(a, jnp.arange(12) + offset) for a in (q, f, k)), v, window=5)
    np.testing.assert_allclose(out(0), out(1000), atol=2e-5, rtol=1e-4)
    assert not np.allclose(out(0), leap.leap_attention(q, k, v, focus=f, is_causal=True, window=5), atol=1e-3)  # it does change LEAP
    # rotation preserves dot products between equal positions and rotates them between different ones
    r = np.asarray(rotary(q, jnp.arange(12) + 7))
    np.testing.assert_allclose(np.linalg.norm(r, axis=-1), np.linalg.norm(q, axis=-1), rtol=1e-5)


@pytest.mark.parametrize("position_embedding", ["rotary", "alibi"])
def test_steps_from_a_later_position_use_absolute_positions(position_embedding):
    """A state at position 500: rotary turns by 500 + t (as the by-hand RoPE says); ALiBi's offset cancels."""
    q, f, k, v = _qfkv(15, 9, 2, 4)
    state = leap.init_state((), 2, 4, 4)._replace(pos=jnp.asarray(500, jnp.int32))  # start at position 500
    step = jax.jit(functools.partial(leap.leap_step, position_embedding=position_embedding))
    outs = []
    for t in range(9):
        state, o = step(state, q[t], f[t], k[t], v[t])
        outs.append(o)
    if position_embedding == "alibi":
        want = leap_loop(q, f, k, v, alibi=np.asarray(alibi_slopes(2)))
    else:
        want = leap_loop(rope(q, 500), rope(f, 500), rope(k, 500), v)
    np.testing.assert_allclose(np.stack(outs), want, atol=2e-5, rtol=1e-4)
    assert int(state.pos) == 509


def test_bad_arguments_raise_clear_errors():
    q, f, k, v = _qfkv(16, 5, 1, 4)
    with pytest.raises(ValueError, match="window"):
        leap.leap_attention(q, k, v, focus=f, is_causal=True, window=0)
    with pytest.raises(ValueError, match="focus"):
        leap.leap_attention(q, k, v, focus=f[:, :, :3], is_causal=True)
    with pytest.raises(TypeError, match="mask"):
        leap.leap_attention(q, k, v, focus=f, is_causal=True, mask=np.ones(5))
    with pytest.raises(TypeError, match="query"):
        leap.leap_attention(q.astype(np.int32), k, v, focus=f, is_causal=True)
    with pytest.raises(ValueError, match="position_embedding"):
        leap.leap_attention(q, k, v, focus=f, is_causal=True, position_embedding="learned")
    with pytest.raises(ValueError, match="alibi"):
        leap.leap_attention(q, k, v, focus=f, position_embedding="alibi")  # the encoder form has no "recent"
    with pytest.raises(ValueError, match="choose one"):
        leap.leap_step(leap.init_state((), 1, 4, 4), q[0], f[0], k[0], v[0], position_embedding="rotary",
                       alibi=np.ones(1))


# ---------------------------------------------------------------- the Trax layer

def test_layer_weight_layout_and_numbers():
    from trax import shapes

    from labkit.layers import LEAPSelfAttention

    x = jnp.asarray(np.random.default_rng(17).normal(size=(2, 7, 12)).astype(np.float32))
    mask = np.ones((2, 7), bool)
    mask[1, 5:] = False
    for kw in (dict(causal=True, window=3, bias=True, rescale=4.0, masked=True, position_embedding="rotary"),
               dict(causal=True, position_embedding="alibi"),
               dict(causal=False, use_reference_code=True, mode="eval")):
        layer = LEAPSelfAttention(n_heads=2, d_qk=4, d_v=6, **kw)
        inputs = (x, jnp.asarray(mask)) if kw.get("masked") else x
        layer.init(shapes.signature(inputs), rng=jax.random.PRNGKey(0))
        w = [np.asarray(a, np.float64) for a in layer.weights]
        assert [a.shape for a in w[:5]] == [(2, 12, 4)] * 3 + [(2, 12, 6), (2, 6, 12)]
        assert len(w) == (9 if kw.get("bias") else 5)
        got, _ = layer.pure_fn(inputs, layer.weights, layer.state, jax.random.PRNGKey(1))
        want = np.zeros((2, 7, 12))
        for b in range(2):
            q, f, k, v = (np.einsum("tm,nmd->tnd", np.asarray(x[b], np.float64), a) for a in w[:4])
            if kw.get("bias"):
                q, f, k, v = (a + bias[None] for a, bias in zip((q, f, k, v), w[5:]))
            m = mask[b] if kw.get("masked") else None
            pe = kw.get("position_embedding")
            slopes = 2.0 ** (-8.0 * np.arange(1, 3) / 2) if pe == "alibi" else None  # ALiBi's slopes, N = 2
            o = leap_loop(q, f, k, v, window=kw.get("window"), rescale=kw.get("rescale"), mask=m, alibi=slopes,
                          rotary=pe == "rotary")
            if not kw["causal"]:
                rev = lambda a: a[::-1]
                o = (o + rev(leap_loop(rev(q), rev(f), rev(k), rev(v)))) / 2
            want[b] = np.einsum("tnv,nvm->tm", o, w[4])
            if kw["causal"] and not kw.get("masked"):  # the layer's logits are the function's, head by head
                focus, gate = leap.leap_logits(q, k, v, focus=f, window=kw.get("window"), alibi=slopes,
                                               rescale=kw.get("rescale"), position_embedding=pe or "none")
                got_focus, got_gate = layer.logits(x)
                np.testing.assert_allclose(got_focus[b], focus, atol=1e-4, rtol=1e-4)
                np.testing.assert_allclose(got_gate[b], gate, atol=1e-4, rtol=1e-4)
        np.testing.assert_allclose(got, want, atol=2e-5, rtol=1e-4, err_msg=str(kw))


def test_layer_rejects_what_it_cannot_do():
    from labkit.layers import LEAPSelfAttention

    with pytest.raises(ValueError, match="share_qk"):
        LEAPSelfAttention(share_qk=True)
    with pytest.raises(ValueError, match="window"):
        LEAPSelfAttention(chunk_len=4)
    with pytest.raises(ValueError, match="causal=True"):
        LEAPSelfAttention(mode="predict")  # decoding is causal
    with pytest.raises(ValueError, match="causal=True"):
        LEAPSelfAttention(position_embedding="alibi")
    with pytest.raises(ValueError, match="position_embedding"):
        LEAPSelfAttention(causal=True, position_embedding="learned")


PREDICT_CONFIGS = [dict(position_embedding="none", masked=True),
                   dict(position_embedding="rotary", window=3, bias=True, rescale=2.0),
                   dict(position_embedding="alibi", use_reference_code=True, n_parallel_heads=1)]


@pytest.mark.parametrize("config", PREDICT_CONFIGS, ids=lambda c: c["position_embedding"])
def test_predict_mode_decodes_token_by_token_like_the_full_causal_layer(config):
    """Trax's `_test_fast_inference` logic: the same weights, a first chunk of 3 tokens then one token per call
    in mode='predict', equal to the full causal output of the reference-code layer in mode='eval'."""
    from trax import shapes

    from labkit.layers import LEAPSelfAttention

    kw = dict(n_heads=2, d_qk=4, d_v=6, causal=True, **{k: v for k, v in config.items() if k != "n_parallel_heads"})
    x = jnp.asarray(np.random.default_rng(19).normal(size=(2, 8, 12)).astype(np.float32))
    mask = jnp.asarray(np.random.default_rng(20).random((2, 8)) > 0.3)
    inputs = (x, mask) if kw.get("masked") else (x,)
    full = LEAPSelfAttention(mode="eval", **{**kw, "use_reference_code": True})
    weights, state = full.init(shapes.signature(inputs if kw.get("masked") else x), rng=jax.random.PRNGKey(0))
    want, _ = full.pure_fn(inputs if kw.get("masked") else x, weights, state, jax.random.PRNGKey(1))
    decoder = LEAPSelfAttention(mode="predict", n_parallel_heads=config.get("n_parallel_heads"), **kw)
    sliced = lambda lo, hi: tuple(a[:, lo:hi] for a in inputs) if kw.get("masked") else x[:, lo:hi]
    _, state = decoder.init(shapes.signature(sliced(0, 1)))
    call = jax.jit(decoder.pure_fn)
    outs = []
    for lo, hi in [(0, 3)] + [(t, t + 1) for t in range(3, 8)]:
        out, state = call(sliced(lo, hi), weights, state, jax.random.PRNGKey(1))
        outs.append(out)
    np.testing.assert_allclose(jnp.concatenate(outs, 1), want, atol=2e-5, rtol=1e-4)
    assert not np.allclose(want[:, 1:], 0.0, atol=1e-3)
    positions = np.asarray(state[-1])
    np.testing.assert_array_equal(positions, 8)  # every (example, head) state has seen 8 tokens
    with pytest.raises(Exception, match="batch"):
        decoder.pure_fn(sliced(0, 1)[:1] if not kw.get("masked") else tuple(a[:1] for a in sliced(0, 1)),
                        weights, state, jax.random.PRNGKey(1))


def test_layer_trains_inside_a_small_language_model():
    """Two LEAP blocks (with rotary) learn to continue a random period-4 pattern: loss falls."""
    from labkit.layers import LEAPSelfAttention

    make = lambda: LEAPSelfAttention(n_heads=2, d_qk=16, d_v=16, causal=True, position_embedding="rotary")
    losses = train_recall_lm(make, seq=16, steps=40)
    assert np.isfinite(losses).all()
    # 40 steps: from ~3.1 to ~2.2, below log(16) = 2.77 (uniform guessing), so it recalls the pattern somewhat.
    assert np.mean(losses[-5:]) < min(0.8 * np.mean(losses[:3]), np.log(VOCAB)), losses
