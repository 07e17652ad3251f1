"""`python -m labkit ring`: ring attention across several OS processes, checked against one process's attention.

    python -m labkit ring --processes 2 --local-devices 2 --seq 8192 [--causal] [--layout zigzag]

starts `--processes` copies of this module on this machine. Each sets its number of CPU devices, picks gloo for
CPU collectives, and joins the others with `jax.distributed.initialize` (coordinator on 127.0.0.1, a free port).
Together they form one mesh of processes x local-devices devices; the sequence is sharded over all of them and
the key/value blocks travel round the ring across the process boundaries. Each process checks its own rows
against exact single-process attention (labkit's memory-efficient attention over the whole sequence) and
reports the time of one ring call (median of `--repeats`, after a compiled warm-up), its peak resident memory,
the extra memory during the calls, and the work each of its devices did.

Several hosts: the worker is the same command with the process's place given explicitly, run once on every
host, e.g. on host i of N (host 0 runs the coordinator at a port every host can reach):

    python -m labkit ring --coordinator host0:12345 --num-processes N --process-id i --local-devices D --seq S

The launcher is only a convenience for running all N on one machine.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import socket
import statistics
import subprocess
import sys
import time

RESULT_MARKER = "LABKIT_RING_RESULT "
MIB = 1024 * 1024


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _inputs(args):
    """The same seeded global q, k, v `[batch, seq, heads, dim]` (float32 numpy) in every process."""
    import numpy as np

    rng = np.random.default_rng(args.seed)
    shape = (args.batch, args.seq, args.heads, args.head_dim)
    return tuple(rng.standard_normal(shape, dtype=np.float32) for _ in range(3))


def _reference_rows(q, k, v, rows, causal: bool):
    """Exact attention of the query rows `rows` (global positions) against the whole sequence, one process."""
    import jax.numpy as jnp

    from labkit.attention.chunked import memory_efficient_attention

    mask = (rows[:, None] >= jnp.arange(k.shape[1])[None, :]) if causal else None
    return memory_efficient_attention(q[:, rows], k, v, mask=mask)


def _start_jax(args) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", args.local_devices)
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=args.coordinator, num_processes=args.num_processes,
                               process_id=args.process_id)


def run_worker(args) -> dict:
    """One process's part of the ring: time, memory and error of its rows (what it prints as JSON)."""
    import jax
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from labkit.attention import ring
    from labkit.bench.memory import PeakMemory, peak_rss_bytes

    _start_jax(args)
    n = jax.device_count()
    mesh = jax.sharding.Mesh(np.array(jax.devices()), ("sp",))
    order = ring.layout_order(args.seq, n, args.layout)
    q, k, v = _inputs(args)
    sharding = NamedSharding(mesh, PartitionSpec(None, "sp"))
    placed = [jax.make_array_from_callback(x.shape, sharding, lambda idx, x=x: x[:, order][idx]) for x in (q, k, v)]
    local = functools.partial(ring.ring_attention, axis_name="sp", is_causal=args.causal, layout=args.layout,
                              return_work=True)
    spec = PartitionSpec(None, "sp")
    call = jax.jit(jax.shard_map(lambda *a: (lambda o, w: (o, w[None]))(*local(*a)), mesh=mesh,
                                 in_specs=(spec,) * 3, out_specs=(spec, PartitionSpec("sp"))))
    compiled = call.lower(*placed).compile()
    jax.block_until_ready(compiled(*placed))  # warm-up
    peak, times = PeakMemory(), []
    peak.start()
    for _ in range(args.repeats):
        start = time.perf_counter()
        out, work = jax.block_until_ready(compiled(*placed))
        times.append(time.perf_counter() - start)
    extra, peak_rss = peak.stop(), peak_rss_bytes()
    errors = [float(np.abs(np.asarray(s.data) - np.asarray(_reference_rows(q, k, v, order[s.index[1]], args.causal)))
                    .max()) for s in out.addressable_shards]
    result = {"process": args.process_id, "devices": [d.id for d in jax.local_devices()], "global_devices": n,
              "seconds": statistics.median(times), "peak_rss_bytes": peak_rss, "extra_bytes": extra,
              "work_blocks": [float(np.asarray(s.data)[0]) for s in work.addressable_shards],
              "max_abs_error": max(errors)}
    jax.distributed.shutdown()
    return result


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m labkit ring", description=__doc__.split("\n\n")[0])
    p.add_argument("--processes", type=int, default=2, help="processes to launch on this machine (launcher)")
    p.add_argument("--local-devices", type=int, default=2, help="simulated CPU devices per process")
    p.add_argument("--seq", type=int, default=8192, help="total sequence length")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--causal", action="store_true")
    p.add_argument("--layout", default="zigzag", choices=("contiguous", "zigzag"))
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--timeout", type=float, default=600, help="seconds before the launcher gives up")
    p.add_argument("--json", action="store_true", help="print the per-process results as JSON lines")
    p.add_argument("--coordinator", help="worker: HOST:PORT of process 0 (set by the launcher on one machine)")
    p.add_argument("--num-processes", type=int, help="worker: processes in the whole run")
    p.add_argument("--process-id", type=int, help="worker: this process's number, 0..num-processes-1")
    return p


