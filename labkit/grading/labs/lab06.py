"""Lab 06 exercises: Linformer's projected attention, padding before projection, sharing-mode parameter counts."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from labkit.attention.linformer import linformer_attention, num_projection_params
from labkit.grading.exercise import Case, Exercise, Mistake, hidden, register
from labkit.grading.harness import run_jitted
from labkit.grading.inputs import normal as _normal


# ---------------------------------------------------------------- 1. projected attention for one head

def projected_attention_reference(q, k, v, e, f):
    """One head: q `[T, d]`, k `[n, d]`, v `[n, dv]`, E, F `[k, n]` -> `softmax(q (E k)^T / sqrt(d)) (F v)`."""
    return linformer_attention(q[:, None], k[:, None], v[:, None], e_proj=e, f_proj=f)[:, 0]


def _projected_with(q, k, v, e, f, *, feature_axis=False, scale=True, axis=-1, values_with_e=False):
    """Wrong projected attentions, one mistake at a time."""
    if feature_axis:  # mixes each key's features instead of positions (only runs when d == n == k)
        pk, pv = k @ e.T, v @ (e if values_with_e else f).T
    else:
        pk, pv = e @ k, (e if values_with_e else f) @ v
    scores = q @ pk.T / (np.sqrt(q.shape[-1]) if scale else 1.0)
    return jax.nn.softmax(scores, axis=axis) @ pv


def _proj_case(name, seed, t, n, k, d, dv=None, *, logit_scale=1.0, identity=False):
    def inputs():
        q = _normal(seed, t, d, scale=logit_scale)
        keys = _normal(seed + 1, n, d, scale=logit_scale)
        v = _normal(seed + 2, n, dv or d)
        if identity:
            e = f = np.eye(n, dtype=np.float32)
        else:
            e, f = _normal(seed + 3, k, n, scale=k ** -0.5), _normal(seed + 4, k, n, scale=k ** -0.5)
        return (q, keys, v, e, f), {}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


register(Exercise(
    id="lab06.projected_attention",
    description="Linformer attention for one head: project keys and values along the sequence axis with E, F",
    points=3,
    reference=projected_attention_reference,
    run=run_jitted,
    cases=[
        _proj_case("tiny: 3 queries, n = 6 keys projected to k = 2, dim 2", 0, 3, 6, 2, 2),
        _proj_case("square: n = k = d = 4 (the shapes cannot tell the axes apart)", 10, 5, 4, 4, 4),
        _proj_case("k = n with E = F = identity: exactly dense attention", 20, 6, 6, 6, 3, identity=True),
        _proj_case("n = 16 keys to k = 4, d = 8, value dim 5", 30, 16, 16, 4, 8, 5),
        _proj_case("large logits: scores up to ~1e3", 40, 8, 8, 4, 4, logit_scale=20.0),
        _proj_case("length 1: one query, one key, k = 1", 50, 1, 1, 1, 3),
        hidden(_proj_case("7 queries, n = 9 keys to k = 3, d = 5, value dim 2", 60, 7, 9, 3, 5, 2)),
    ],
    mistakes=[
        Mistake("projected the feature axis", functools.partial(_projected_with, feature_axis=True),
                "E and F are [k, n]: they mix the n positions of the keys and values, so they act along the "
                "sequence axis, from the left; yours mixes each key's features (which only has the right shape "
                "because d = n here)"),
        Mistake("values projected with E", functools.partial(_projected_with, values_with_e=True),
                "keys are projected with E, values with F (F v), unless the two are shared"),
        Mistake("missing scale", functools.partial(_projected_with, scale=False),
                "divide the scores by sqrt(d), the query/key dimension, before the softmax"),
        Mistake("softmax over queries", functools.partial(_projected_with, axis=0),
                "each query's weights over the k projected keys must sum to 1: normalise every row of the "
                "scores, not every column (over the queries)"),
    ],
    default_hint="E and F are [k, n]: they mix the n positions of the keys and values into k rows and leave the "
                 "features alone. Then every query attends to those k rows as in dense attention: scaled "
                 "scores, a softmax over each query's row, a weighted sum of the projected values",
    hints=("two steps. Project: E multiplies the keys from the left ([k, n] times [n, d] gives [k, d]), F the "
           "values. Attend: the queries against the projected keys, divided by the square root of q's last "
           "dimension, `jax.nn.softmax` over the last axis, then times the projected values",
           "pk, pv = e @ k, f @ v                       # [k, d], [k, d_v]\n"
           "scores = q @ pk.T / jnp.sqrt(q.shape[-1])   # [T, k]\n"
           "return jax.nn.softmax(scores, axis=-1) @ pv"),
    nan_hint="NaN/inf: a softmax written by hand overflows on scores near 1e3; subtract each row's maximum before "
             "exponentiating (jax.nn.softmax does)",
    answered_by=("labkit.attention.linformer.linformer_attention",
                 "labkit.attention.linformer.linformer_self_attention", "labkit.layers.LinformerSelfAttention"),
))


# ---------------------------------------------------------------- 2. variable lengths: pad and mask before E

def padded_attention_reference(q, k, v, e, f, valid):
    """One head with `S <= n` keys, `valid [S]` (False = padding): zero hidden keys/values, pad to n, project."""
    return linformer_attention(q[:, None], k[:, None], v[:, None], mask=valid, e_proj=e, f_proj=f)[:, 0]


def _padded_with(q, k, v, e, f, valid, *, zero_hidden=True, pad_front=False):
    """Wrong ways of feeding a short, padded sequence to E and F."""
    n, s = e.shape[-1], k.shape[0]
    if zero_hidden:
        k, v = jnp.where(valid[:, None], k, 0), jnp.where(valid[:, None], v, 0)
    widths = ((n - s, 0), (0, 0)) if pad_front else ((0, n - s), (0, 0))
    k, v = jnp.pad(k, widths), jnp.pad(v, widths)
    return jax.nn.softmax(q @ (e @ k).T / np.sqrt(q.shape[-1]), axis=-1) @ (f @ v)


def _pad_case(name, seed, t, s, n, k, d, *, hidden=()):
    def inputs():
        q = _normal(seed, t, d)
        keys = _normal(seed + 1, s, d)
        v = _normal(seed + 2, s, d)
        valid = np.ones(s, bool)
        valid[list(hidden)] = False
        keys[~valid] = 50.0  # whatever sits at padding must not matter
        v[~valid] = -50.0
        e, f = _normal(seed + 3, k, n, scale=k ** -0.5), _normal(seed + 4, k, n, scale=k ** -0.5)
        return (q, keys, v, e, f, valid), {}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


register(Exercise(
    id="lab06.padded_attention",
    description="projected attention for a sequence shorter than n: hide padding, pad to n, then project",
    points=2,
    reference=padded_attention_reference,
    run=run_jitted,
    cases=[
        _pad_case("full length: S = n = 6, nothing hidden", 0, 4, 6, 6, 3, 4),
        _pad_case("shorter: S = 5 keys, n = 8", 10, 5, 5, 8, 3, 4),
        _pad_case("S = 6 of n = 8, last two tokens are padding", 20, 6, 6, 8, 4, 4, hidden=(4, 5)),
        _pad_case("padding in the middle: S = 7 of n = 12, k = 5", 30, 7, 7, 12, 5, 8, hidden=(1, 3, 6)),
        _pad_case("length 1 of n = 4", 40, 1, 1, 4, 2, 3),
        hidden(_pad_case("3 queries, the first of S = 5 keys is padding, n = 7, k = 3", 50, 3, 5, 7, 3, 4,
                         hidden=(0,))),
    ],
    mistakes=[
        Mistake("padding not hidden before projecting", functools.partial(_padded_with, zero_hidden=False),
                "E and F mix every position into every projected key: the hidden keys and values must be zero "
                "BEFORE the projection, or the padding leaks into all of them (a -inf score cannot help: the "
                "softmax only runs after the mixing)"),
        Mistake("padded at the front", functools.partial(_padded_with, pad_front=True),
                "position j of the sequence must meet column j of E: the zero rows go after the S real ones, "
                "not in front of them (in front, the tokens meet E's last S columns instead of its first)"),
    ],
    default_hint="two things happen before E and F see the sequence: the padding is made harmless (a hidden key "
                 "or value that is not zero leaks into every projected row), and the sequence is brought to "
                 "length n, with position j meeting column j of E",
    hints=("three steps: set the rows of k and v where `valid` is False to zero (`jnp.where`, with `valid` "
           "broadcast over the features); append n - S rows of zeros at the END of both (`jnp.pad`, n being E's "
           "last dimension); then call your projected attention through `projected`, defined after Exercise 6.1",
           "n, s = e.shape[-1], k.shape[0]\n"
           "k = jnp.where(valid[:, None], k, 0.0)\n"
           "v = jnp.where(valid[:, None], v, 0.0)\n"
           "k = jnp.pad(k, ((0, n - s), (0, 0)))\n"
           "v = jnp.pad(v, ((0, n - s), (0, 0)))\n"
           "return projected(q, k, v, e, f)"),
    nan_hint="NaN/inf: the padding holds large values on purpose; zero the hidden keys and values before "
             "anything multiplies them",
    answered_by=("labkit.attention.linformer.linformer_attention",
                 "labkit.attention.linformer.linformer_self_attention", "labkit.layers.LinformerSelfAttention"),
))


# ---------------------------------------------------------------- 3. parameter counts of the sharing modes

def projection_params_reference(sharing, n_heads, proj_k, max_len, n_layers):
    """E/F parameters of a model: 'none' (per head), 'headwise', 'kv' (E = F) or 'layerwise' sharing."""
    return num_projection_params(sharing, n_heads=n_heads, proj_k=proj_k, max_len=max_len, n_layers=n_layers)


def _params_with(sharing, n_heads, proj_k, max_len, n_layers, *, forget_f=False, layerwise_per_layer=False,
                 heads_everywhere=False):
    matrices = {"none": 2, "headwise": 2, "kv": 1, "layerwise": 1}[sharing]
    if forget_f:
        matrices = 1
    heads = n_heads if sharing == "none" or heads_everywhere else 1
    layers = 1 if sharing == "layerwise" and not layerwise_per_layer else n_layers
    return matrices * heads * layers * proj_k * max_len


def _params_case(sharing, n_heads, proj_k, max_len, n_layers):
    return Case(f"{sharing}: {n_heads} heads, k = {proj_k}, n = {max_len}, {n_layers} layers",
                lambda: ((sharing, n_heads, proj_k, max_len, n_layers), {}))


register(Exercise(
    id="lab06.projection_params",
    description="count the E/F parameters of each sharing mode (per head, headwise, key-value, layerwise)",
    points=1,
    reference=projection_params_reference,
    cases=[
        _params_case("none", 4, 8, 64, 1),
        _params_case("headwise", 4, 8, 64, 2),
        _params_case("kv", 12, 256, 512, 12),
        _params_case("layerwise", 12, 256, 512, 12),
        _params_case("none", 1, 1, 1, 1),
        hidden(_params_case("headwise", 3, 7, 50, 5)),
    ],
    mistakes=[
        Mistake("forgot F", functools.partial(_params_with, forget_f=True),
                "without key-value sharing there are two matrices per layer: E for keys and F for values"),
        Mistake("layerwise counted per layer", functools.partial(_params_with, layerwise_per_layer=True),
                "layerwise sharing means ONE matrix for the whole model: do not multiply by the number of layers"),
        Mistake("heads counted when shared", functools.partial(_params_with, heads_everywhere=True),
                "only 'none' has one E, F per head; headwise, kv and layerwise share them across heads"),
    ],
    default_hint="each matrix is proj_k x max_len numbers; for each mode, count how many matrices there are: "
                 "per head or shared by the heads, per layer or shared by the layers, and whether keys and values "
                 "have one each",
    hints=("'none': an E and an F for every head of every layer; 'headwise': an E and an F per layer, shared by "
           "its heads; 'kv': one matrix per layer, for keys and values alike; 'layerwise': one matrix for the "
           "whole model. The count is the number of matrices times the size of one",
           "if sharing == \"layerwise\":\n"
           "    return proj_k * max_len\n"
           "matrices = 1 if sharing == \"kv\" else 2\n"
           "heads = n_heads if sharing == \"none\" else 1\n"
           "return n_layers * matrices * heads * proj_k * max_len"),
    answered_by=("labkit.attention.linformer.num_projection_params", "labkit.attention.linformer.projection_shape",
                 "labkit.attention.linformer.init_projections", "labkit.layers.LinformerSelfAttention"),
))
