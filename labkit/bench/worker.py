"""Run one function in a fresh Python process and collect its JSON result and peak memory.

Why a fresh process: JAX caches compiled programs and the allocator keeps freed memory, so a second
measurement in the same process sees the first one's leftovers. Every measurement in labkit goes through
`run_in_worker`: the parent runs `python -c "...worker_main()" MODULE:FUNCTION SPEC_JSON` with its own
interpreter (`sys.executable`), the worker calls `FUNCTION(spec)` and prints one `RESULT_MARKER` line.
`start_worker` / `finish_worker` do the same in two steps, for several workers running at once.

The worker imports the same labkit as the parent: the `sys.path` entry holding the parent's labkit (found with
`importlib.util.find_spec`, so it works from a checkout, an editable install or an installed wheel) goes first
on the worker's `PYTHONPATH`.
"""

from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

from labkit.bench.memory import MIB, peak_rss_bytes

RESULT_MARKER = "LABKIT_BENCH_RESULT "
_WORKER_CODE = "from labkit.bench.worker import worker_main; worker_main()"


@dataclasses.dataclass
class WorkerResult:
    """What a worker sent back: the function's JSON `value`, or `error` saying why there is none."""

    value: Any = None
    error: str | None = None
    peak_rss_mib: float | None = None  # the worker's whole-life resident-set peak
    returncode: int | None = None

    @property
    def ok(self) -> bool:
        """True when the function returned a value."""
        return self.error is None


def labkit_path_entry() -> str:
    """The `sys.path` folder that holds the labkit package this process imported (checkout or site-packages)."""
    spec = importlib.util.find_spec("labkit")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("labkit is not importable as a package in this process")
    return str(Path(list(spec.submodule_search_locations)[0]).resolve().parent)


def worker_env() -> dict[str, str]:
    """This process's environment with the folder holding its labkit first on `PYTHONPATH`."""
    paths = [labkit_path_entry(), os.environ.get("PYTHONPATH")]
    return dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, paths)))


def parse_worker_output(stdout: str) -> dict | None:
    """The payload of a worker's last `RESULT_MARKER` line, or None if there is none (or it is not JSON)."""
    for line in reversed(stdout.splitlines()):
        if line.startswith(RESULT_MARKER):
            try:
                return json.loads(line[len(RESULT_MARKER):])
            except json.JSONDecodeError:
                return None
    return None


def _no_result(returncode: int, stderr: str) -> str:
    """Why a worker that printed no result line stopped: signal or exit code, and its last stderr lines."""
    killed = returncode in (-9, 137)
    reason = "killed by the OS (out of memory?)" if killed else f"exit code {returncode}"
    tail = stderr.strip().splitlines()[-3:]
    return "worker printed no result: " + reason + (": " + " | ".join(tail) if tail else "")


@dataclasses.dataclass
class Worker:
    """A started worker: its process and the files its stdout and stderr go to."""

    process: subprocess.Popen
    stdout: Any  # text files, not pipes: a worker that prints a lot never blocks on a full pipe nobody reads
    stderr: Any

    def output(self) -> tuple[str, str]:
        """What the worker printed to stdout and stderr so far; closes both files."""
        texts = []
        for stream in (self.stdout, self.stderr):
            stream.seek(0)
            texts.append(stream.read())
            stream.close()
        return texts[0], texts[1]


def start_worker(target: str, spec: dict, *, env: dict[str, str] | None = None,
                 pass_fds: tuple[int, ...] = ()) -> Worker:
    """Start a worker calling `target` (`"package.module:function"`) with the JSON-able `spec`; do not wait.

    `env` adds variables to the worker's environment; `pass_fds` are file descriptors it inherits (the pipes of
    `labkit.bench.turns`). Several workers may run at once (e.g. the processes of one distributed run);
    collect each with `finish_worker`.
    """
    command = [sys.executable, "-c", _WORKER_CODE, target, json.dumps(spec)]
    stdout, stderr = tempfile.TemporaryFile("w+"), tempfile.TemporaryFile("w+")
    process = subprocess.Popen(command, stdout=stdout, stderr=stderr, text=True,
                               env={**worker_env(), **(env or {})}, pass_fds=pass_fds)
    return Worker(process, stdout, stderr)


def finish_worker(worker: Worker, *, timeout_s: float = 600) -> WorkerResult:
    """Wait for a started worker (killing it after `timeout_s`) and return what it sent back; never raises."""
    process = worker.process
    try:
        process.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        worker.output()
        return WorkerResult(error=f"timed out after {timeout_s:g} s")
    stdout, stderr = worker.output()
    payload = parse_worker_output(stdout)
    if payload is None:
        return WorkerResult(error=_no_result(process.returncode, stderr), returncode=process.returncode)
    return WorkerResult(payload.get("value"), payload.get("error"), payload.get("peak_rss_mib"), process.returncode)


def run_in_worker(target: str, spec: dict, *, timeout_s: float = 600) -> WorkerResult:
    """Call `target` (`"package.module:function"`) with the JSON-able `spec` in a fresh process; never raises.

    Returns the function's JSON value and the worker's peak resident memory, or an `error`: the function's
    exception (`"TypeName: message"`), a timeout, or a worker that died without printing a result.
    """
    return finish_worker(start_worker(target, spec), timeout_s=timeout_s)


def _jsonable(value: Any) -> Any:
    """numpy / JAX scalars and arrays as plain Python values, for `json.dumps`."""
    if hasattr(value, "tolist"):
        return value.tolist()
    raise TypeError(f"not JSON-serialisable: {type(value).__name__}")


def worker_main(argv: list[str] | None = None) -> None:
    """Worker entry: `argv = [target, spec_json]`; prints one `RESULT_MARKER` line with value or error."""
    target, spec = (sys.argv[1:] if argv is None else argv)[:2]
    module_name, _, function_name = target.partition(":")
    try:
        function = getattr(importlib.import_module(module_name), function_name)
        payload = {"value": function(json.loads(spec))}
    except Exception as error:  # reported, not raised: the parent turns it into a failed measurement
        payload = {"error": f"{type(error).__name__}: {error}"}
    payload["peak_rss_mib"] = peak_rss_bytes() / MIB
    print(RESULT_MARKER + json.dumps(payload, default=_jsonable), flush=True)
