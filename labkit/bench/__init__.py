"""Time and peak memory of attention implementations against sequence length, one fresh process per point.

What a point measures (inputs `[batch, seq, heads, head_dim]` float32, keys as long as the queries):
- time: the program is jit-compiled first (compilation is not timed), then `warmup` calls, then the median
  of `repeats` timed calls, each waited for (`block_until_ready`);
- dense-equivalent GFLOP/s (`gflops` in the JSON): `4 b N T S H` flops forward (two matmuls), x2.5 with the
  backward pass, halved when causal, whatever the implementation really computes; the table shows time per
  token instead, which means the same for every family;
- peak extra memory: the resident-set high-water mark during the first call minus the resident set just
  before it (`memory.PeakMemory`; `peak_extra_mib`, the table's `peak MiB`), and the same over every call
  (`steady_extra_mib`, `all MiB`), which also holds what the C allocator kept cached between calls. Inputs
  and compiled code are not counted; the output buffer is.

Modules, one job each: `worker` (run a function in a fresh process: every measurement in labkit uses it),
`memory` (peak resident memory), `implementations` (what can be measured: every registered attention family,
plus `EXTRA_IMPLEMENTATIONS`), `steps` (a compiled step per framework), `point` (the worker's side of a point),
`measuring` (the parent's side: skip or launch), `turns` (workers taking turns call by call, so that ratios
hold within one run), `tables` and `plotting` (reports), `cli` (the command), `linformer_checkpoint` (lab 06's
training-step memory per checkpoint level).

A new attention family appears here by being registered in `labkit.attention.FAMILIES`.

Command line (also `python -m labkit bench`):
    python -m labkit.bench --impl dense,memory_efficient --seq 1024,4096 --heads 4 --head-dim 64 \\
        [--causal] [--backward] [--json out.json] [--plot out.png] [--repeats N]
"""

from labkit.attention import Problem
from labkit.bench.cli import main
from labkit.bench.implementations import (EXTRA_IMPLEMENTATIONS, IMPLEMENTATIONS, Implementation,
                                          family_implementation)
from labkit.bench.linformer_checkpoint import checkpoint_memory_table
from labkit.bench.measurement import Measurement, attention_flops
from labkit.bench.measuring import PROCESS_OVERHEAD_BYTES, estimate_need_bytes, measure, measure_together, sweep
from labkit.bench.memory import MIB, PeakMemory, available_bytes
from labkit.bench.plotting import plot
from labkit.bench.point import run_point
from labkit.bench.tables import table
from labkit.bench.worker import (RESULT_MARKER, WorkerResult, finish_worker, parse_worker_output, run_in_worker,
                                 start_worker)

__all__ = ["EXTRA_IMPLEMENTATIONS", "IMPLEMENTATIONS", "MIB", "PROCESS_OVERHEAD_BYTES", "RESULT_MARKER",
           "Implementation", "Measurement", "PeakMemory", "Problem", "WorkerResult", "attention_flops",
           "available_bytes", "checkpoint_memory_table", "estimate_need_bytes", "family_implementation", "finish_worker",
           "main", "measure", "measure_together", "parse_worker_output", "plot", "run_in_worker", "run_point",
           "start_worker", "sweep", "table"]
