"""Kernel attention: FAVOR+ random features and the full `KernelAttention` option set, in O(n) time and memory.

Papers: Choromanski et al. 2021, "Rethinking attention with Performers" (FAVOR+: positive orthogonal random
features, `exp` and `relu`); Likhosherstov et al. 2022, "Chefs' random tables: non-trigonometric random
features" (FAVOR++, `expplus`); Katharopoulos et al. 2020, "Transformers are RNNs" (`elu`). The options and
their meaning follow TensorFlow Model Garden's `tfm.nlp.layers.KernelAttention`.

Idea: the softmax kernel is an expectation over Gaussian projections `w ~ N(0, I_d)`,

    exp(q . k) = E_w[ exp(w . q - |q|^2 / 2) exp(w . k - |k|^2 / 2) ],

so with `m` projections `W [M, H]` the features `phi(x) = exp(W x - |x|^2 / 2) / sqrt(m)` are positive and
`phi(q) . phi(k)` is an unbiased estimate of `exp(q . k)`. Orthogonal rows (blocks of `d` orthonormal
directions with chi(d)-distributed lengths) keep each row Gaussian, hence unbiasedness, and lower the
variance. Attention then becomes linear attention on the features (lab 04's `linear_attention` with the
identity map): `out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j) + eps)`. The scale is
split as `sqrt(scale)` on both queries and keys (as in Model Garden), so the estimated kernel is
`exp(scale q . k)`.

Feature transforms (`feature_transform`, applied to `W x / ...` when `num_random_features > 0`, else to
`x` itself): `exp` (FAVOR+), `expmod` (exp with a constant instead of `exp(-|x|^2/2)`: not unbiased),
`expplus` (FAVOR++, data-dependent coefficients, unbiased, lower variance), `relu` (`relu + 1e-3`), `elu`
(`elu + 1`), `square`, `identity`/None. Causal forms: `is_causal=True` sums over the whole prefix with lab 04's
prefix-sum or chunkwise scan; `causal_window_length=W` is Model Garden's windowed causal variant: the
sequence is cut into chunks of `causal_chunk_length`, tokens attend bidirectionally inside their chunk and to
the `W - 1` previous chunks, older chunks optionally decayed by `causal_window_decay ** distance`.

Streaming (decoding): `init_kernel_cache` + `kernel_attention_step` carry the causal form's running sums
`sum_j phi(k_j) [v_j, 1]` (`KernelCache`: one `[M, Hv + 1]` sum per head, or the W - 1 previous chunks' sums
for the windowed form), so each new token costs O(M Hv) whatever the prefix; `generate` decodes with
`labkit.attention.decoding.decode`. Step by step it equals `kernel_attention(..., is_causal=True)` (exp transforms: up to `eps`'s
share, see `kernel_attention_step`).

Model Garden's names -> labkit's: `call(query, value, key=None, attention_mask=None, cache=None,
training=False)` -> `kernel_cross_attention(query, value, key=None, attention_mask=None, **options)` (the
same order, `key=None` meaning `key = value`) or `kernel_attention(query, key, value, mask=...)`;
`attention_mask [B, S]` -> `mask [B, 1, 1, S]` (True = attend); `cache` -> `kernel_attention_step(cache, ...)`;
`training` + `redraw` -> a new `prng_key` per call; `seed` -> `prng_key=PRNGKey(seed)`; the constructor's
options keep their names (`is_short_seq`, `begin_kernel`, `causal_*`; `use_causal_windowed=True` is
`causal_window_length` given with `is_causal=True`). Arrays are per head, `[B, T, N, H]`: the layer's input
and output projections live in `labkit.layers.KernelSelfAttention`.

Cost per head with `m` features: features O(T M H); non-causal and chunkwise causal O(T M Hv) time and
O(T M + M Hv) memory (prefix-sum causal: O(T M Hv) memory; windowed: O(T/C M Hv)). `is_short_seq` and
`begin_kernel` build a `[T, S]` matrix: O(T S) memory, as dense attention.

Differences from Model Garden's KernelAttention (deliberate, each a bug or a numerical choice there):
- `exp`: the stabilising shift is computed on the whole exponent `w . x - |x|^2/2` (per row for queries,
  one shift per example and head for keys) instead of `exp(-|x|^2/2) * exp(w . x - max)`, which underflows
  to 0/0 for large `|x|`; the shifts cancel in the normalisation either way.
- `expplus`: no extra `d^(-1/4)` data normaliser on top of `sqrt(scale)` (Model Garden applies both, so its
  FAVOR++ estimates `exp(scale q . k / sqrt(d))`, a different kernel than its `exp`); the statistics use each
  side's own length.
- `is_short_seq`: hidden keys are removed before the softmax (Model Garden multiplies their features by 0,
  which still gives them weight `exp(0)`). The softmax runs over the feature scores `phi(q) . phi(k)`, as
  there; with `feature_transform=None, num_random_features=0` this is exact softmax attention.
- `begin_kernel`: queries before it get exact softmax attention (Model Garden feeds them through the random
  projection when `num_random_features > 0`).
- `causal_padding="left"`: the padded positions are dropped from the front (Model Garden slices the first
  `T` rows, which returns padded rows and drops real ones). `causal_padding=None` needs a length that the chunk
  divides, as there (ValueError otherwise).
- Plain causal attention (`is_causal=True` without a window) is not in Model Garden; it is lab 04's.
- Streaming: Model Garden's cache exists only for the windowed form and decays the whole history
  (`kv = decay kv + new`; it keeps no queue of chunks to drop), so its streaming outputs differ from its own
  windowed form; its exp shift is recomputed per call, so cached sums carry different shifts. Here the
  cache keeps the W - 1 previous chunks (the same window as the parallel form) and one running shift.

Differences from Trax's `tl.Favor` / `tl.CausalFavor` (`trax.layers.research.sparsity`): their default
(`use_approximate_softmax=False`, the only option of `CausalFavor`) is the deterministic map `relu(x) + 1e-3`
without scale and without projection, i.e. `feature_transform="relu", num_random_features=0, scale=1.0` here
(identical up to our `eps=1e-6` in the denominator). `tl.FavorAttention(use_approximate_softmax=True,
normalize_data=True)` uses FAVOR+ features like `exp`, but adds `1e-4` to every feature (a small bias),
shifts queries by their row maximum of `w . x` only, and draws its projection from Trax's fixed PRNG(0).
"""

