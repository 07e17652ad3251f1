"""Lab 07 exercises: LEAP's running softmax, windowed sums, one LEAP head, and the recurrent step."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from labkit.attention.leap import leap_attention, window_scan
from labkit.grading.exercise import Case, Exercise, Mistake, hidden, register
from labkit.grading.harness import run_jitted
from labkit.grading.inputs import normal as _normal


# ---------------------------------------------------------------- 1 & 2. running / windowed softmax averages

def windowed_average_reference(logits, x, window=None):
    """`logits [T]`, `x [T, D]` -> `[T, D]`: row t = softmax(logits over the window) @ x, window = (t - w, t]."""
    logits, x = jnp.asarray(logits), jnp.asarray(x)
    _, l, s = window_scan(logits[None, :, None], x[None, :, None, :], window)
    return (s / l[..., None])[0, :, 0].astype(x.dtype)


def running_average_reference(logits, x):
    """`logits [T]`, `x [T, D]` -> `[T, D]`: row t = softmax(logits[:t+1]) @ x[:t+1]."""
    return windowed_average_reference(logits, x, None)


def _window_mask(t: int, window, *, extra: int = 0, exclusive: bool = False):
    i, j = np.arange(t)[:, None], np.arange(t)[None, :]
    seen = (j < i) if exclusive else (j <= i)
    if window is not None:
        seen &= i - j < window + extra
    return seen


def _average_with(logits, x, window=None, *, stable=True, extra=0, exclusive=False, causal=True):
    """Wrong variants of the windowed average, written densely: unstable exp, off-by-one windows, ..."""
    logits, x = jnp.asarray(logits), jnp.asarray(x)
    t = logits.shape[0]
    seen = _window_mask(t, window, extra=extra, exclusive=exclusive) if causal else np.ones((t, t), bool)
    scores = jnp.where(seen, logits[None, :], -jnp.inf)
    if stable:
        scores = scores - jnp.max(scores, -1, keepdims=True)
    e = jnp.exp(scores)
    return (e @ x) / jnp.sum(e, -1, keepdims=True)


def _prefix_difference(logits, x, window=None):
    """Windowed sums as prefix(t) - prefix(t - w): exact maths, catastrophic cancellation in float32."""
    logits, x = jnp.asarray(logits), jnp.asarray(x)
    e = jnp.exp(logits - jnp.max(logits))  # even with the global max subtracted
    num, den = jnp.cumsum(e[:, None] * x, 0), jnp.cumsum(e)
    if window is not None and window < logits.shape[0]:
        num = num.at[window:].add(-num[:-window])
        den = den.at[window:].add(-den[:-window])
    return num / den[:, None]


def _average_case(name, seed, t, d, *, scale=1.0, window="none", logits=None):
    def inputs():
        a = _normal(seed, t, scale=scale) if logits is None else np.asarray(logits(), np.float32)
        args = (a, _normal(seed + 1, t, d))
        return (args if window == "none" else args + (window,)), {}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


register(Exercise(
    id="lab07.running_average",
    description="causal running softmax average of x weighted by focus logits, stable for huge logits",
    points=2,
    reference=running_average_reference,
    run=run_jitted,
    cases=[  # few distinct shapes: each new one costs a compilation
        _average_case("tiny: seq 4, dim 2", 0, 4, 2),
        _average_case("length 1", 10, 1, 3),
        _average_case("seq 9, dim 3", 20, 9, 3),
        _average_case("large logits: up to ~3e3, seq 9", 30, 9, 3, scale=1000.0),
        _average_case("very negative logits only: ~-1e3, seq 4", 40, 4, 2,
                      logits=lambda: -1000.0 - np.abs(_normal(41, 4))),
        hidden(_average_case("seq 13, dim 5, logits up to ~300", 50, 13, 5, scale=100.0)),
    ],
    mistakes=[
        Mistake("exp without running max", functools.partial(_average_with, stable=False),
                "exp() of logits near 1e3 overflows to inf (and exp(-1e3) underflows to 0, giving 0/0): subtract "
                "the running maximum of the logits before exponentiating"),
        Mistake("not causal", functools.partial(_average_with, causal=False),
                "position t may only average positions j <= t: the sums must run over the prefix, not the whole "
                "sequence"),
        Mistake("current position left out", functools.partial(_average_with, exclusive=True),
                "include position t itself (j <= t, not j < t): the first row is then x[0]"),
    ],
    default_hint="row t is the softmax(a)-weighted average of x over positions j <= t only; e^a overflows "
                 "float32 for a > 88 (and is 0 for very negative a, giving 0/0). Carry each prefix as a summary "
                 "(largest logit so far, sum of e^(a - max), sum of e^(a - max) x), so no exponent is ever "
                 "positive",
    hints=("write `combine` first: it merges two summaries by rescaling both to the larger maximum, the formula "
           "above the exercise. Then all prefixes are ONE `jax.lax.associative_scan` of your `combine` over the "
           "positions' own summaries (its logit, 1, its row of x), and the average is S / l. Avoid a Python loop "
           "over t that re-sums each prefix: that is O(T^2) work, the scan O(T)",
           "def combine(left, right):\n"
           "    m1, l1, s1 = left\n"
           "    m2, l2, s2 = right\n"
           "    m = jnp.maximum(m1, m2)\n"
           "    c1, c2 = jnp.exp(m1 - m), jnp.exp(m2 - m)\n"
           "    return m, l1 * c1 + l2 * c2, s1 * c1[..., None] + s2 * c2[..., None]\n\n"
           "def running_average(logits, x):\n"
           "    m, l, s = jax.lax.associative_scan(combine, (logits, jnp.ones_like(logits), x))\n"
           "    return s / l[:, None]"),
    nan_hint="NaN/inf: exp() overflowed, or a 0/0 where every weight underflowed; carry the running maximum and "
             "exponentiate only logits minus it",
    answered_by=("labkit.attention.leap.window_scan", "labkit.attention.leap._combine",
                 "labkit.attention.leap.leap_attention", "labkit.attention.leap.leap_explain"),
))


register(Exercise(
    id="lab07.windowed_average",
    description="softmax average over the last `window` positions, without subtracting prefix sums",
    points=2,
    reference=windowed_average_reference,
    run=run_jitted,
    cases=[  # few distinct (shape, window) pairs: each new one costs a compilation
        _average_case("tiny: seq 5, window 2", 0, 5, 2, window=2),
        _average_case("window 1: each row is x[t]", 10, 5, 2, window=1),
        _average_case("seq 10, window 4 (does not divide 10)", 20, 10, 3, window=4),
        _average_case("window longer than the sequence: seq 5, window 8", 30, 5, 2, window=8),
        _average_case("four large then small logits: seq 10, window 4", 40, 10, 3, window=4,
                      logits=lambda: np.concatenate([np.full(4, 40.0), _normal(42, 6)])),
        _average_case("large logits: up to ~3e3, seq 10, window 4", 50, 10, 3, scale=1000.0, window=4),
        hidden(_average_case("seq 11, window 3, dim 4, logits up to ~300", 60, 11, 4, scale=100.0, window=3)),
    ],
    mistakes=[
        Mistake("window one too long", functools.partial(_average_with, extra=1),
                "the window (t - w, t] holds exactly w positions including t: use j > t - w, not j >= t - w"),
        Mistake("window one too short", functools.partial(_average_with, extra=-1),
                "the window holds w positions including t itself: positions t - w + 1 .. t"),
        Mistake("prefix differences", _prefix_difference,
                "prefix(t) - prefix(t - w) subtracts nearly equal large numbers when early logits are large: "
                "the small window sums are lost. Sum each window directly (or combine block prefix and suffix "
                "summaries), never by subtraction"),
        Mistake("exp without max", functools.partial(_average_with, stable=False),
                "exp() of logits near 1e3 overflows: subtract the maximum inside each window first"),
    ],
    default_hint="row t averages exactly the w positions t - w + 1 .. t (fewer at the start: nothing before 0), "
                 "with the stable softmax of their own logits. Do not get window sums as a difference of prefix "
                 "sums: after large early logits it cancels to 0/0",
    hints=("gather the windows: a [T, w] index array whose row t holds t, t - 1, ..., t - w + 1 (two "
           "`jnp.arange`s broadcast against each other). Indices below 0 lie outside the sequence: clip them to 0 "
           "and give them the logit -inf (`jnp.where`). Then every row is a small stable softmax: subtract the "
           "row's maximum (finite: j = t is always there), exponentiate, weight the gathered rows of x "
           "(`jnp.einsum`) and divide by the sum of the weights",
           "t = logits.shape[0]\n"
           "idx = jnp.arange(t)[:, None] - jnp.arange(window)[None, :]   # [T, w]\n"
           "valid = idx >= 0\n"
           "idx = jnp.maximum(idx, 0)\n"
           "a = jnp.where(valid, logits[idx], -jnp.inf)\n"
           "e = jnp.exp(a - a.max(axis=1, keepdims=True))\n"
           "return jnp.einsum(\"tw,twd->td\", e, x[idx]) / e.sum(axis=1, keepdims=True)"),
    nan_hint="NaN/inf: exp() overflowed, or a subtraction of prefix sums went to 0/0",
    answered_by=("labkit.attention.leap.window_scan", "labkit.attention.leap._combine",
                 "labkit.attention.leap.leap_attention", "labkit.attention.leap.leap_explain"),
))


# ---------------------------------------------------------------- 3. one LEAP head

def leap_head_reference(q, f, k, v, window=None):
    """One head: q/f/k `[T, d]`, v `[T, dv]` -> `[T, dv]` = sigmoid(q_t . K~_t / sqrt d) V~_t."""
    return leap_attention(q[:, None], k[:, None], v[:, None], focus=f[:, None], is_causal=True, window=window)[:, 0]


def _leap_head_with(q, f, k, v, window=None, *, focus_scale=True, gate="sigmoid", extra=0, gate_key="focused"):
    """Wrong heads: no scale on the focus logits, no gate / a softmax-free dot gate, gating with k_t, ..."""
    d = q.shape[-1]
    s = 1.0 / np.sqrt(d)
    logits = jnp.einsum("td,td->t", f, k) * (s if focus_scale else 1.0)
    k_avg = _average_with(logits, k, window, extra=extra)
    v_avg = _average_with(logits, v, window, extra=extra)
    key = k_avg if gate_key == "focused" else k
    z = s * jnp.einsum("td,td->t", q, key)
    g = {"sigmoid": jax.nn.sigmoid(z), "none": jnp.ones_like(z), "tanh": jnp.tanh(z)}[gate]
    return g[:, None] * v_avg


def _head_case(name, seed, t, d, dv=None, *, window=None, scale=1.0):
    def inputs():
        q, f, k = (_normal(seed + i, t, d, scale=scale) for i in range(3))
        return (q, f, k, _normal(seed + 3, t, dv or d), window), {}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


register(Exercise(
    id="lab07.leap_head",
    description="one causal LEAP head: focus logits, focused keys and values, sigmoid-gated query",
    points=3,
    reference=leap_head_reference,
    run=run_jitted,
    cases=[  # few distinct (shape, window) pairs: each new one costs a compilation
        _head_case("tiny: seq 4, dim 2, global", 0, 4, 2),
        _head_case("length 1", 10, 1, 4),
        _head_case("seq 8, d 4, dv 6, global", 20, 8, 4, 6),
        _head_case("seq 8, d 4, dv 6, window 3", 30, 8, 4, 6, window=3),
        _head_case("large logits: seq 8, d 4, dv 6, window 3", 40, 8, 4, 6, window=3, scale=25.0),
        hidden(_head_case("seq 11, d 3, dv 5, window 2", 50, 11, 3, 5, window=2)),
    ],
    mistakes=[
        Mistake("focus logits not scaled", functools.partial(_leap_head_with, focus_scale=False),
                "the focus logits are a_j = (f_j . k_j) / sqrt(d): divide by sqrt(d) before the softmax"),
        Mistake("no gate", functools.partial(_leap_head_with, gate="none"),
                "the output is sigmoid(q_t . K~_t / sqrt(d)) * V~_t: multiply by the query gate"),
        Mistake("gate with k_t instead of K~_t", functools.partial(_leap_head_with, gate_key="own"),
                "the query is compared with the focused key K~_t (the softmax-weighted average), not with k_t"),
        Mistake("window one too long", functools.partial(_leap_head_with, extra=1),
                "the window holds exactly `window` positions: t - window + 1 .. t"),
    ],
    default_hint="three parts, in order: each position's focus logit (its own focus vector against its own key, "
                 "scaled by 1/sqrt(d)); the focused key and value K~_t, V~_t (softmax(a)-weighted averages over "
                 "the prefix, or over the window); the query gate sigmoid(q_t . K~_t / sqrt(d)) times V~_t",
    hints=("use your functions from Exercises 7.1 and 7.2 through `running_avg` and `windowed_avg` (defined "
           "after their check cells). One call averages k and v together if you concatenate them along the "
           "features ([T, d + d_v]) and split the result at d. A dot product per position is an elementwise "
           "product summed over the last axis",
           "d = q.shape[-1]\n"
           "a = (f * k).sum(-1) / jnp.sqrt(d)\n"
           "kv = jnp.concatenate([k, v], axis=1)\n"
           "avg = running_avg(a, kv) if window is None else windowed_avg(a, kv, window)\n"
           "k_avg, v_avg = avg[:, :d], avg[:, d:]\n"
           "gate = jax.nn.sigmoid((q * k_avg).sum(-1) / jnp.sqrt(d))\n"
           "return gate[:, None] * v_avg"),
    answered_by=("labkit.attention.leap.leap_attention", "labkit.attention.leap.leap_explain",
                 "labkit.layers.LEAPSelfAttention"),
))


# ---------------------------------------------------------------- 4. the recurrent step

def leap_step_reference(state, q_t, f_t, k_t, v_t):
    """One head, one token of global LEAP. state = (m, l, k_sum [d], v_sum [dv]) with sums scaled by e^{-m}."""
    m, l, k_sum, v_sum = state
    d = q_t.shape[-1]
    a = jnp.dot(f_t, k_t) / np.sqrt(d)
    new_m = jnp.maximum(m, a)
    old, new = jnp.exp(m - new_m), jnp.exp(a - new_m)
    l, k_sum, v_sum = l * old + new, k_sum * old + new * k_t, v_sum * old + new * v_t
    gate = jax.nn.sigmoid(jnp.dot(q_t, k_sum / l) / np.sqrt(d))
    return (new_m, l, k_sum, v_sum), gate * v_sum / l


def run_steps(step, args, kwargs):
    """Run `step` over a whole sequence from the empty state; return the stacked outputs `[T, dv]`.

    The step is jit-compiled (one compilation per case); a step `jit` cannot trace runs as written."""
    try:
        return _steps(jax.jit(step), args)
    except Exception:  # noqa: BLE001 - run it eagerly: its own error (if any) is the one to report
        return _steps(step, args)


def _steps(step, args):
    q, f, k, v = args
    state = (jnp.float32(-jnp.inf), jnp.float32(0.0), jnp.zeros(q.shape[1], jnp.float32),
             jnp.zeros(v.shape[1], jnp.float32))
    outs = []
    for t in range(q.shape[0]):
        state, out = step(state, jnp.asarray(q[t]), jnp.asarray(f[t]), jnp.asarray(k[t]), jnp.asarray(v[t]))
        outs.append(jnp.asarray(out))
    return jnp.stack(outs)


def _step_with(state, q_t, f_t, k_t, v_t, *, read_first=False, rescale_old=True, stable=True):
    """Wrong steps: read the state before adding the token, forget to rescale old sums, no running max."""
    m, l, k_sum, v_sum = state
    d = q_t.shape[-1]
    a = jnp.dot(f_t, k_t) / np.sqrt(d)
    if not stable:
        new_m, old, new = jnp.float32(0.0), 1.0, jnp.exp(a)
    else:
        new_m = jnp.maximum(m, a)
        old = jnp.exp(m - new_m) if rescale_old else 1.0
        new = jnp.exp(a - new_m)
    if read_first:
        safe = jnp.where(l > 0, l, 1.0)
        out = jax.nn.sigmoid(jnp.dot(q_t, k_sum / safe) / np.sqrt(d)) * v_sum / safe
    l, k_sum, v_sum = l * old + new, k_sum * old + new * k_t, v_sum * old + new * v_t
    if not read_first:
        out = jax.nn.sigmoid(jnp.dot(q_t, k_sum / l) / np.sqrt(d)) * v_sum / l
    return (new_m, l, k_sum, v_sum), out


def _step_case(name, seed, t, d, dv=None, *, scale=1.0):
    def inputs():
        q, f, k = (_normal(seed + i, t, d, scale=scale) for i in range(3))
        return (q, f, k, _normal(seed + 3, t, dv or d)), {}
    return Case(name, inputs, atol=1e-5, rtol=1e-4)


register(Exercise(
    id="lab07.leap_step",
    description="the recurrent LEAP step: update (running max, sum, focused key/value sums), then read",
    points=2,
    reference=leap_step_reference,
    run=run_steps,
    cases=[
        _step_case("tiny: 3 steps, dim 2", 0, 3, 2),
        _step_case("one step, d 4, dv 5", 10, 1, 4, 5),
        _step_case("12 steps, d 4, dv 5", 20, 12, 4, 5),
        _step_case("large logits: 10 steps, d 4, dv 5, logits up to ~1e3", 30, 10, 4, 5, scale=25.0),
        hidden(_step_case("9 steps, d 3, dv 6", 40, 9, 3, 6, scale=3.0)),
    ],
    mistakes=[
        Mistake("reads before adding the token", functools.partial(_step_with, read_first=True),
                "add the new token to the sums first, then read them: position t sees j <= t (and step 0 "
                "would otherwise divide by an empty sum)"),
        Mistake("old sums not rescaled", functools.partial(_step_with, rescale_old=False),
                "when the running max grows from m to m', multiply l, k_sum and v_sum by exp(m - m') before "
                "adding the new token's exp(a - m')"),
        Mistake("no running max", functools.partial(_step_with, stable=False),
                "exp(a) overflows for logits near 1e3: keep a running maximum m and store sums scaled by exp(-m)"),
    ],
    default_hint="a step does two things, in this order: fold the new token into the summary (its focus logit, "
                 "the new running maximum, the rescaled sums), then read the focused key and value from the "
                 "UPDATED sums for the gate and the output. The empty state is m = -inf, l = 0, sums 0",
    hints=("the fold is the update formula above the exercise: the new maximum is the larger of m and the token's "
           "logit a; the old l, k_sum and v_sum are multiplied by e^(m - new max), and e^(a - new max) times "
           "(1, k_t, v_t) is added. Then K~ = k_sum / l and V~ = v_sum / l; the output is "
           "sigmoid(q_t . K~ / sqrt(d)) times V~, returned with the new state (m, l, k_sum, v_sum)",
           "m, l, k_sum, v_sum = state\n"
           "d = q_t.shape[-1]\n"
           "a = jnp.dot(f_t, k_t) / jnp.sqrt(d)\n"
           "new_m = jnp.maximum(m, a)\n"
           "old, new = jnp.exp(m - new_m), jnp.exp(a - new_m)\n"
           "l, k_sum, v_sum = l * old + new, k_sum * old + new * k_t, v_sum * old + new * v_t\n"
           "gate = jax.nn.sigmoid(jnp.dot(q_t, k_sum / l) / jnp.sqrt(d))\n"
           "return (new_m, l, k_sum, v_sum), gate * v_sum / l"),
    nan_hint="NaN/inf: exp() of a large logit overflowed, or the state was read before the token was added "
             "(0/0 at the first step); keep the running maximum and add before you read",
    answered_by=("labkit.attention.leap.leap_step", "labkit.attention.leap.generate"),
))
