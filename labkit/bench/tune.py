"""`python -m labkit bench --tune`: the fastest chunk sizes of `memory_efficient_attention` on this machine, cached.

A short sweep (about a minute on an idle 2-core machine with the defaults): for each sequence length, a few
square and oblong `(query_chunk_size, key_chunk_size)` candidates, forward pass only (the backward pass walks
the same blocks, at 2.5x the forward's cost per block, so timing it would only make the sweep longer), each
compiled once, timed in interleaved rounds (so a burst of load on a shared machine hits every candidate) and
scored by its best round. All candidates run in one fresh worker process. The winner per CPU model and shape
class is merged into `labkit.attention.chunk_sizes`'s JSON cache, which `memory_efficient_attention` reads when
it is given no chunk sizes.
"""

from __future__ import annotations

import functools
import time

from labkit.attention import chunk_sizes
from labkit.bench.worker import run_in_worker

# 256-wide blocks were 1.5-2x slower than 512-wide ones on both CPUs measured so far: not worth the time here.
CANDIDATES = ((512, 512), (1024, 1024), (512, 1024), (1024, 512))
SEQ_LENS = (4096, 16384)


def time_candidates(spec: dict) -> dict:
    """Worker side: `{"<qc>x<kc>": best seconds}` for one length (spec: seq, heads, head_dim, candidates, rounds).

    Stops starting new rounds once `budget_s` has passed (every candidate has at least one round by then).
    """
    import jax
    import jax.numpy as jnp
    import numpy as np

    from labkit.attention.chunked import memory_efficient_attention

    rng = np.random.default_rng(0)
    shape = (1, spec["seq"], spec["heads"], spec["head_dim"])
    q, k, v = (jnp.asarray(rng.standard_normal(shape, dtype=np.float32)) for _ in range(3))
    steps = {}
    for qc, kc in spec["candidates"]:
        attend = functools.partial(memory_efficient_attention, query_chunk_size=qc, key_chunk_size=kc)
        compiled = jax.jit(attend).lower(q, k, v).compile()
        jax.block_until_ready(compiled(q, k, v))  # warm-up
        steps[f"{qc}x{kc}"] = compiled
    best, started = {name: float("inf") for name in steps}, time.perf_counter()
    for round_ in range(spec["rounds"]):
        if round_ and time.perf_counter() - started > spec["budget_s"]:
            break
        for name, compiled in steps.items():
            t0 = time.perf_counter()
            jax.block_until_ready(compiled(q, k, v))
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def tune(seq_lens=SEQ_LENS, *, heads: int = 4, head_dim: int = 64, candidates=CANDIDATES, rounds: int = 2,
         budget_s: float = 30, timeout_s: float = 300, cache_path=None) -> dict:
    """Time `candidates` at each length in a worker, cache the winners; returns `{seq: {"qxk": s, ...}, ...}`."""
    results, entries, cpu = {}, {}, chunk_sizes.cpu_model()
    for seq in seq_lens:
        fitting = list(dict.fromkeys((min(qc, seq), min(kc, seq)) for qc, kc in candidates))  # as the call clips
        spec = {"seq": seq, "heads": heads, "head_dim": head_dim, "candidates": fitting, "rounds": rounds,
                "budget_s": budget_s}
        done = run_in_worker("labkit.bench.tune:time_candidates", spec, timeout_s=timeout_s)
        if not done.ok:
            raise RuntimeError(f"tuning at seq {seq} failed: {done.error}")
        results[seq] = done.value
        winner = min(done.value, key=done.value.get)
        entries[chunk_sizes.entry_name(cpu, head_dim, seq)] = [int(x) for x in winner.split("x")]
    path = chunk_sizes.write_entries(entries, cache_path)
    return {"cpu": cpu, "path": str(path), "times_s": results, "chosen": entries}


def report(tuned: dict) -> str:
    """Plain text: each length's candidates (ms), the choice, and where it was written."""
    lines = [f"chunk sizes for {tuned['cpu']} (forward, best round, ms):"]
    for seq, times in tuned["times_s"].items():
        winner = min(times, key=times.get)
        cells = "  ".join(f"{name} {t * 1e3:.0f}" for name, t in sorted(times.items(), key=lambda kv: kv[1]))
        lines.append(f"  seq {seq:>6}: {cells}  -> {winner}")
    lines.append(f"cached in {tuned['path']}")
    return "\n".join(lines)
