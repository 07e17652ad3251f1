"""The worker's side of a benchmark point: build the step, time it, measure its peak extra memory."""

from __future__ import annotations

import statistics
import time

from labkit.bench.implementations import IMPLEMENTATIONS
from labkit.bench.measurement import Measurement, attention_flops
from labkit.bench.memory import MIB, PeakMemory
from labkit.bench.steps import STEPS
from labkit.bench.turns import Turn


def run_point(spec: dict) -> dict:
    """Measure one point in THIS process (a worker's job): returns `Measurement` fields as a dict.

    `spec` holds `Measurement`'s parameters plus `repeats` and `warmup` (and `turn_fds` when the point is
    measured together with others, `labkit.bench.turns`). Inputs are seeded standard normal
    `[batch, seq, heads, head_dim]` float32; the time is the median of `repeats` calls after `warmup` calls;
    the memory is the high-water mark during the first call above the level just before it (`peak_extra_mib`:
    what one call needs) and during all calls (`steady_extra_mib`: it also holds what the C allocator kept
    cached between calls; glibc's per-thread heaps grew it by up to 60% over four calls of the same program).
    """
    import numpy as np

    impl = IMPLEMENTATIONS[spec["impl"]]
    point = Measurement.from_dict(spec)
    if isinstance(point.options.get("devices"), int):
        _cpu_devices(point.options["devices"])
    problem = point.problem
    rng = np.random.default_rng(0)
    dims = (problem.batch, problem.seq_len, problem.heads, problem.head_dim)
    turn = Turn(spec)  # measured together with other workers: one call per turn (labkit.bench.turns)
    turn.wait()  # the first turn also compiles, so no other worker's call runs meanwhile
    inputs = [rng.standard_normal(dims, dtype=np.float32) for _ in range(3)]
    fn = impl.make(causal=problem.causal, **point.options)
    step = STEPS[impl.framework](fn, inputs, problem.backward)
    times: list[float] = []
    peak = PeakMemory()
    peak.start()
    readings = []  # the high-water mark after each call: the kernel updates it lazily, so take the largest
    for call in range(spec["warmup"] + spec["repeats"]):
        if call:
            turn.wait()
        start = time.perf_counter()
        step()
        if call >= spec["warmup"]:
            times.append(time.perf_counter() - start)
        readings.append(peak.stop())
        turn.done()
    first_call, steady = readings[0], max(readings)
    median = statistics.median(times)
    return {"status": "ok", "time_s": median, "times_s": times, "gflops": attention_flops(problem) / median / 1e9,
            "peak_extra_mib": first_call / MIB, "steady_extra_mib": steady / MIB, "memory_method": peak.method}


def _cpu_devices(count: int) -> None:
    """Give this worker `count` CPU devices (`--option devices=N`), before anything starts JAX's backend."""
    import jax

    jax.config.update("jax_num_cpu_devices", count)
