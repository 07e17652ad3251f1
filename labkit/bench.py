"""Time and peak memory of attention implementations against sequence length, one fresh process per point.

Why a fresh subprocess per point: JAX caches compiled programs and the allocator keeps freed memory, so a
second measurement in the same process sees the first one's leftovers. Each point therefore runs
`python -c "from labkit.bench import _worker_main; _worker_main()" JSON` and reports one JSON line.

What a point measures (inputs `[batch, seq, heads, head_dim]` float32, keys = queries' length):
- time: the program is jit-compiled first (compilation is not timed), then `warmup` calls, then the median
  of `repeats` timed calls, each waited for (`block_until_ready`);
- dense-equivalent GFLOP/s (`gflops` in the JSON): `4 b h T S d` flops forward (two matmuls), x2.5 with the
  backward pass, halved when causal, whatever the implementation really computes; the table shows time per
  token instead, which means the same for every family;
- peak extra memory: the resident-set high-water mark during the warm-up and timed calls minus the resident
  set just before them. The kernel's high-water mark (`VmHWM`) is reset first where Linux allows it
  (`/proc/self/clear_refs`), so compilation's own peak cannot hide the call's; elsewhere it falls back to
  `ru_maxrss` after minus before. Inputs and compiled code are not counted; the output buffer is.

Before launching, each point's need is estimated and compared with `psutil`'s available memory: a point that
would not fit is reported as `skipped` (need vs available), never launched to be killed.

Other labs add their implementation by adding ONE entry to `IMPLEMENTATIONS`.

Command line (also `python -m labkit bench`):
    python -m labkit.bench --impl dense,memory_efficient --seq 1024,4096 --heads 4 --head-dim 64 \\
        [--causal] [--backward] [--json out.json] [--plot out.png] [--repeats N]
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import importlib
import json
import os
import statistics
import subprocess
import sys
import time
from typing import Any, Callable, Iterable

MIB = 1024 * 1024
RESULT_MARKER = "LABKIT_BENCH_RESULT "
# Interpreter + jax + compiled program: what a worker holds before the measured calls.
PROCESS_OVERHEAD_BYTES = 600 * MIB


@dataclasses.dataclass(frozen=True)
class Shape:
    """One benchmark point's problem size."""

    batch: int
    heads: int
    seq_len: int
    head_dim: int
    causal: bool = False
    backward: bool = False

    @property
    def io_bytes(self) -> int:
        """q, k, v, output (and their gradients with backward) in float32."""
        arrays = 8 if self.backward else 4
        return arrays * self.batch * self.seq_len * self.heads * self.head_dim * 4

    @property
    def score_bytes(self) -> int:
        """One full `[batch, heads, T, S]` float32 score matrix."""
        return self.batch * self.heads * self.seq_len * self.seq_len * 4


@dataclasses.dataclass(frozen=True)
class Implementation:
    """How to build one attention implementation for the benchmark.

    `make(causal=..., **options)` returns `fn(query, key, value) -> out` on `[batch, seq, heads, dim]` arrays
    of its framework (`"jax"` arrays, `"torch"` tensors, or `"keras"`: jax arrays through a Keras layer on the
    JAX backend); `requires` names modules that must import, else
    the point is skipped; `memory(shape, options)` estimates the peak extra bytes of one call.
    """

    description: str
    make: Callable[..., Callable]
    memory: Callable[[Shape, dict], int]
    framework: str = "jax"
    requires: tuple[str, ...] = ()


def _dense_memory(shape: Shape, options: dict) -> int:
    # Forward keeps the logits and the probabilities (measured ~8 GiB at seq 16384, 4 heads);
    # the backward pass also keeps the probabilities and their gradient.
    copies = 4 if shape.backward else 2
    return copies * shape.score_bytes + shape.io_bytes


def _blockwise_memory(shape: Shape, options: dict) -> int:
    # A few [query_chunk, key_chunk] blocks per head and example, plus running sums of the output size.
    qc = min(shape.seq_len, options.get("query_chunk_size", 1024))
    kc = min(shape.seq_len, options.get("key_chunk_size", 1024))
    blocks = 4 * shape.batch * shape.heads * qc * kc * 4
    return blocks + 3 * shape.io_bytes


def _make_dense(*, causal: bool, **options) -> Callable:
    from labkit.attention.dense import dot_product_attention

    return functools.partial(dot_product_attention, is_causal=causal, **options)


def _make_jax(*, causal: bool, **options) -> Callable:
    import jax

    return functools.partial(jax.nn.dot_product_attention, is_causal=causal, **options)


