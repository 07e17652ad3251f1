"""The parent's side: decide whether a point can run here, then measure it in a fresh worker process.

Before launching, each point's need is estimated from its memory model and compared with `psutil`'s
available memory: a point that would not fit is reported as `skipped` (need vs available), never launched to
be killed. So is a point whose framework is not installed, or whose implementation has no such causal form.
`measure_together` measures several implementations at one length with their workers taking turns call by
call (`labkit.bench.turns`), so that their time ratios survive a machine whose speed drifts.
"""

from __future__ import annotations

import importlib
from typing import Iterable

from labkit.attention import Problem
from labkit.bench.implementations import IMPLEMENTATIONS, Implementation
from labkit.bench.measurement import Measurement
from labkit.bench.memory import MIB, available_bytes
from labkit.bench.turns import TurnTaker
from labkit.bench.worker import WorkerResult, finish_worker, run_in_worker, start_worker

# Interpreter + jax + compiled program: what a worker holds before the measured calls.
PROCESS_OVERHEAD_BYTES = 600 * MIB
POINT = "labkit.bench.point:run_point"  # what a worker runs to measure one point


def estimate_need_bytes(impl: str, problem: Problem, options: dict | None = None) -> int:
    """Estimated peak resident bytes of a worker measuring `impl` at `problem` (process overhead included)."""
    return IMPLEMENTATIONS[impl].memory(problem, options or {}) + problem.io_bytes + PROCESS_OVERHEAD_BYTES


def _why_not_here(impl: str, implementation: Implementation, causal: bool) -> str | None:
    """Why `implementation` cannot run in this environment with this `causal`, or None if it can."""
    if causal not in implementation.causal:
        return f"{impl} has no {'causal' if causal else 'non-causal'} form (is_causal in {implementation.causal})"
    for module in implementation.requires:
        try:
            importlib.import_module(module)
        except Exception as error:  # any import failure means "not available here"
            return f"{module} is not importable ({type(error).__name__}: {error})"
    return None


def _fits(result: Measurement) -> bool:
    """Fill in `need_mib` / `available_mib`; mark the point skipped if it would not fit in memory."""
    need, available = estimate_need_bytes(result.impl, result.problem, result.options), available_bytes()
    result.need_mib, result.available_mib = need / MIB, available / MIB
    if need > 0.9 * available:
        result.status = "skipped"
        result.message = f"needs ~{need / MIB:,.0f} MiB, {available / MIB:,.0f} MiB available"
        return False
    return True


def options_for(impl: str, options: dict) -> dict:
    """The options `impl` gets: every plain `name`, and `"impl:name"` ones for this implementation only."""
    mine = {name: value for name, value in options.items() if ":" not in name}
    for name, value in options.items():
        owner, _, option = name.partition(":")
        if option and owner == impl:
            mine[option] = value
    return mine


def measure(impl: str, seq_len: int, *, batch: int = 1, heads: int = 4, head_dim: int = 64, causal: bool = False,
            backward: bool = False, repeats: int = 5, warmup: int = 1, timeout_s: float = 600,
            **impl_options) -> Measurement:
    """Measure `impl` at one sequence length in a fresh subprocess; never raises for a failed point.

    Inputs are `[batch, seq_len, heads, head_dim]` float32 (keys as long as the queries); `impl_options` go
    to the implementation (`options_for`: a name `"IMPL:option"` only to IMPL). Returns a `Measurement` with
    status `ok` (time_s = median of `repeats` after `warmup` calls, gflops, peak_extra_mib), `skipped` (not
    installed, no such causal form, or estimated need > available memory: see need_mib, available_mib,
    message) or `failed` (message).
    """
    _known([impl])
    result = Measurement(impl, seq_len, batch, heads, head_dim, causal, backward, options_for(impl, impl_options))
    reason = _why_not_here(impl, IMPLEMENTATIONS[impl], causal)
    if reason:
        result.status, result.message = "skipped", reason
        return result
    if not _fits(result):
        return result
    spec = {**result.to_dict(), "repeats": repeats, "warmup": warmup}
    return _record(result, run_in_worker(POINT, spec, timeout_s=timeout_s))


