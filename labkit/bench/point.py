"""The worker's side of a benchmark point: build the step, time it, measure its peak extra memory."""

from __future__ import annotations

import statistics
import time

from labkit.bench.implementations import IMPLEMENTATIONS
from labkit.bench.measurement import Measurement, attention_flops
from labkit.bench.memory import MIB, PeakMemory
from labkit.bench.steps import STEPS


def run_point(spec: dict) -> dict:
    """Measure one point in THIS process (a worker's job): returns `Measurement` fields as a dict.

    `spec` holds `Measurement`'s parameters plus `repeats` and `warmup`. Inputs are seeded standard normal
    `[batch, seq, heads, head_dim]` float32; the time is the median of `repeats` calls after `warmup` calls;
    the memory is the high-water mark during those calls above the level just before them.
    """
    import numpy as np

    impl = IMPLEMENTATIONS[spec["impl"]]
    point = Measurement.from_dict(spec)
    problem = point.problem
    rng = np.random.default_rng(0)
    dims = (problem.batch, problem.seq_len, problem.heads, problem.head_dim)
    inputs = [rng.standard_normal(dims, dtype=np.float32) for _ in range(3)]
    fn = impl.make(causal=problem.causal, **point.options)
    step = STEPS[impl.framework](fn, inputs, problem.backward)
    peak = PeakMemory()
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
    return {"status": "ok", "time_s": median, "times_s": times, "gflops": attention_flops(problem) / median / 1e9,
            "peak_extra_mib": extra / MIB, "memory_method": peak.method}