def _make_memory_efficient(*, causal: bool, **options) -> Callable:
    from labkit.attention.chunked import memory_efficient_attention

    return functools.partial(memory_efficient_attention, is_causal=causal, **options)


def _make_torch(*, causal: bool, **options) -> Callable:
    import torch.nn.functional as F

    def sdpa(query, key, value):
        # torch wants [batch, heads, seq, dim]; transposed views keep the last dim contiguous.
        out = F.scaled_dot_product_attention(query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),
                                             is_causal=causal, **options)
        return out.transpose(1, 2)

    return sdpa


def _make_keras(memory_efficient: bool) -> Callable[..., Callable]:
    """Keras's MultiHeadAttention, or labkit's drop-in, on the JAX backend: `fn(q, k, v)` projects and attends.

    Inputs `[batch, seq, heads, dim]` are flattened to Keras's `[batch, seq, heads * dim]`; the layer is built
    on the first (eager) call, then jitted like every other implementation.
    """

    def make(*, causal: bool, **options) -> Callable:
        os.environ.setdefault("KERAS_BACKEND", "jax")
        import keras

        from labkit.keras import MemoryEfficientMultiHeadAttention

        cls = MemoryEfficientMultiHeadAttention if memory_efficient else keras.layers.MultiHeadAttention
        built: dict[str, Any] = {}

        def attend(query, key, value):
            if "layer" not in built:
                built["layer"] = cls(num_heads=query.shape[2], key_dim=query.shape[3], **options)
            b, t = query.shape[:2]
            flat = [x.reshape(b, x.shape[1], -1) for x in (query, key, value)]  # [B, L, N * H]
            return built["layer"](flat[0], flat[2], key=flat[1], use_causal_mask=causal)

        return attend

    return make


def _keras_step(fn: Callable, inputs: list, backward: bool) -> Callable[[], Any]:
    if backward:
        raise ValueError("the Keras entries measure inference only")
    fn(*[x[:, :8] for x in inputs])  # builds the layer's weights eagerly, outside the jitted program
    return _jax_step(fn, inputs, backward)