def measure_together(impls: Iterable[str], seq_len: int, *, batch: int = 1, heads: int = 4, head_dim: int = 64,
                     causal: bool = False, backward: bool = False, repeats: int = 5, warmup: int = 1,
                     timeout_s: float = 600, **impl_options) -> list[Measurement]:
    """`measure` several implementations at one length, their workers alive at once and taking turns call by call.

    A drift in the machine's speed then reaches every implementation alike, so their time ratios hold within
    one run (`labkit.bench.turns`). Memory is still each worker's own. Where the workers would not fit in
    memory together, they are measured one after the other instead.
    """
    results = [Measurement(impl, seq_len, batch, heads, head_dim, causal, backward,
                           options_for(impl, impl_options)) for impl in _known(impls)]
    runnable = []
    for result in results:
        reason = _why_not_here(result.impl, IMPLEMENTATIONS[result.impl], causal)
        if reason:
            result.status, result.message = "skipped", reason
        else:
            runnable.append(result)
    kw = dict(batch=batch, heads=heads, head_dim=head_dim, causal=causal, backward=backward, repeats=repeats,
              warmup=warmup, timeout_s=timeout_s, **impl_options)
    needs, available = [estimate_need_bytes(r.impl, r.problem, r.options) for r in runnable], available_bytes()
    if len(runnable) < 2 or sum(needs) > 0.9 * available:
        measured = {r.impl: measure(r.impl, seq_len, **kw) for r in runnable}
        return [measured.get(r.impl, r) for r in results]
    turns = TurnTaker(len(runnable))
    workers = []
    for index, result in enumerate(runnable):
        spec = {**result.to_dict(), "repeats": repeats, "warmup": warmup, "turn_fds": turns.worker_fds(index)}
        workers.append(start_worker(POINT, spec, pass_fds=turns.worker_fds(index)))
    turns.close_worker_ends()
    turns.run(warmup + repeats, timeout_s)
    for result, worker, need in zip(runnable, workers, needs):
        result.need_mib, result.available_mib = need / MIB, available / MIB
        _record(result, finish_worker(worker, timeout_s=timeout_s))
    return results


def _known(impls: Iterable[str]) -> list[str]:
    """The names, checked against `IMPLEMENTATIONS`."""
    impls = list(impls)
    for impl in impls:
        if impl not in IMPLEMENTATIONS:
            raise ValueError(f"impl must be one of {sorted(IMPLEMENTATIONS)}, got {impl!r}")
    return impls


def _record(result: Measurement, done: WorkerResult) -> Measurement:
    """`result` filled in from a finished worker: its fields, or `failed` with the worker's error."""
    if not done.ok:
        result.status, result.message = "failed", done.error
        return result
    for name, value in done.value.items():
        setattr(result, name, value)
    return result


def sweep(impls: Iterable[str], seq_lens: Iterable[int], *, progress: bool = True, together: bool = False,
          **kw) -> list[Measurement]:
    """`measure` every implementation at every length (lengths in the outer loop), with a tqdm bar.

    `together=True`: the implementations at each length are measured at once, taking turns (`measure_together`).
    """
    from tqdm.auto import tqdm

    impls = list(impls)
    if together:
        results = []
        for n in tqdm(list(seq_lens), desc="bench", unit="length", disable=not progress):
            results += measure_together(impls, n, **kw)
        return results
    points = [(impl, n) for n in seq_lens for impl in impls]
    results = []
    with tqdm(points, desc="bench", unit="point", disable=not progress) as bar:
        for impl, n in bar:
            bar.set_postfix_str(f"{impl} @ {n}")
            results.append(measure(impl, n, **kw))
    return results