from __future__ import annotations

import math
from typing import Callable, NamedTuple, Optional

import jax
import jax.numpy as jnp

from labkit.attention._validate import check_qkv, default_scale, key_padding_mask, reject_bias
from labkit.attention.decoding import decode
from labkit.attention.dense import dot_product_attention
from labkit.attention.linear import linear_attention

FEATURE_TRANSFORMS = ("exp", "expmod", "expplus", "relu", "elu", "square", "identity")
_RELU_EPS = 1e-3  # Model Garden's (and Trax's) offset: keeps relu features away from all-zero rows
_EXPPLUS_EPS = 1e-6  # Model Garden's numerical stabiliser inside FAVOR++ features


# ---------------------------------------------------------------- random projections

def random_projection(prng_key, num_features: int, dim: int, *, orthogonal: bool = True) -> jnp.ndarray:
    """`[num_features, dim]` Gaussian projection rows; `orthogonal`: blocks of `dim` orthogonal rows (FAVOR+).

    Orthogonal rows are drawn block by block (QR of a Gaussian `[dim, dim]`), then rescaled to the lengths of
    independent Gaussian vectors (chi(dim)), so each row is still exactly `N(0, I)`: estimates stay unbiased.
    """
    if not isinstance(num_features, int) or num_features < 1:
        raise ValueError(f"num_features must be a positive int, got {num_features!r}")
    block_key, norm_key = jax.random.split(prng_key)
    if not orthogonal:
        return jax.random.normal(block_key, (num_features, dim), jnp.float32)
    n_blocks = -(-num_features // dim)
    gauss = jax.random.normal(block_key, (n_blocks, dim, dim), jnp.float32)
    q, r = jnp.linalg.qr(gauss)
    # QR's sign convention biases the directions (e.g. Householder: first entries always <= 0); fixing the
    # signs of R's diagonal makes Q Haar-distributed, so every row direction is uniform on the sphere.
    q = q * jnp.sign(jnp.diagonal(r, axis1=-2, axis2=-1))[..., None, :]
    directions = jnp.swapaxes(q, -1, -2).reshape(n_blocks * dim, dim)[:num_features]
    lengths = jnp.linalg.norm(jax.random.normal(norm_key, (num_features, dim), jnp.float32), axis=-1)
    return directions * lengths[:, None]


def positive_random_features(x, projection) -> jnp.ndarray:
    """FAVOR+ features `exp(W x - |x|^2/2) / sqrt(m)`, no shift: `[..., H]`, `[M, H]` -> `[..., M]`.

    `E[phi(q) . phi(k)] = exp(q . k)`: the unbiased estimator itself (it overflows for large `|x|`; the
    attention code shifts the exponent first).
    """
    x = jnp.asarray(x, jnp.float32)
    z = jnp.einsum("...d,md->...m", x, projection)
    return jnp.exp(z - 0.5 * jnp.sum(x * x, -1, keepdims=True)) / math.sqrt(projection.shape[0])


# ---------------------------------------------------------------- feature transforms

def _shift(z: jnp.ndarray, is_query: bool) -> jnp.ndarray:
    """Stabilising shift of an exponent `[batch..., L, N, M]`: per query row, or one per (example, head) for
    keys (a key shift must be shared by all keys to cancel; hidden keys hold -inf, and 0 stands in when all
    are hidden). Stop-gradient: it cancels in the output."""
    if is_query:
        return jax.lax.stop_gradient(jnp.max(z, axis=-1, keepdims=True))
    shift = jnp.max(z, axis=(-3, -1), keepdims=True)
    return jax.lax.stop_gradient(jnp.where(jnp.isfinite(shift), shift, 0.0))


def _expplus_features(x, other, projection, is_query: bool) -> jnp.ndarray:
    """FAVOR++ (Chefs' random tables): `D exp(B w . x - |x|^2/2 + A |w|^2) / sqrt(m)` with data-dependent
    `A < 1/4`, `B = sqrt(1 - 4A)`, `D = (1 - 4A)^(d/4)`: unbiased for `exp(x . y)`, minimal variance for the
    data's statistics. `x`, `other`: `[batch..., L, N, H]` (queries and keys, either order)."""
    dim = x.shape[-1]
    lx, ly = x.shape[-3], other.shape[-3]
    sq_x = jnp.sum(x * x, axis=(-3, -1), keepdims=True) / lx
    sq_y = jnp.sum(other * other, axis=(-3, -1), keepdims=True) / ly
    prod = jnp.sum(jnp.sum(x, -3, keepdims=True) * jnp.sum(other, -3, keepdims=True), -1, keepdims=True)
    ave = sq_x + sq_y + prod * 2.0 / (lx * ly)
    a = (jnp.sqrt((2 * ave + dim) ** 2 + 8 * dim * ave) - 2 * ave - dim) / (4 * ave)
    a = jax.lax.stop_gradient((1.0 - 1.0 / a) / 8.0)
    b = jnp.sqrt(1.0 - 4.0 * a)
    log_d = dim / 4.0 * jnp.log(1.0 - 4.0 * a)
    z = b * jnp.einsum("...d,md->...m", x, projection)
    exponent = z - 0.5 * jnp.sum(x * x, -1, keepdims=True) + a * jnp.sum(projection ** 2, -1)
    feats = jnp.exp(exponent - _shift(z, is_query)) + _EXPPLUS_EPS
    return jnp.exp(log_d) * feats / math.sqrt(projection.shape[0])


def _project(x, projection) -> tuple[jnp.ndarray, float]:
    """`(W x [..., M], sqrt(m))`, or `(x, 1)` without a projection."""
    if projection is None:
        return x, 1.0
    return jnp.einsum("...d,md->...m", x, projection), math.sqrt(projection.shape[0])


def _exponent(x, projection, name: str) -> tuple[jnp.ndarray, float]:
    """The exponent of the `exp`/`expmod` features `[..., M]` before any shift, and their normaliser `sqrt(m)`."""
    z, norm = _project(x, projection)
    return (z - 0.5 * jnp.sum(x * x, -1, keepdims=True) if name == "exp" else z), norm


def kernel_features(x, projection: Optional[jnp.ndarray], feature_transform: Optional[str], *,
                    is_query: bool, other=None, key_shift=None, key_keep=None) -> jnp.ndarray:
    """Features of (already scaled) `x [batch..., L, N, H]` -> `[batch..., L, N, M]` (`m = d` without projection).

    `other` (the keys for queries and vice versa) is needed by `expplus` only. Exponential transforms are
    shifted for stability: query rows by their own maximum, keys by one constant per example and head, the
    maximum over the kept keys (`key_shift [batch..., 1, N, 1]` when given: the streaming cache's running one).
    `key_keep [batch..., L, N, 1]` (bool, keys only): hidden keys get zero features and no say in the shift.
    """
    name = "identity" if feature_transform is None else feature_transform
    if name not in FEATURE_TRANSFORMS:
        raise ValueError(f"feature_transform must be one of {FEATURE_TRANSFORMS} or None, got {feature_transform!r}")
    x = jnp.asarray(x, jnp.float32)
    if name in ("exp", "expmod"):
        exponent, norm = _exponent(x, projection, name)
        if key_keep is not None:  # -inf: exactly zero features, whatever a hidden key holds (no inf * 0)
            exponent = jnp.where(key_keep, exponent, -jnp.inf)
        shift = _shift(exponent, is_query) if key_shift is None else key_shift
        # expmod: exp(-sqrt(d)/2) replaces exp(-|x|^2/2); a constant, it cancels in the normalisation
        const = 1.0 if name == "exp" else math.exp(-0.5 * math.sqrt(x.shape[-1]))
        return jnp.exp(exponent - shift) * const / norm
    features = _plain_features(x, other, projection, name, is_query)
    return features if key_keep is None else features * key_keep


def _plain_features(x, other, projection, name: str, is_query: bool) -> jnp.ndarray:
    """The transforms without a shift: `expplus`, `relu`, `elu`, `square`, `identity`."""
    if name == "expplus":
        if projection is None:  # Model Garden: nothing to randomise, the data passes through
            return x
        return _expplus_features(x, jnp.asarray(other, jnp.float32), projection, is_query)
    z, norm = _project(x, projection)
    if name == "relu":
        return (jax.nn.relu(z) + _RELU_EPS) / norm
    if name == "elu":
        return (jax.nn.elu(z) + 1.0) / norm
    if name == "square":
        return jnp.square(z) / norm
    return z / norm


# ---------------------------------------------------------------- windowed causal form

def _pad_seq(x: jnp.ndarray, before: int, after: int) -> jnp.ndarray:
    """Pad axis -3 (the sequence) of `[batch..., L, N, *]` with zeros."""
    return jnp.pad(x, [(0, 0)] * (x.ndim - 3) + [(before, after), (0, 0), (0, 0)])


def windowed_causal_linear(phi_q, phi_k, value, *, chunk_length: int = 1, window_length: int = 3,
                           window_decay: Optional[float] = None, padding: Optional[str] = None,
                           eps: float = 1e-6) -> jnp.ndarray:
    """Model Garden's windowed causal kernel attention on features: `[batch..., T, N, M]` x2, `[batch..., T, N, Hv]`.

    Chunks of `chunk_length` tokens attend bidirectionally inside the chunk and to the `window_length - 1`
    previous chunks; chunk `c - i` is weighted `window_decay ** i` (1 when None). `padding` "left"/"right"
    pads the length to a multiple of the chunk with zero features; None requires a length the chunk divides.
    """
    if not isinstance(chunk_length, int) or chunk_length < 1:
        raise ValueError(f"causal_chunk_length must be a positive int, got {chunk_length!r}")
    if not isinstance(window_length, int) or window_length < 1:
        raise ValueError(f"causal_window_length must be a positive int, got {window_length!r}")
    if padding not in (None, "left", "right"):
        raise ValueError(f"causal_padding must be None, 'left' or 'right', got {padding!r}")
    t = phi_q.shape[-3]
    pad = -t % chunk_length
    if pad and padding is None:
        raise ValueError(f"sequence length {t} is not a multiple of causal_chunk_length={chunk_length}; "
                         "pass causal_padding='right' or 'left'")
    before, after = (pad, 0) if padding == "left" else (0, pad)
    q, k, v = (_pad_seq(a, before, after) for a in (phi_q, phi_k, value))
    n_chunks = (t + pad) // chunk_length

    def chunks(a):  # [batch..., T, N, x] -> [batch..., n_chunks, C, N, x]
        return a.reshape(a.shape[:-3] + (n_chunks, chunk_length) + a.shape[-2:])

    qc, kc, vc = chunks(q), chunks(k), chunks(v)
    v1 = jnp.concatenate([vc, jnp.ones(vc.shape[:-1] + (1,), vc.dtype)], -1)  # ones column: the normaliser
    kv = jnp.einsum("...cnm,...cnv->...nmv", kc, v1)  # per chunk: [batch..., n_chunks, N, m, dv + 1]
    decay = 1.0 if window_decay is None else float(window_decay)
    # Window sum as a linear recurrence over chunks: s_c = decay s_{c-1} + kv_c - decay^W kv_{c-W}.
    axis = kv.ndim - 4
    leaving = jnp.pad(kv, [(0, 0)] * axis + [(window_length, 0), (0, 0), (0, 0), (0, 0)])
    leaving = jax.lax.slice_in_dim(leaving, 0, n_chunks, axis=axis)
    incoming = kv - decay ** window_length * leaving

    def combine(left, right):
        return left[0] * right[0], right[0] * left[1] + right[1]

    gains = jnp.full((n_chunks,) + (1,) * (kv.ndim - axis - 1), decay, kv.dtype)
    gains = jnp.broadcast_to(gains, kv.shape[:axis] + gains.shape)
    _, window = jax.lax.associative_scan(combine, (gains, incoming), axis=axis)
    summed = jnp.einsum("...cnm,...nmv->...cnv", qc, window)
    out = summed[..., :-1] / (summed[..., -1:] + eps)
    out = out.reshape(out.shape[:-4] + (n_chunks * chunk_length,) + out.shape[-2:])
    return jax.lax.slice_in_dim(out, before, before + t, axis=out.ndim - 3)


def causal_window_weights(seq_len: int, *, chunk_length: int = 1, window_length: int = 3,
                          window_decay: Optional[float] = None, padding: Optional[str] = None) -> jnp.ndarray:
    """`[T, T]` weight of key j in query i's sums for the windowed causal form (0 = not attended); for plots."""
    pad = -seq_len % chunk_length
    if pad and padding is None:
        raise ValueError(f"sequence length {seq_len} is not a multiple of causal_chunk_length={chunk_length}")
    pos = jnp.arange(seq_len) + (pad if padding == "left" else 0)
    dist = pos[:, None] // chunk_length - pos[None, :] // chunk_length
    decay = 1.0 if window_decay is None else float(window_decay)
    inside = (dist >= 0) & (dist < window_length)
    return jnp.where(inside, decay ** jnp.clip(dist, 0, None).astype(jnp.float32), 0.0)


# ---------------------------------------------------------------- the attention function

def kernel_attention(query, key, value, bias=None, mask=None, *, is_causal: bool = False,
                     scale: Optional[float] = None, feature_transform: Optional[str] = "exp",
                     num_random_features: int = 256, prng_key=None, projection=None, is_short_seq: bool = False,
                     begin_kernel: int = 0, scale_by_length: bool = False,
                     causal_chunk_length: Optional[int] = None, causal_window_length: Optional[int] = None,
                     causal_window_decay: Optional[float] = None, causal_padding: Optional[str] = None,
                     eps: float = 1e-6) -> jnp.ndarray:
    """Kernel (FAVOR+ and friends) attention `[batch..., T, N, Hv]` from `[batch..., T, N, H]`, `[batch..., S, N, H]`, `[batch..., S, N, Hv]`.

    Args:
      query, key, value: as `jax.nn.dot_product_attention`.
      bias: must be None (the factorised sums never form the scores it would be added to).
      mask: boolean key mask broadcastable to `[batch..., N, 1, S]` (True = may attend).
      is_causal: query i sees keys j <= i (T == S). With `causal_window_length`, the windowed causal form.
      scale: default `1/sqrt(H)`; split as `sqrt(scale)` on queries and keys (the whole scale on the queries
        for `is_short_seq` and `begin_kernel`).
      feature_transform: one of `FEATURE_TRANSFORMS` or None (= identity).
      num_random_features: `M` projections; `<= 0`: the transform acts on the vectors themselves.
      prng_key: the key the `[M, H]` projection is drawn from (default `PRNGKey(0)`, Model Garden's `seed=0`):
        the same key gives the same projection. Model Garden's `redraw` in training is a new key per call
        (what `labkit.layers.KernelSelfAttention(redraw=True)` passes in mode 'train').
      projection: an explicit `[M, H]` projection, overriding `prng_key`/`num_random_features`.
      is_short_seq: build the `[T, S]` matrix: softmax over the feature scores `phi(q) . phi(k)`.
      begin_kernel: the first `begin_kernel` queries get exact softmax attention, the rest kernel attention.
      scale_by_length: multiply the scale by `log(n) / log(512)`, `n` the number of visible keys (entropy-stable
        scaling, https://kexue.fm/archives/8823).
      causal_chunk_length: plain causal: lab 04's chunk size (None = prefix sums; same result, less memory);
        windowed causal: tokens per chunk (default 1).
      causal_window_length: None: plain causal over the whole prefix; an int W: windowed causal, W chunks.
      causal_window_decay: windowed only: weight `decay ** i` for the chunk i chunks back.
      causal_padding: windowed only: "right"/"left" pads to a multiple of the chunk; None requires one.
      eps: added to every denominator.

    Returns:
      `[batch..., T, N, Hv]` in `value`'s dtype, computed in float32.
    """
    query, key, value = check_qkv(query, key, value)
    reject_bias(bias, "kernel attention")
    _check_forms(query.shape, key.shape, is_causal=is_causal, windowed=causal_window_length is not None,
                 is_short_seq=is_short_seq, begin_kernel=begin_kernel)
    keep = key_padding_mask(mask, key.shape, "kernel attention")
    projection = _projection(projection, num_random_features, prng_key, query.shape[-1])
    scale = _scale(scale, query.shape[-1], keep, key.shape[-3], scale_by_length)
    q32, k32, v32 = (a.astype(jnp.float32) for a in (query, key, value))
    if is_short_seq:
        phi_q = kernel_features(q32 * scale, projection, feature_transform, is_query=True, other=k32)
        phi_k = kernel_features(k32, projection, feature_transform, is_query=False, other=q32 * scale)
        out = dot_product_attention(phi_q, phi_k, v32, mask=keep, is_causal=is_causal, scale=1.0)
    else:
        root = jnp.sqrt(scale)
        qs, ks = q32 * root, k32 * root
        phi_q = kernel_features(qs, projection, feature_transform, is_query=True, other=ks)
        phi_k = kernel_features(ks, projection, feature_transform, is_query=False, other=qs,
                                key_keep=None if keep is None else jnp.swapaxes(keep[..., 0, :], -1, -2)[..., None])
        if causal_window_length is not None:
            out = windowed_causal_linear(phi_q, phi_k, v32, chunk_length=causal_chunk_length or 1,
                                         window_length=causal_window_length, window_decay=causal_window_decay,
                                         padding=causal_padding, eps=eps)
        else:
            out = linear_attention(phi_q, phi_k, v32, is_causal=is_causal, scale=1.0,
                                   feature_map="identity", chunk_size=causal_chunk_length, eps=eps)
    if begin_kernel > 0:
        n_soft = min(begin_kernel, query.shape[-3])
        soft = dot_product_attention(q32[..., :n_soft, :, :] * scale, k32, v32, scale=1.0,
                                     mask=_causal_prefix_mask(keep, n_soft, key.shape[-3], is_causal))
        out = jnp.concatenate([soft, out[..., n_soft:, :, :]], axis=-3)
    return out.astype(value.dtype)


def _check_forms(query_shape: tuple, key_shape: tuple, *, is_causal: bool, windowed: bool, is_short_seq: bool,
                 begin_kernel) -> None:
    """ValueErrors for option combinations that have no meaning."""
    if is_causal and query_shape[-3] != key_shape[-3]:
        raise ValueError(f"is_causal=True needs as many queries as keys; got query {query_shape}, key {key_shape}")
    if windowed and not is_causal:
        raise ValueError("causal_window_length selects the windowed causal form: pass is_causal=True too")
    if windowed and is_short_seq:
        raise ValueError("the windowed causal form and is_short_seq are mutually exclusive")
    if not isinstance(begin_kernel, int) or begin_kernel < 0:
        raise ValueError(f"begin_kernel must be a non-negative int, got {begin_kernel!r}")


def _projection(projection, num_random_features: int, prng_key, head_dim: int) -> Optional[jnp.ndarray]:
    """The explicit projection `[M, H]` (checked), else one drawn from `prng_key`, else None (no features)."""
    if projection is not None:
        projection = jnp.asarray(projection, jnp.float32)
        if projection.ndim != 2 or projection.shape[-1] != head_dim:
            raise ValueError(f"projection must be [M, {head_dim}] for head dim {head_dim}, got {projection.shape}")
        return projection
    if num_random_features <= 0:
        return None
    return random_projection(jax.random.PRNGKey(0) if prng_key is None else prng_key, num_random_features, head_dim)


def _scale(scale, head_dim: int, keep, kv_len: int, scale_by_length: bool):
    """The logit scale: a scalar, or `[batch..., 1, N, 1]` when scaled by each head's visible key count."""
    scale = jnp.float32(default_scale(scale, head_dim))
    if not scale_by_length:
        return scale
    visible = jnp.float32(kv_len) if keep is None else jnp.sum(keep, axis=-1, dtype=jnp.float32)  # [batch.., N, 1]
    scale = scale * jnp.log(visible) / math.log(512.0)
    return scale if keep is None else jnp.swapaxes(scale, -1, -2)[..., None]


def _causal_prefix_mask(keep, n_rows: int, s: int, is_causal: bool):
    """Mask `[batch..., N, n_rows, S]` for the softmax rows of `begin_kernel` (key mask and causality)."""
    if not is_causal:
        return keep
    tri = jnp.tril(jnp.ones((n_rows, s), bool))
    return tri if keep is None else jnp.logical_and(keep, tri)



# ---------------------------------------------------------------- streaming: the cache and one step

class KernelCache(NamedTuple):
    """What causal kernel attention keeps of the past, in feature space: O(C N M Hv) numbers at any length.

    kv: `[batch..., C, N, M, Hv + 1]`, sums `sum_j phi(k_j) [v_j, 1]` (last column: the normaliser's
      `sum_j phi(k_j)`). Plain causal: C = 1, one sum over the whole prefix. Windowed: C = W - 1, the sums of
      the W - 1 previous chunks, oldest first (none for W = 1).
    shift: `[batch..., N]`, the exponent subtracted from every key feature in `kv` (`exp`, `expmod`): the
      running maximum, -inf before the first key; the sums are rescaled when it grows. Unused otherwise.
    """

    kv: jnp.ndarray
    shift: jnp.ndarray


def init_kernel_cache(batch_shape: tuple, num_heads: int, head_dim: int, value_dim: int, *,
                      num_random_features: int = 256, projection=None,
                      causal_window_length: Optional[int] = None) -> KernelCache:
    """The empty cache for `kernel_attention_step`, for the same options `kernel_attention` is called with."""
    if projection is not None:
        num_features = jnp.shape(projection)[0]
    else:
        num_features = num_random_features if num_random_features > 0 else head_dim
    if causal_window_length is not None and (not isinstance(causal_window_length, int) or causal_window_length < 1):
        raise ValueError(f"causal_window_length must be a positive int, got {causal_window_length!r}")
    slots = 1 if causal_window_length is None else causal_window_length - 1
    batch_shape = tuple(batch_shape)
    return KernelCache(jnp.zeros(batch_shape + (slots, num_heads, num_features, value_dim + 1), jnp.float32),
                       jnp.full(batch_shape + (num_heads,), -jnp.inf, jnp.float32))


def check_streamable(feature_transform: Optional[str], *, is_short_seq: bool = False, begin_kernel: int = 0,
                     scale_by_length: bool = False) -> None:
    """ValueError for options whose causal form needs more than a constant-size feature-space cache."""
    if feature_transform == "expplus":
        raise ValueError("feature_transform='expplus' has no streaming form: its coefficients are statistics of "
                         "all queries and keys, later ones included (as in Model Garden); use 'exp'")
    if is_short_seq:
        raise ValueError("is_short_seq softmaxes over every past key: it needs all keys (a KV cache), not "
                         "kernel attention's cache")
    if begin_kernel:
        raise ValueError("begin_kernel gives its first queries exact softmax attention over every past key: no "
                         "streaming form (Model Garden refuses a cache with begin_kernel too)")
    if scale_by_length:
        raise ValueError("scale_by_length scales by the length of the whole sequence, unknown while streaming")


def kernel_attention_step(cache: KernelCache, query, key, value, mask=None, *, scale: Optional[float] = None,
                          feature_transform: Optional[str] = "exp", num_random_features: int = 256, prng_key=None,
                          projection=None, causal_chunk_length: Optional[int] = None,
                          causal_window_length: Optional[int] = None, causal_window_decay: Optional[float] = None,
                          eps: float = 1e-6) -> tuple[KernelCache, jnp.ndarray]:
    """`L` new positions `[batch..., L, N, H]` x2, `[batch..., L, N, Hv]` -> `(cache, out [batch..., L, N, Hv])`.

    Causal kernel attention continued from `cache` (`init_kernel_cache`): the same outputs as
    `kernel_attention(..., is_causal=True)` on the whole sequence with the same options (and `prng_key`).
    Plain causal: any `L` (1 to decode, a prompt to prefill); O(L M Hv + L^2 M) work. Windowed
    (`causal_window_length`): a token sees the later tokens of its chunk, so calls bring whole chunks (`L` a
    multiple of `causal_chunk_length`, default 1); `mask` False marks padding (`causal_padding`'s zero features:
    mask the front of the first chunk for "left", the end of the last for "right"). `mask` broadcasts to
    `[batch..., N, 1, L]`. The exp shift is the running maximum (the parallel form's: the whole sequence's),
    and `eps` is added after it: with `eps=0` the two forms agree to rounding, with `eps` up to its share.
    Pass `projection=random_projection(key, M, H)` to skip redrawing it at each step. Refused: `expplus`,
    `is_short_seq`, `begin_kernel`, `scale_by_length` (`check_streamable`: no constant-size cache exists).
    """
    query, key, value = check_qkv(query, key, value)
    check_streamable(feature_transform)
    length, chunk = query.shape[-3], causal_chunk_length or 1
    if key.shape[-3] != length:
        raise ValueError(f"a step takes as many new keys as queries; got query {query.shape}, key {key.shape}")
    if causal_window_length is not None and length % chunk:
        raise ValueError(f"the windowed form streams whole chunks: {length} new positions is not a multiple of "
                         f"causal_chunk_length={chunk} (mask the padding instead)")
    keep = key_padding_mask(mask, key.shape, "kernel_attention_step")
    projection = _projection(projection, num_random_features, prng_key, query.shape[-1])
    _check_cache(cache, key.shape, value.shape, query.shape[-1] if projection is None else projection.shape[0],
                 causal_window_length)
    root = jnp.sqrt(jnp.float32(default_scale(scale, query.shape[-1])))
    qs, ks = query.astype(jnp.float32) * root, key.astype(jnp.float32) * root
    phi_q = kernel_features(qs, projection, feature_transform, is_query=True)
    keep = None if keep is None else jnp.swapaxes(keep[..., 0, :], -1, -2)[..., None]  # [batch..., L, N, 1]
    phi_k, cache = _streamed_key_features(cache, ks, keep, projection, feature_transform)
    v1 = jnp.concatenate([value.astype(jnp.float32), jnp.ones(value.shape[:-1] + (1,), jnp.float32)], -1)
    if causal_window_length is None:
        kv, summed = _causal_block(cache.kv[..., 0, :, :, :], phi_q, phi_k, v1)
        kv = kv[..., None, :, :, :]
    else:
        kv, summed = _windowed_chunks(cache.kv, phi_q, phi_k, v1, chunk, causal_window_decay)
    out = summed[..., :-1] / (summed[..., -1:] + eps)
    return KernelCache(kv, cache.shift), out.astype(value.dtype)


def _check_cache(cache: KernelCache, key_shape: tuple, value_shape: tuple, num_features: int,
                 window_length: Optional[int]) -> None:
    """ValueError unless `cache` was made by `init_kernel_cache` for these inputs and options."""
    slots = 1 if window_length is None else window_length - 1
    want = key_shape[:-3] + (slots, key_shape[-2], num_features, value_shape[-1] + 1)
    if tuple(cache.kv.shape) != want or tuple(cache.shift.shape) != key_shape[:-3] + (key_shape[-2],):
        raise ValueError(f"cache.kv {cache.kv.shape} / cache.shift {cache.shift.shape} do not fit these inputs: "
                         f"expected {want} / {key_shape[:-3] + (key_shape[-2],)} (init_kernel_cache with the same "
                         "num_random_features and causal_window_length)")


def _streamed_key_features(cache: KernelCache, ks, keep, projection, name) -> tuple[jnp.ndarray, KernelCache]:
    """Key features `[batch..., L, N, M]` on the cache's shift; for exp transforms the running maximum grows
    to cover the new kept keys and the stored sums are rescaled to it (as online softmax rescales its sums)."""
    if name not in ("exp", "expmod"):
        return kernel_features(ks, projection, name, is_query=False, key_keep=keep), cache
    exponent, _ = _exponent(ks, projection, name)
    if keep is not None:
        exponent = jnp.where(keep, exponent, -jnp.inf)
    shift = jnp.maximum(cache.shift, jax.lax.stop_gradient(jnp.max(exponent, axis=(-3, -1))))
    finite = jnp.where(jnp.isfinite(shift), shift, 0.0)  # -inf until a kept key arrives
    rescale = jnp.exp(cache.shift - finite)[..., None, :, None, None]
    features = kernel_features(ks, projection, name, is_query=False, key_shift=finite[..., None, :, None],
                               key_keep=keep)
    return features, KernelCache(cache.kv * rescale, shift)


def _causal_block(kv, phi_q, phi_k, v1) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Plain causal: the prefix sum `kv [batch..., N, M, Hv + 1]` read by `L` queries, plus the block's own
    causal part as a small `[L, L]` masked product; returns the new prefix sum and `[batch..., L, N, Hv + 1]`."""
    length = phi_q.shape[-3]
    scores = jnp.einsum("...lnm,...jnm->...nlj", phi_q, phi_k) * jnp.tril(jnp.ones((length, length), jnp.float32))
    summed = jnp.einsum("...lnm,...nmv->...lnv", phi_q, kv) + jnp.einsum("...nlj,...jnv->...lnv", scores, v1)
    return kv + jnp.einsum("...jnm,...jnv->...nmv", phi_k, v1), summed


def _windowed_chunks(kv, phi_q, phi_k, v1, chunk: int, decay: Optional[float]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Windowed causal, one chunk after the other (`lax.scan`): each chunk reads its own sum plus the stored
    `kv [batch..., W - 1, N, M, Hv + 1]` chunk sums, chunk `c - i` weighted `decay ** i`, then joins them."""
    decay = 1.0 if decay is None else float(decay)
    slots = kv.shape[-4]
    weights = (decay ** jnp.arange(slots, 0, -1, dtype=jnp.float32))[:, None, None, None]  # oldest slot first
    n_chunks = phi_q.shape[-3] // chunk

    def chunks(a):  # [batch..., n_chunks * C, N, x] -> [n_chunks, batch..., C, N, x]
        return jnp.moveaxis(a.reshape(a.shape[:-3] + (n_chunks, chunk) + a.shape[-2:]), -4, 0)

    def one(past, qkv):
        q, k, v = qkv
        own = jnp.einsum("...cnm,...cnv->...nmv", k, v)
        summed = jnp.einsum("...cnm,...nmv->...cnv", q, own + jnp.sum(past * weights, axis=-4))
        return jnp.concatenate([past, own[..., None, :, :, :]], axis=-4)[..., 1:, :, :, :], summed

    kv, summed = jax.lax.scan(one, kv, (chunks(phi_q), chunks(phi_k), chunks(v1)))
    summed = jnp.moveaxis(summed, 0, -4)
    return kv, summed.reshape(summed.shape[:-4] + (n_chunks * chunk,) + summed.shape[-2:])


def generate(project: Callable, readout: Callable, first_input, num_steps: int, cache: KernelCache, **options):
    """Decode token by token with `lax.scan` (`labkit.attention.decoding.decode`): memory does not grow.

    `project: x_t -> (query_t, key_t, value_t)`, each `[batch..., N, *]` (one token, no length axis);
    `readout: (x_t, out_t) -> x_{t+1}`; `options` as for `kernel_attention_step` (windowed: chunks of 1).
    Returns `(final_cache, inputs, outputs [num_steps, batch..., N, Hv])`, as `labkit.attention.linear.generate`.
    """
    def step(c, query_t, key_t, value_t):
        c, out = kernel_attention_step(c, query_t[..., None, :, :], key_t[..., None, :, :],
                                       value_t[..., None, :, :], **options)
        return c, out[..., 0, :, :]

    return decode(step, project, readout, first_input, num_steps, cache)


# ---------------------------------------------------------------- Model Garden's call form

def kernel_cross_attention(query, value, key=None, attention_mask=None, **options) -> jnp.ndarray:
    """Model Garden's `KernelAttention.call(query, value, key=None, attention_mask=None)` order, per head.

    `query [batch..., T, N, H]`, `value [batch..., S, N, Hv]`, `key [batch..., S, N, H]` (None: `key = value`,
    Model Garden's "most common case"; then H == Hv), `attention_mask [batch..., S]` (True or 1 = attend; keys
    only, as there). `options`: `kernel_attention`'s (`is_causal`, `feature_transform`, `prng_key`, ...).
    Returns `[batch..., T, N, Hv]`. T and S may differ (cross-attention) unless `is_causal`.
    """
    key = value if key is None else key
    mask = None if attention_mask is None else jnp.asarray(attention_mask).astype(bool)[..., None, None, :]
    return kernel_attention(query, key, value, None, mask, **options)