IMPLEMENTATIONS: dict[str, Implementation] = {
    "dense": Implementation("labkit.attention.dense.dot_product_attention (full score matrix)",
                            _make_dense, _dense_memory),
    "jax": Implementation("jax.nn.dot_product_attention (XLA, full score matrix on CPU)",
                          _make_jax, _dense_memory),
    "memory_efficient": Implementation("labkit.attention.chunked.memory_efficient_attention (Rabe & Staats)",
                                       _make_memory_efficient, _blockwise_memory),
    "torch": Implementation("torch.nn.functional.scaled_dot_product_attention (CPU flash kernel)",
                            _make_torch, _blockwise_memory, framework="torch", requires=("torch",)),
    # Lab 03, the Keras drop-in: projections included, so memory is compared between these two entries.
    "keras_mha": Implementation("keras.layers.MultiHeadAttention (JAX backend)", _make_keras(False),
                                lambda s, o: _dense_memory(s, o) + 3 * s.io_bytes, framework="keras",
                                requires=("keras",)),
    "keras_chunked": Implementation(
        "labkit.keras.MemoryEfficientMultiHeadAttention (JAX backend, chunks of 512)", _make_keras(True),
        lambda s, o: _blockwise_memory(s, {"query_chunk_size": 512, "key_chunk_size": 512, **o}) + 3 * s.io_bytes,
        framework="keras", requires=("keras",)),
    # Lab 04. Causal `linear` is the prefix-sum form: it materialises T [d, dv] states (O(T d dv) memory).
    "linear": Implementation(
        "labkit.attention.linear.linear_attention (elu+1; causal: prefix sums)",
        lambda *, causal, **o: functools.partial(
            importlib.import_module("labkit.attention.linear").linear_attention, is_causal=causal, **o),
        lambda s, o: 3 * s.io_bytes + (2 + 2 * s.backward) * s.causal * s.io_bytes // 4 * (s.head_dim + 1)),
    "linear_chunkwise": Implementation(
        "labkit.attention.linear.linear_attention(chunk_size=128): lax.scan over chunks, constant-memory grad",
        lambda *, causal, **o: functools.partial(
            importlib.import_module("labkit.attention.linear").linear_attention, is_causal=causal,
            **{"chunk_size": 128, **o}),
        lambda s, o: 3 * s.io_bytes + 4 * s.batch * s.heads * o.get("chunk_size", 128) ** 2 * 4),
    # Lab 02. Shared QK: `key` is ignored (the keys are the length-normalised queries); hashing key fixed.
    # Memory: per round, [T, chunk_len * 2] scores and probabilities, plus sorted copies of q and v.
    "lsh": Implementation(
        "labkit.attention.lsh.lsh_attention (Reformer, shared QK; options chunk_len=64, n_hashes=1, n_buckets)",
        lambda *, causal, **o: lambda q, k, v: importlib.import_module("labkit.attention.lsh").lsh_attention(
            q, v, is_causal=causal, prng_key=importlib.import_module("jax").random.PRNGKey(0), **o),
        lambda s, o: o.get("n_hashes", 1) * (3 * s.io_bytes + 4 * s.batch * s.heads * s.seq_len
                                             * 2 * o.get("chunk_len", 64) * 4)),
    # Lab 07. LEAP also needs focus vectors: the benchmark reuses the keys as focus. Causal = decoder LEAP,
    # non-causal = the bidirectional form (two passes). The associative scans keep O(T d) arrays per level.
    "leap": Implementation(
        "labkit.attention.leap.leap_attention (focus = key; non-causal: bidirectional), (max, sum) scans",
        lambda *, causal, **o: (lambda q, k, v: getattr(
            importlib.import_module("labkit.attention.leap"),
            "leap_attention" if causal else "leap_attention_bidirectional")(q, k, k, v, **o)),
        lambda s, o: 12 * s.io_bytes),
    # Lab 06. Fixed random E, F per head ([heads, k, S], k = proj_k, default 256) as compile-time constants.
    "linformer": Implementation(
        "labkit.attention.linformer.linformer_attention (k=256, E, F per head)",
        lambda *, causal, **o: importlib.import_module("labkit.attention.linformer").bench_callable(
            causal=causal, **o),
        lambda s, o: (4 + 4 * s.backward) * s.batch * s.heads * s.seq_len * min(s.seq_len, o.get("proj_k", 256)) * 4
        + 2 * s.heads * s.seq_len * min(s.seq_len, o.get("proj_k", 256)) * 4 + 3 * s.io_bytes),
    # Lab 05. FAVOR+ with 256 orthogonal random features; causal: lab 04's chunkwise scan (chunks of 128).
    "kernel": Implementation(
        "labkit.attention.kernel.kernel_attention (FAVOR+, 256 random features; causal: chunks of 128)",
        lambda *, causal, **o: functools.partial(
            importlib.import_module("labkit.attention.kernel").kernel_attention, is_causal=causal,
            **{"causal_chunk_length": 128 if causal else None, **o}),
        lambda s, o: (3 * s.io_bytes + 4 * (1 + s.backward) * s.batch * s.seq_len * s.heads
                      * o.get("num_random_features", 256) * 4 + 4 * s.batch * s.heads * 128 ** 2 * 4)),
}


@dataclasses.dataclass
class Measurement:
    """One benchmark point: its parameters, status (`ok`, `skipped`, `failed`) and numbers."""

    impl: str
    seq_len: int
    batch: int = 1
    heads: int = 4
    head_dim: int = 64
    causal: bool = False
    backward: bool = False
    options: dict = dataclasses.field(default_factory=dict)
    status: str = "ok"
    time_s: float | None = None
    times_s: list = dataclasses.field(default_factory=list)
    gflops: float | None = None
    peak_extra_mib: float | None = None
    need_mib: float | None = None
    available_mib: float | None = None
    memory_method: str | None = None
    message: str = ""

    @property
    def ok(self) -> bool:
        """True when the point ran and was measured."""
        return self.status == "ok"

    def to_dict(self) -> dict:
        """Plain-JSON form."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "Measurement":
        """Inverse of `to_dict` (unknown keys ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in names})


def attention_flops(shape: Shape) -> float:
    """FLOPs of one call: `4 b h T S d` forward, x2.5 with backward, halved when causal."""
    flops = 4.0 * shape.batch * shape.heads * shape.seq_len * shape.seq_len * shape.head_dim
    if shape.backward:
        flops *= 2.5
    if shape.causal:
        flops /= 2
    return flops


def estimate_need_bytes(impl: str, shape: Shape, options: dict | None = None) -> int:
    """Estimated peak resident bytes of a worker measuring `impl` at `shape` (process overhead included)."""
    return IMPLEMENTATIONS[impl].memory(shape, options or {}) + shape.io_bytes + PROCESS_OVERHEAD_BYTES