def _worker_argv(args, process_id: int, coordinator: str) -> list[str]:
    argv = [sys.executable, "-m", "labkit.ring", "--coordinator", coordinator, "--num-processes",
            str(args.processes), "--process-id", str(process_id)]
    for name in ("local_devices", "seq", "batch", "heads", "head_dim", "layout", "repeats", "seed"):
        argv += [f"--{name.replace('_', '-')}", str(getattr(args, name))]
    return argv + (["--causal"] if args.causal else [])


def launch(args) -> list[dict]:
    """Start `args.processes` workers on this machine and return their results, process 0 first."""
    coordinator = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    procs = [subprocess.Popen(_worker_argv(args, i, coordinator), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for i in range(args.processes)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=args.timeout))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    results = []
    for i, (proc, (out, err)) in enumerate(zip(procs, outputs)):
        lines = [line for line in out.splitlines() if line.startswith(RESULT_MARKER)]
        if proc.returncode != 0 or not lines:
            raise RuntimeError(f"ring worker {i} failed (exit {proc.returncode}):\n{err[-2000:]}")
        results.append(json.loads(lines[-1][len(RESULT_MARKER):]))
    return results


def run(processes: int = 2, local_devices: int = 2, seq: int = 8192, **options) -> list[dict]:
    """`launch` from Python: the per-process results of one multi-process ring run (options as the flags)."""
    argv = ["--processes", str(processes), "--local-devices", str(local_devices), "--seq", str(seq)]
    for name, value in options.items():
        flag = f"--{name.replace('_', '-')}"
        argv += [flag] if value is True else [] if value is False else [flag, str(value)]
    return launch(_parser().parse_args(argv))


def describe(results: list[dict], args) -> str:
    """The launcher's table: one line per process."""
    lines = [f"ring attention: {len(results)} processes x {args.local_devices} CPU devices = "
             f"{results[0]['global_devices']} devices, seq {args.seq}, batch {args.batch}, {args.heads} heads, "
             f"dim {args.head_dim}, {'causal' if args.causal else 'not causal'}, {args.layout} layout",
             f"{'process':>7}  {'devices':>9}  {'time (ms)':>9}  {'peak RSS (MiB)':>14}  {'extra (MiB)':>11}  "
             f"{'work (blocks per device)':>24}  {'max |ring - exact|':>18}"]
    for r in results:
        work = " ".join(f"{w:g}" for w in r["work_blocks"])
        lines.append(f"{r['process']:>7}  {','.join(map(str, r['devices'])):>9}  {1e3 * r['seconds']:>9.1f}  "
                     f"{r['peak_rss_bytes'] / MIB:>14.0f}  {r['extra_bytes'] / MIB:>11.1f}  {work:>24}  "
                     f"{r['max_abs_error']:>18.1e}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    """Launcher (no --process-id) or worker (with it); 0 when every process matched exact attention."""
    args = _parser().parse_args(argv)
    if args.process_id is not None:
        if not args.coordinator or args.num_processes is None:
            raise SystemExit("a worker needs --coordinator HOST:PORT and --num-processes as well as --process-id")
        print(RESULT_MARKER + json.dumps(run_worker(args)), flush=True)
        return 0
    results = launch(args)
    print("\n".join(json.dumps(r) for r in results) if args.json else describe(results, args))
    worst = max(r["max_abs_error"] for r in results)
    return 0 if worst <= 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
