"""Lab 05 exercises: FAVOR+ positive random features, FAVOR+ attention for one head, and the windowed causal form.

Projections are orthogonal Gaussian ones, built like `labkit.attention.kernel.random_projection` but in numpy
with fixed seeds; expected values come from `labkit.attention.kernel`. The written-out mistakes compute the same quantities with one step wrong."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from labkit.attention import kernel as ka
from labkit.grading.exercise import Case, Exercise, Mistake, hidden, register
from labkit.grading.harness import run_jitted
from labkit.grading.inputs import normal as _normal

EPS = 1e-6


@functools.lru_cache(maxsize=None)
def _orthogonal_projection(seed: int, m: int, d: int) -> np.ndarray:
    """`ka.random_projection`'s construction in numpy (blocks of `d` orthogonal rows, Gaussian lengths), so
    that building a case compiles nothing: a check cell answers in well under a second."""
    rng = np.random.default_rng(1000 + seed)
    n_blocks = -(-m // d)
    q, r = np.linalg.qr(rng.normal(size=(n_blocks, d, d)))
    q = q * np.sign(np.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
    directions = np.swapaxes(q, -1, -2).reshape(n_blocks * d, d)[:m]
    return (directions * np.linalg.norm(rng.normal(size=(m, d)), axis=-1)[:, None]).astype(np.float32)


# labkit's functions jitted once per shape: a check compiles one program per case, not one per operation.
_features = jax.jit(ka.positive_random_features)
_favor = jax.jit(functools.partial(ka.kernel_attention, feature_transform="exp", eps=EPS))
_windowed = jax.jit(functools.partial(ka.windowed_causal_linear, padding="right", eps=EPS),
                    static_argnames=("chunk_length", "window_length", "window_decay"))


def _projection(seed: int, m: int, d: int) -> np.ndarray:
    return _orthogonal_projection(seed, m, d).copy()  # a fresh array per call: a case's inputs are its own


# ---------------------------------------------------------------- 1. positive random features

def positive_features_reference(x, w):
    """`x [L, d]`, `w [m, d]` -> `exp(x w^T - |x|^2 / 2) / sqrt(m)`, `[L, m]`."""
    return _features(jnp.asarray(x), jnp.asarray(w))


def _features_with(x, w, *, norm_term=True, normalise=True, sign=1.0):
    x, w = jnp.asarray(x), jnp.asarray(w)
    z = sign * x @ w.T - (0.5 * jnp.sum(x * x, -1, keepdims=True) if norm_term else 0.0)
    return jnp.exp(z) / (jnp.sqrt(w.shape[0]) if normalise else 1.0)


def _features_case(name, seed, length, d, m, *, scale=0.5):
    return Case(name, lambda: ((_normal(seed, length, d, scale=scale), _projection(seed, m, d)), {}),
                atol=1e-6, rtol=1e-5)


register(Exercise(
    id="lab05.positive_features",
    run=run_jitted,
    description="FAVOR+ positive random features phi(x) = exp(W x - |x|^2/2) / sqrt(m): E[phi(q).phi(k)] = exp(q.k)",
    points=2,
    reference=positive_features_reference,
    cases=[
        _features_case("tiny: 3 vectors, dim 2, 4 features", 0, 3, 2, 4),
        _features_case("5 features for dim 4 (not a multiple)", 10, 6, 4, 5),
        _features_case("one vector", 20, 1, 3, 6),
        _features_case("longer vectors: |x| up to ~3", 30, 8, 8, 16, scale=1.0),
        _features_case("64 features, dim 16", 40, 20, 16, 64),
        hidden(_features_case("7 vectors, dim 5, 3 features (fewer than the dim)", 50, 7, 5, 3)),
    ],
    mistakes=[
        Mistake("missing -|x|^2/2", functools.partial(_features_with, norm_term=False),
                "your features miss the norm term: without it the product of two features estimates "
                "exp(|q + k|^2 / 2), not exp(q.k); the term |x|^2 / 2 belongs inside the exponent"),
        Mistake("missing 1/sqrt(m)", functools.partial(_features_with, normalise=False),
                "your features are sqrt(m) times too large: phi(q).phi(k) must be the average over the m "
                "projections, not their sum"),
    ],
    default_hint="each vector gets one feature per row w_r of the projection: exp(w_r . x - |x|^2 / 2) / sqrt(m). "
                 "Check the three parts (the projection of x, the norm term inside the exponent, the 1/sqrt(m) "
                 "outside) on one vector by hand",
    hints=("project all vectors at once with one matrix product against the transposed projection ([L, m]); the "
           "norm term is an [L, 1] column (sum of squares over the last axis, keepdims) subtracted before "
           "`jnp.exp`; then divide by the square root of the number of rows of w",
           "z = x @ w.T - 0.5 * jnp.sum(x * x, axis=-1, keepdims=True)\n"
           "return jnp.exp(z) / jnp.sqrt(w.shape[0])"),
    nan_hint="inf/NaN: the exponential overflowed; the norm term is subtracted inside the exponent, before "
             "exponentiating, not divided out afterwards",
    answered_by=("labkit.attention.kernel.positive_random_features", "labkit.attention.kernel.kernel_features"),
))


# ---------------------------------------------------------------- 2. FAVOR+ attention, one head

def favor_attention_reference(q, k, v, w):
    """One head, non-causal: `q [T, d]`, `k [S, d]`, `v [S, dv]`, projection `w [m, d]` -> `[T, dv]`.

    Both q and k are multiplied by `d ** -0.25` (the 1/sqrt(d) scale split in two), mapped with FAVOR+ features,
    then `out = phi(q) (phi(k)^T v) / (phi(q) . sum_j phi(k_j) + 1e-6)`."""
    return _favor(q[:, None], k[:, None], v[:, None], projection=w)[:, 0]


def _favor_with(q, k, v, w, *, q_power=0.25, k_power=0.25, normalise=True, shift=False):
    q, k, v, w = (jnp.asarray(a) for a in (q, k, v, w))
    d = q.shape[-1]

    def phi(x):
        z = x @ w.T - 0.5 * jnp.sum(x * x, -1, keepdims=True)
        if shift:
            z = z - jnp.max(z)
        return jnp.exp(z) / jnp.sqrt(w.shape[0])

    fq, fk = phi(q * d ** -q_power), phi(k * d ** -k_power)
    num = fq @ (fk.T @ v)
    return num / (fq @ fk.sum(0) + EPS)[:, None] if normalise else num


def _favor_case(name, seed, t, s, d, m, dv=None, *, scale=0.5):
    def inputs():
        return (_normal(seed, t, d, scale=scale), _normal(seed + 1, s, d, scale=scale), _normal(seed + 2, s, dv or d),
                _projection(seed, m, d)), {}
    return Case(name, inputs, atol=1e-4, rtol=1e-3)


register(Exercise(
    id="lab05.favor_attention",
    run=run_jitted,
    description="FAVOR+ attention for one head: split the scale, positive features, linear attention",
    points=3,
    reference=favor_attention_reference,
    cases=[
        _favor_case("tiny: seq 4, dim 2, 8 features", 0, 4, 4, 2, 8),
        _favor_case("3 queries, 7 keys, dim 4, value dim 5, 6 features", 10, 3, 7, 4, 6, 5),
        _favor_case("length 1", 20, 1, 1, 4, 8),
        _favor_case("seq 32, dim 8, 64 features", 30, 32, 32, 8, 64),
        _favor_case("longer vectors: |q|, |k| ~ 2, seq 6", 40, 6, 6, 4, 8, scale=1.0),
        hidden(_favor_case("5 queries, 9 keys, dim 3, value dim 2, 7 features", 50, 5, 9, 3, 7, 2)),
    ],
    mistakes=[
        Mistake("scale on the queries only", functools.partial(_favor_with, q_power=0.5, k_power=0.0, shift=True),
                "you put the whole 1/sqrt(d) scale on the queries: split it, d^(-1/4) on the queries AND d^(-1/4) "
                "on the keys (the estimate's variance depends on both norms, so both should be small)"),
        Mistake("no scale", functools.partial(_favor_with, q_power=0.0, k_power=0.0, shift=True),
                "your features estimate exp(q.k) without the 1/sqrt(d) of softmax attention: scale the queries "
                "and the keys by d^(-1/4) each"),
        Mistake("missing normaliser", functools.partial(_favor_with, normalise=False, shift=True),
                "your output is the numerator only: divide each row by its estimate of the softmax denominator "
                "(the query's features against the sum of the key features, + 1e-6)"),
    ],
    default_hint="FAVOR+ is lab 04's linear attention on random features: scale q and k by d^(-1/4) each, map "
                 "both with the positive features (shifted for stability: each query row by its own maximum, all "
                 "keys by one common maximum), then divide the numerator by the normaliser (+ 1e-6)",
    hints=("compute the exponents w . x - |x|^2 / 2 of the scaled queries and keys as in Exercise 5.1 (the "
           "1/sqrt(m) cancels, you may leave it out); subtract each query row's maximum (`jnp.max` over the "
           "last axis, keepdims) and the keys' overall maximum before `jnp.exp`; then the key summary (key "
           "features transposed times v), the sum of the key features, and one product with the query features "
           "for each",
           "d = q.shape[-1]\n"
           "qs, ks = q * d ** -0.25, k * d ** -0.25\n"
           "zq = qs @ w.T - 0.5 * jnp.sum(qs * qs, -1, keepdims=True)\n"
           "zk = ks @ w.T - 0.5 * jnp.sum(ks * ks, -1, keepdims=True)\n"
           "fq = jnp.exp(zq - jnp.max(zq, axis=-1, keepdims=True))\n"
           "fk = jnp.exp(zk - jnp.max(zk))\n"
           "return (fq @ (fk.T @ v)) / (fq @ fk.sum(0) + 1e-6)[:, None]"),
    answered_by=("labkit.attention.kernel.kernel_attention", "labkit.attention.kernel.kernel_features",
                 "labkit.layers.KernelSelfAttention"),
    nan_hint="exp() overflowed or every feature underflowed to 0: shift each exponent before exp() - query rows by "
             "their own maximum, keys all by one common maximum (the shifts cancel in the normalisation)",
))


# ---------------------------------------------------------------- 3. windowed causal form

def windowed_causal_reference(phi_q, phi_k, v, chunk_length, window_length, window_decay=None):
    """Features `phi_q, phi_k [T, m]`, `v [T, dv]` -> `[T, dv]`: chunks of `chunk_length` attend bidirectionally
    inside the chunk and to the `window_length - 1` previous chunks, chunk c - i weighted `window_decay ** i`;
    a length the chunk does not divide is padded on the right with zero features."""
    return _windowed(phi_q[:, None], phi_k[:, None], v[:, None], chunk_length=chunk_length,
                     window_length=window_length, window_decay=window_decay)[:, 0]


def _windowed_with(phi_q, phi_k, v, chunk_length, window_length, window_decay=None, *, token_causal=False,
                   extra_chunk=0, reverse_decay=False):
    t = phi_q.shape[0]
    chunk = np.arange(t) // chunk_length
    dist = chunk[:, None] - chunk[None, :]
    keep = (dist >= 0) & (dist < window_length + extra_chunk)
    if token_causal:
        keep &= np.tril(np.ones((t, t), bool))
    power = window_length - 1 - dist if reverse_decay else dist
    weights = np.where(keep, (1.0 if window_decay is None else window_decay) ** np.clip(power, 0, None), 0)
    a = (jnp.asarray(phi_q) @ jnp.asarray(phi_k).T) * weights
    return (a @ jnp.asarray(v)) / (a.sum(-1) + EPS)[:, None]


def _window_case(name, seed, t, m, chunk, window, decay=None):
    def inputs():
        phi_q = np.exp(_normal(seed, t, m, scale=0.5))
        phi_k = np.exp(_normal(seed + 1, t, m, scale=0.5))
        return (phi_q, phi_k, _normal(seed + 2, t, 3), chunk, window), {"window_decay": decay}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


register(Exercise(
    id="lab05.windowed_causal",
    run=run_jitted,
    description="windowed causal kernel attention: chunks attend inside themselves and to W - 1 earlier chunks",
    points=3,
    reference=windowed_causal_reference,
    cases=[
        _window_case("chunks of 1, window 3, seq 6", 0, 6, 4, 1, 3),
        _window_case("chunks of 3, window 2, seq 9 (the first matrix above the exercise)", 10, 9, 4, 3, 2),
        _window_case("chunks of 2, window 3, decay 0.5, seq 8", 20, 8, 4, 2, 3, 0.5),
        _window_case("seq 7, chunks of 3: pad on the right", 30, 7, 4, 3, 2, 0.8),
        _window_case("length 1", 40, 1, 4, 1, 3),
        _window_case("window longer than the sequence", 50, 10, 6, 2, 20),
        hidden(_window_case("seq 13, chunks of 3, window 3, decay 0.6: pad on the right", 60, 13, 5, 3, 3, 0.6)),
    ],
    mistakes=[
        Mistake("causal inside the chunk", functools.partial(_windowed_with, token_causal=True),
                "inside its own chunk a token sees every token, later ones included (bidirectional); causality "
                "holds between chunks only"),
        Mistake("window one chunk too long", functools.partial(_windowed_with, extra_chunk=1),
                "the window counts the current chunk: chunk c sees chunks c - W + 1 .. c (W chunks in all)"),
        Mistake("decay reversed", functools.partial(_windowed_with, reverse_decay=True),
                "the decay fades the past: the current chunk has weight 1 and chunk c - i gets window_decay ** i "
                "(the oldest chunk in the window the smallest weight)"),
    ],
    default_hint="the weight of key j for query i depends on their chunks only (chunk = position // chunk_length): "
                 "decay^(c_i - c_j) when 0 <= c_i - c_j < window_length, else 0, so inside a chunk every token "
                 "sees every other. Compare your weights with the small matrices above the exercise",
    hints=("build the [T, T] chunk distance c_i - c_j from the positions' chunk ids (`jnp.arange`, integer "
           "division, a column broadcast against a row), turn it into weights with `jnp.where`, multiply them "
           "into phi_q phi_k^T, then normalise each row as in linear attention (+ 1e-6); right padding leaves "
           "every chunk id unchanged, so this quadratic form needs no padding",
           "chunk = jnp.arange(phi_q.shape[0]) // chunk_length\n"
           "dist = chunk[:, None] - chunk[None, :]\n"
           "gamma = 1.0 if window_decay is None else window_decay\n"
           "weight = jnp.where((dist >= 0) & (dist < window_length), gamma ** jnp.maximum(dist, 0), 0.0)\n"
           "a = (phi_q @ phi_k.T) * weight\n"
           "return (a @ v) / (a.sum(-1) + 1e-6)[:, None]"),
    nan_hint="NaN/inf: a row with zero total weight (0/0) or an overflow; every query sees at least its own chunk, "
             "so check the window condition, and add 1e-6 to the denominator",
    answered_by=("labkit.attention.kernel.windowed_causal_linear", "labkit.attention.kernel.causal_window_weights",
                 "labkit.attention.kernel.kernel_attention"),
))