def available_bytes() -> int:
    """Memory the OS says a new process could use without swapping (psutil's `available`)."""
    import psutil

    return int(psutil.virtual_memory().available)


# ---------------------------------------------------------------------------------------- worker side

def _read_status_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


class _PeakMemory:
    """Resident-set high-water mark of this process from `start()` to `stop()`, in bytes."""

    def start(self) -> None:
        import gc
        import resource

        gc.collect()
        self.method = "ru_maxrss"
        try:
            with open("/proc/self/clear_refs", "w") as clear:
                clear.write("5")  # resets VmHWM to the current resident set
            self.method = "VmHWM"
        except OSError:
            pass
        if self.method == "VmHWM" and _read_status_kib("VmRSS") is not None:
            self.before = _read_status_kib("VmRSS") * 1024
        else:
            self.method = "ru_maxrss"
            self.before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux

    def stop(self) -> int:
        import resource

        if self.method == "VmHWM":
            after = _read_status_kib("VmHWM") * 1024
        else:
            after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return max(0, after - self.before)


def _jax_step(fn: Callable, inputs: list, backward: bool) -> Callable[[], Any]:
    import jax
    import jax.numpy as jnp

    if backward:
        # Gradient of a fixed random projection of the output, so no cotangent is trivially zero or one.
        cotangent = jnp.asarray(jax.random.normal(jax.random.PRNGKey(1), inputs[0].shape[:-1] +
                                                  (inputs[2].shape[-1],), jnp.float32))
        program = jax.grad(lambda q, k, v: jnp.sum(fn(q, k, v) * cotangent), argnums=(0, 1, 2))
    else:
        program = fn
    arrays = [jnp.asarray(x) for x in inputs]
    compiled = jax.jit(program).lower(*arrays).compile()
    return lambda: jax.block_until_ready(compiled(*arrays))


def _torch_step(fn: Callable, inputs: list, backward: bool) -> Callable[[], Any]:
    import torch

    tensors = [torch.from_numpy(x).requires_grad_(backward) for x in inputs]
    if not backward:
        def step():
            with torch.no_grad():
                return fn(*tensors)
        return step
    cotangent = torch.randn(inputs[0].shape[:-1] + (inputs[2].shape[-1],), generator=torch.Generator().manual_seed(1))

    def step_backward():
        for t in tensors:
            t.grad = None
        (fn(*tensors) * cotangent).sum().backward()
        return [t.grad for t in tensors]
    return step_backward


def run_point(spec: dict) -> dict:
    """Measure one point in THIS process (the worker's job): returns `Measurement.to_dict()` fields."""
    import numpy as np

    impl = IMPLEMENTATIONS[spec["impl"]]
    shape = Shape(spec["batch"], spec["heads"], spec["seq_len"], spec["head_dim"], spec["causal"], spec["backward"])
    rng = np.random.default_rng(0)
    dims = (shape.batch, shape.seq_len, shape.heads, shape.head_dim)
    inputs = [rng.standard_normal(dims, dtype=np.float32) for _ in range(3)]
    fn = impl.make(causal=shape.causal, **spec.get("options", {}))
    step = {"torch": _torch_step, "keras": _keras_step}.get(impl.framework, _jax_step)(fn, inputs, shape.backward)
    peak = _PeakMemory()
    peak.start()
    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(spec["repeats"]):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    extra = peak.stop()
    median = statistics.median(times)
    return {"status": "ok", "time_s": median, "times_s": times, "gflops": attention_flops(shape) / median / 1e9,
            "peak_extra_mib": extra / MIB, "memory_method": peak.method}


def _worker_main(argv: list[str] | None = None) -> None:
    """Subprocess entry: `argv[0]` is the JSON spec; prints one `RESULT_MARKER` line."""
    argv = sys.argv[1:] if argv is None else argv
    spec = json.loads(argv[0])
    import labkit  # noqa: F401 - silences TF/absl noise before jax / torch load

    try:
        result = run_point(spec)
    except Exception as error:  # report, don't crash: the parent turns this into a failed point
        result = {"status": "failed", "message": f"{type(error).__name__}: {error}"}
    print(RESULT_MARKER + json.dumps(result), flush=True)


def parse_worker_output(stdout: str) -> dict | None:
    """The result dict from a worker's stdout (its last `RESULT_MARKER` line), or None if there is none."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            try:
                return json.loads(line[len(RESULT_MARKER):])
            except json.JSONDecodeError:
                return None
    return None


# ---------------------------------------------------------------------------------------- parent side

def _missing_requirement(impl: Implementation) -> str | None:
    for module in impl.requires:
        try:
            importlib.import_module(module)
        except Exception as error:  # any import failure means "not available here"
            return f"{module} is not importable ({type(error).__name__}: {error})"
    return None


def measure(impl: str, seq_len: int, *, batch: int = 1, heads: int = 4, head_dim: int = 64, causal: bool = False,
            backward: bool = False, repeats: int = 5, warmup: int = 1, timeout_s: float = 600,
            **impl_options) -> Measurement:
    """Measure `impl` at one sequence length in a fresh subprocess; never raises for a failed point.

    Returns a `Measurement` with status `ok` (time_s = median of `repeats` after `warmup` calls, gflops,
    peak_extra_mib), `skipped` (not installed, or estimated need > available memory: see need_mib,
    available_mib, message) or `failed` (message).
    """
    if impl not in IMPLEMENTATIONS:
        raise ValueError(f"impl must be one of {sorted(IMPLEMENTATIONS)}, got {impl!r}")
    result = Measurement(impl, seq_len, batch, heads, head_dim, causal, backward, dict(impl_options))
    implementation = IMPLEMENTATIONS[impl]
    missing = _missing_requirement(implementation)
    if missing:
        result.status, result.message = "skipped", missing
        return result
    shape = Shape(batch, heads, seq_len, head_dim, causal, backward)
    need, available = estimate_need_bytes(impl, shape, impl_options), available_bytes()
    result.need_mib, result.available_mib = need / MIB, available / MIB
    if need > 0.9 * available:
        result.status = "skipped"
        result.message = f"needs ~{need / MIB:,.0f} MiB, {available / MIB:,.0f} MiB available"
        return result
    spec = {"impl": impl, "seq_len": seq_len, "batch": batch, "heads": heads, "head_dim": head_dim,
            "causal": causal, "backward": backward, "repeats": repeats, "warmup": warmup, "options": impl_options}
    # The folder holding this labkit package (a checkout or site-packages), so the worker imports the same one.
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")])))
    command = [sys.executable, "-c", "from labkit.bench import _worker_main; _worker_main()", json.dumps(spec)]
    try:
        done = subprocess.run(command, capture_output=True, text=True, timeout=timeout_s, env=env)
    except subprocess.TimeoutExpired:
        result.status, result.message = "failed", f"timed out after {timeout_s:g} s"
        return result
    parsed = parse_worker_output(done.stdout)
    if parsed is None:
        reason = "killed by the OS (out of memory?)" if done.returncode in (-9, 137) else f"exit code {done.returncode}"
        tail = done.stderr.strip().splitlines()[-3:]
        result.status, result.message = "failed", "worker printed no result: " + reason + (
            ": " + " | ".join(tail) if tail else "")
        return result
    for name, value in parsed.items():
        setattr(result, name, value)
    return result


def sweep(impls: Iterable[str], seq_lens: Iterable[int], *, progress: bool = True, **kw) -> list[Measurement]:
    """`measure` every implementation at every length (lengths in the outer loop), with a tqdm bar."""
    from tqdm.auto import tqdm

    points = [(impl, n) for n in seq_lens for impl in impls]
    results = []
    with tqdm(points, desc="bench", unit="point", disable=not progress) as bar:
        for impl, n in bar:
            bar.set_postfix_str(f"{impl} @ {n}")
            results.append(measure(impl, n, **kw))
    return results


def _variant(m: Measurement) -> str:
    return ", ".join(filter(None, ["causal" if m.causal else "", "fwd+bwd" if m.backward else "forward"]))


def table(results: list[Measurement], baseline: str = "dense") -> str:
    """Plain-text table: time, time per token, peak extra MiB, and ratios to `baseline` at the same length."""
    base = {(m.seq_len, m.batch, m.heads, m.head_dim, m.causal, m.backward): m
            for m in results if m.impl == baseline and m.ok}
    short = baseline[:6]
    header = (f"{'impl':<16} {'seq':>6} {'variant':<15} {'time ms':>9} {'us/token':>8} {'peak MiB':>8} "
              f"{'t/' + short:>8} {'mem/' + short:>10}  status")
    lines = [header, "-" * len(header)]
    for m in results:
        ref = base.get((m.seq_len, m.batch, m.heads, m.head_dim, m.causal, m.backward))
        if m.ok:
            t_ratio = f"{m.time_s / ref.time_s:.2f}x" if ref else "-"
            m_ratio = (f"{m.peak_extra_mib / ref.peak_extra_mib:.3f}x"
                       if ref and ref.peak_extra_mib else "-")
            per_token = m.time_s / (m.batch * m.seq_len) * 1e6
            lines.append(f"{m.impl:<16} {m.seq_len:>6} {_variant(m):<15} {m.time_s * 1e3:>9.1f} {per_token:>8.2f} "
                         f"{m.peak_extra_mib:>8.1f} {t_ratio:>8} {m_ratio:>10}  ok")
        else:
            lines.append(f"{m.impl:<16} {m.seq_len:>6} {_variant(m):<15} {'-':>9} {'-':>8} {'-':>8} {'-':>8} "
                         f"{'-':>10}  {m.status}: {m.message}")
    return "\n".join(lines)


def plot(results: list[Measurement], path: str | None = None):
    """Time and peak extra memory against length, log-log, one line per implementation; returns the figure."""
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(10, 4))
    series: dict[str, list[Measurement]] = {}
    for m in results:
        if m.ok:
            label = m.impl + ("" if not (m.causal or m.backward) else f" ({_variant(m)})")
            series.setdefault(label, []).append(m)
    for label, points in series.items():
        points.sort(key=lambda m: m.seq_len)
        lengths = [m.seq_len for m in points]
        ax_time.plot(lengths, [m.time_s for m in points], marker="o", label=label)
        ax_mem.plot(lengths, [max(m.peak_extra_mib, 1e-2) for m in points], marker="o", label=label)
    for ax, ylabel in ((ax_time, "time per call (s)"), (ax_mem, "peak extra memory (MiB)")):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("sequence length")
        ax.set_ylabel(ylabel)
        ax.grid(True, which="both", alpha=0.3)
        if series:
            ax.legend()
    skipped = [f"{m.impl}@{m.seq_len}" for m in results if not m.ok]
    fig.suptitle("attention: time and memory vs length (measured)" +
                 (f"\nnot measured: {', '.join(skipped)}" if skipped else ""), fontsize=10)
    fig.tight_layout()
    if path is not None:
        fig.savefig(path, dpi=120)
    return fig


def _int_list(text: str) -> list[int]:
    return [int(float(x)) for x in text.split(",") if x.strip()]


def _option(text: str) -> tuple[str, Any]:
    name, _, value = text.partition("=")
    if not name or not value:
        raise argparse.ArgumentTypeError(f"--option wants NAME=VALUE, got {text!r}")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def main(argv: list[str] | None = None) -> int:
    """`python -m labkit bench ...`: sweep, print the table, optionally write JSON and a plot. 0 if none failed."""
    parser = argparse.ArgumentParser(prog="python -m labkit bench", description=__doc__.split("\n\n")[0])
    parser.add_argument("--impl", default="dense,memory_efficient",
                        help=f"comma-separated, from: {', '.join(IMPLEMENTATIONS)}")
    parser.add_argument("--seq", type=_int_list, default=[1024, 4096], help="comma-separated sequence lengths")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--backward", action="store_true", help="time forward + gradient w.r.t. q, k, v")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=600, help="seconds per point")
    parser.add_argument("--baseline", default="dense", help="implementation the ratios refer to")
    parser.add_argument("--option", type=_option, action="append", default=[],
                        help="NAME=VALUE passed to every implementation, e.g. query_chunk_size=512")
    parser.add_argument("--json", help="write the results to this JSON file")
    parser.add_argument("--plot", help="write the time/memory plot to this image file")
    args = parser.parse_args(argv)
    impls = [x.strip() for x in args.impl.split(",") if x.strip()]
    unknown = [x for x in impls if x not in IMPLEMENTATIONS]
    if unknown:
        parser.error(f"unknown --impl {', '.join(unknown)}; choose from {', '.join(IMPLEMENTATIONS)}")
    results = sweep(impls, args.seq, batch=args.batch, heads=args.heads, head_dim=args.head_dim,
                    causal=args.causal, backward=args.backward, repeats=args.repeats, warmup=args.warmup,
                    timeout_s=args.timeout, **dict(args.option))
    print(table(results, baseline=args.baseline))
    if args.json:
        with open(args.json, "w") as out:
            json.dump([m.to_dict() for m in results], out, indent=1)
    if args.plot:
        plot(results, args.plot)
    return 1 if any(m.status == "failed" for m in results) else 0


if __name__ == "__main__":
    sys.exit(main())
