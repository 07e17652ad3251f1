"""Run one submitted notebook in a fresh, limited kernel and collect its functions' outputs on given inputs.

`run_submission` starts the learner's kernel with `labkit.grading.sandbox.kernel` (own process group and
pids cgroup, memory limit, no network, its own PID namespace, writes confined to a scratch directory that is
also its working directory and HOME, reads confined to that directory, Python and labkit, a minimal
environment; it talks to the grader over Unix sockets, since it has no network), executes the learner's
code cells with nbclient (per-cell time limit, errors recorded, not fatal), then for each exercise runs `kernel_side.serve` in that kernel and reads the
outputs back. If the kernel dies while running a learner cell (`os._exit`, a crash), a fresh kernel runs
the notebook again without that cell (and without cells that timed out). A cell that raises MemoryError
is skipped the same way: IPython keeps the failed frame (and the memory it holds) alive, so the kernel
would go on failing. If the kernel dies while an exercise is being run, that exercise scores nothing and
the others are run in a fresh kernel. A watchdog kills the kernel when the notebook's own
time limit is up. The processes a cell or an exercise started are killed when it ends (a fork bomb, a
child left in the background); afterwards every process of the submission is killed and the scratch
directory removed.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import pickle
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import nbformat
from nbclient import NotebookClient
from nbclient.exceptions import DeadKernelError
from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager

from labkit.grading.sandbox import kernel_side, processes
from labkit.grading.sandbox.kernel import SANDBOX_VARIABLE
from labkit.grading.safe_call import CallResult

KERNEL_NAME = "labkit-grading"
MAX_KERNELS = 3  # kernels started per submission: the first run plus two restarts after crashes
TOKEN_VARIABLE = "LABKIT_GRADING_TOKEN"
# What a kernel may read besides its scratch directory, Python and labkit: system libraries and the few
# configuration files libc, TensorFlow and matplotlib open (not all of /etc: as root it holds secrets).
SYSTEM_READABLE = (
    "/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin", "/dev", "/proc", "/sys",
    *(f"/etc/{name}" for name in (
        "ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "timezone", "passwd", "group", "nsswitch.conf",
        "hosts", "host.conf", "resolv.conf", "gai.conf", "os-release", "mime.types", "ssl", "ca-certificates",
        "pki", "fonts", "alternatives", "jupyter", "ipython", "matplotlibrc")),
)


@dataclasses.dataclass
class Limits:
    """Time and memory limits for one submission."""

    notebook_timeout: float = 300.0
    cell_timeout: float = 120.0
    case_timeout: float | None = None  # default: each exercise's own limit
    memory_bytes: int | None = 4 << 30
    startup_timeout: float = 60.0
    max_processes: int = 512  # processes and threads of one submission (a Trax kernel uses about 100)
    confine_reads: bool = True


@dataclasses.dataclass
class Job:
    """One exercise to run in the kernel: the learner's name for the candidate and the cases' inputs."""

    exercise_id: str
    function_name: str
    inputs: list[tuple[tuple, dict]]
    timeout: float


@dataclasses.dataclass
class ExerciseRun:
    """What the kernel reported for one exercise."""

    candidate: dict | None = None  # kernel_side's description of the learner's object
    calls: list[tuple[CallResult, int | None] | None] = dataclasses.field(default_factory=list)
    crashed: bool = False  # the kernel died while this exercise ran
    not_run: str = ""  # why it never ran (kernel crashed earlier, notebook time limit, ...)


@dataclasses.dataclass
class Execution:
    """The outcome of running one notebook: per-cell problems and per-exercise results."""

    exercises: dict[str, ExerciseRun] = dataclasses.field(default_factory=dict)
    cell_errors: list[tuple[int, str]] = dataclasses.field(default_factory=list)  # (cell index, exception name)
    timed_out_cells: list[int] = dataclasses.field(default_factory=list)
    crashed_cells: list[int] = dataclasses.field(default_factory=list)
    notebook_timed_out: bool = False
    kernels_started: int = 0
    confined: bool | None = None  # whether the kernel reported Landlock write confinement
    sandbox: dict = dataclasses.field(default_factory=dict)  # what the kernel reported in place (kernel.py)
    seconds: float = 0.0


class _FreshKernel(Exception):
    """Raised to leave a kernel that cannot be trusted any more (a cell exhausted its memory)."""


_LOG = logging.getLogger("labkit.grading.kernel")
_LOG.addHandler(logging.NullHandler())
_LOG.propagate = False  # nbclient logs each time-out as an error; the gradebook reports them instead


class _Client(NotebookClient):
    """nbclient's client that remembers which cells timed out."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.timed_out_cells: list[int] = []
        self.current_index = -1

    async def _async_handle_timeout(self, timeout, cell=None):
        self.timed_out_cells.append(self.current_index)
        return await super()._async_handle_timeout(timeout, cell)


def minimal_env(scratch: Path, token: str, python_path: Path | None = None) -> dict[str, str]:
    """The kernel's whole environment: no instructor variables, HOME and TMPDIR in the scratch directory,
    labkit importable from `python_path` (default: the folder that holds labkit)."""
    import labkit

    labkit_root = str(python_path or Path(labkit.__file__).resolve().parents[1])
    return {
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), "/usr/local/bin", "/usr/bin", "/bin"]),
        "HOME": str(scratch), "TMPDIR": str(scratch), "LANG": "C.UTF-8", "PYTHONPATH": labkit_root,
        "PYTHONDONTWRITEBYTECODE": "1", "IPYTHONDIR": str(scratch / ".ipython"),
        "MPLCONFIGDIR": str(scratch / ".matplotlib"), "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3",
        TOKEN_VARIABLE: token,
    }


def readable_paths(workdir: Path) -> list[str]:
    """What a kernel may read: its work directory, the Python installation, labkit, system libraries."""
    import site

    import labkit

    python = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix, *site.getsitepackages()}
    labkit_dir = str(Path(labkit.__file__).resolve().parent)
    return sorted(python | {labkit_dir, str(workdir)} | set(SYSTEM_READABLE))


def _labkit_path(workdir: Path) -> Path:
    """A folder holding only a link to labkit, for PYTHONPATH: the folder labkit sits in (a checkout,
    with tests and submissions next to it) stays unreadable."""
    import labkit

    folder = workdir / "python-path"
    folder.mkdir()
    (folder / "labkit").symlink_to(Path(labkit.__file__).resolve().parent, target_is_directory=True)
    return folder


def _write_kernelspec(directory: Path, limits: Limits, workdir: Path, cgroup: Path | None) -> None:
    scratch = workdir / "scratch"
    argv = [sys.executable, "-m", "labkit.grading.sandbox.kernel", "--memory", str(limits.memory_bytes or 0),
            "--writable", str(scratch), "--writable", str(workdir / "ipc"),
            "--max-processes", str(limits.max_processes)]
    if limits.confine_reads:
        argv += [item for path in readable_paths(workdir) for item in ("--readable", path)]
    if cgroup is not None:
        argv += ["--pids-cgroup", str(cgroup)]
    spec_dir = directory / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    (spec_dir / "kernel.json").write_text(json.dumps(
        {"argv": argv + ["-f", "{connection_file}"], "display_name": "labkit grading", "language": "python"}),
        encoding="utf-8")


def _processes_with_token(token: str) -> list[int]:
    """Pids of live processes whose environment carries `token` (children that left the process group)."""
    needle = f"{TOKEN_VARIABLE}={token}".encode()
    pids = []
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit() and int(entry.name) != os.getpid():
            try:
                if needle in (entry / "environ").read_bytes().split(b"\0"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def kill_everything(pgid: int | None, token: str) -> None:
    """Kill the kernel's process group and any process still carrying the submission's token."""
    if pgid and pgid != os.getpgrp():
        try:
            os.killpg(pgid, signal.SIGKILL)
        except OSError:
            pass
    for _ in range(3):
        pids = _processes_with_token(token)
        if not pids:
            return
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        time.sleep(0.1)


def _remove_tree(path: Path) -> None:
    """Remove the scratch directory even if the learner made parts of it read-only."""
    def make_writable_and_retry(function, name, _exc):
        try:
            os.chmod(os.path.dirname(name), 0o700)
            os.chmod(name, 0o700)
            function(name)
        except OSError:
            pass
    shutil.rmtree(path, onexc=make_writable_and_retry) if sys.version_info >= (3, 12) else \
        shutil.rmtree(path, onerror=make_writable_and_retry)


def _cell_error(cell: nbformat.NotebookNode) -> str | None:
    for output in cell.get("outputs", []):
        if output.get("output_type") == "error":
            return str(output.get("ename", "error"))
    return None


class _Kernel:
    """One kernel's lifetime: start, run cells, report death, and be killed for good."""

    def __init__(self, workdir: Path, limits: Limits, token: str, number: int, cgroup: Path | None = None):
        self.token, self.cgroup = token, cgroup
        spec_dir, scratch = workdir / "kernels", workdir / "scratch"
        # Unix sockets, not TCP: the kernel has a network namespace of its own, without the grader in it.
        self.km = AsyncKernelManager(kernel_name=KERNEL_NAME, transport="ipc", ip=str(workdir / "ipc" / f"k{number}"),
                                     kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(spec_dir)]))
        self.km.connection_file = str(spec_dir / f"connection-{uuid.uuid4().hex}.json")
        self.client = _Client(nbformat.v4.new_notebook(), km=self.km, timeout=int(limits.cell_timeout),
                              startup_timeout=int(limits.startup_timeout), allow_errors=True,
                              interrupt_on_timeout=True, record_timing=False, kernel_name=KERNEL_NAME,
                              error_on_timeout={"ename": "CellTimeout", "evalue": "the cell ran out of time",
                                                "traceback": []}, log=_LOG)
        self.scratch, self.env = scratch, minimal_env(scratch, token, workdir / "python-path")
        self.pgid: int | None = None
        self.process = None
        self._context = None
        self.keep: set[int] = set()  # the launcher, the PID namespace's init and the kernel itself

    def start(self) -> None:
        self._context = self.client.setup_kernel(cwd=str(self.scratch), env=self.env,
                                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self._context.__enter__()
        self.process = getattr(self.km.provisioner, "process", None)
        if self.process is not None:
            try:
                self.pgid = os.getpgid(self.process.pid)
            except OSError:
                self.pgid = None

    def probe(self) -> dict:
        """What the sandbox put in place (kernel.py's report), and which processes are the kernel's own."""
        cell = self.run(f'import os as _o; print(_o.environ.get("{SANDBOX_VARIABLE}", "{{}}")); '
                        'print(_o.readlink("/proc/self"))', -1, 30)
        lines = "".join(o.get("text", "") for o in cell.get("outputs", [])).splitlines()
        try:
            report, kernel_pid = json.loads(lines[0]), int(lines[1])
        except (IndexError, ValueError):
            return {}
        if self.process is not None:
            self.keep = processes.lineage(kernel_pid, self.process.pid)
        return report if isinstance(report, dict) else {}

    def stop_children(self) -> None:
        """Kill what the learner's code started (below the kernel, or orphaned in its namespace), and wait
        until the pids cgroup has room again: the next cell must be able to start threads."""
        if self.process is None or not self.keep:
            return
        killed = processes.kill_descendants(self.process.pid, self.keep)
        for pid in _processes_with_token(self.token):
            if pid not in self.keep:
                killed += 1
                try:
                    os.kill(pid, signal.SIGKILL)
                except OSError:
                    pass
        if killed:
            self.run(_REAP_SOURCE, -1, 30)
            processes.wait_for_tasks(self.cgroup, self.keep, timeout=10.0)

    def run(self, source: str, index: int, timeout: float) -> nbformat.NotebookNode:
        """Execute `source` as cell `index` with `timeout` seconds; raises DeadKernelError if the kernel dies."""
        cell = nbformat.v4.new_code_cell(source)
        self.client.current_index = index
        self.client.timeout = max(int(timeout), 1)
        self.client.nb.cells = [cell]
        self.client.execute_cell(cell, 0)
        return cell

    def kill(self) -> None:
        kill_everything(self.pgid, self.token)
        if self._context is not None:
            try:
                self._context.__exit__(None, None, None)
            except Exception:  # noqa: BLE001 - the kernel is already dead; only its client is being closed
                pass
            self._context = None
        kill_everything(self.pgid, self.token)
        if self.process is not None:
            try:
                self.process.wait(timeout=10)  # reap it: no zombie per submission
            except Exception:  # noqa: BLE001 - already reaped by jupyter_client, or unkillable
                pass


_REAP_SOURCE = '__import__("labkit.grading.sandbox.kernel_side", fromlist=["reap_children"]).reap_children()\n'


def _harness_source(job_file: Path) -> str:
    return f'__import__("labkit.grading.sandbox.kernel_side", fromlist=["serve"]).serve({str(job_file)!r}, globals())\n'


def _prepare_jobs(scratch: Path, jobs: list[Job]) -> list[tuple[Job, Path, Path]]:
    """Write every case's inputs and a job file per exercise into the scratch directory."""
    exchange = scratch / ".labkit-grading"
    prepared = []
    for number, job in enumerate(jobs):
        requests, results = exchange / f"{number}-in", exchange / f"{number}-out"
        requests.mkdir(parents=True)
        results.mkdir()
        paths = []
        for index, inputs in enumerate(job.inputs):
            path = requests / f"case{index}.pkl"
            path.write_bytes(pickle.dumps(inputs))
            paths.append(str(path))
        job_file = exchange / f"{number}.json"
        job_file.write_text(json.dumps({"exercise": job.exercise_id, "name": job.function_name, "cases": paths,
                                        "timeout": job.timeout, "results": str(results)}), encoding="utf-8")
        prepared.append((job, job_file, results))
    return prepared


def _collect(results: Path, job: Job) -> ExerciseRun:
    run = ExerciseRun(candidate=kernel_side.read_candidate(results))
    run.calls = [kernel_side.read_case(results, index) for index in range(len(job.inputs))]
    return run


@dataclasses.dataclass
class _State:
    """One submission's run in progress, across the kernels it takes."""

    workdir: Path
    limits: Limits
    token: str
    deadline: float
    pending: list[tuple[Job, Path, Path]]
    cgroup: Path | None = None
    execution: Execution = dataclasses.field(default_factory=Execution)
    skip: set[int] = dataclasses.field(default_factory=set)


def _run_cells_and_jobs(kernel: _Kernel, state: _State, cells: list[tuple[int, str]], current: list) -> None:
    """In a started kernel: every learner cell not skipped, then every pending job; `current` says where."""
    execution, limits = state.execution, state.limits
    execution.sandbox = kernel.probe()
    execution.confined = bool(execution.sandbox.get("writes"))
    for index, source in cells:
        if index in state.skip:
            continue
        current[:] = ["cell", index]
        cell = kernel.run(source, index, limits.cell_timeout)
        kernel.stop_children()
        error = _cell_error(cell)
        timed_out = index in kernel.client.timed_out_cells
        if error and not timed_out and index not in dict(execution.cell_errors):
            execution.cell_errors.append((index, error))
        if error == "MemoryError" and execution.kernels_started < MAX_KERNELS:
            state.skip.add(index)
            raise _FreshKernel
    for entry in list(state.pending):
        job, job_file, results = entry
        current[:] = ["job", job.exercise_id]
        kernel.run(_harness_source(job_file), -1, len(job.inputs) * job.timeout + limits.cell_timeout)
        kernel.stop_children()
        execution.exercises[job.exercise_id] = _collect(results, job)
        state.pending.remove(entry)


def _after_death(state: _State, current: list) -> bool:
    """Record what the kernel was doing when it died; False if there is no point in another kernel."""
    execution = state.execution
    if time.monotonic() >= state.deadline - 0.5:
        execution.notebook_timed_out = True
    elif current[0] == "cell":
        state.skip.add(current[1])
        execution.crashed_cells.append(current[1])
    elif current[0] == "job":
        entry = next(e for e in state.pending if e[0].exercise_id == current[1])
        run = _collect(entry[2], entry[0])
        run.crashed = True
        execution.exercises[current[1]] = run
        state.pending.remove(entry)
    else:
        return False  # the kernel did not even start: retrying would fail the same way
    return True


def _one_kernel(state: _State, cells: list[tuple[int, str]]) -> bool:
    """Start a kernel and go as far as it lets us; False when no further kernel should be started."""
    execution = state.execution
    kernel = _Kernel(state.workdir, state.limits, state.token, execution.kernels_started, state.cgroup)
    timer = threading.Timer(max(state.deadline - time.monotonic(), 0.1),
                            lambda k=kernel: kill_everything(k.pgid, state.token))
    timer.daemon = True
    execution.kernels_started += 1
    current = ["start", -1]
    try:
        timer.start()
        kernel.start()
        _run_cells_and_jobs(kernel, state, cells, current)
    except _FreshKernel:
        pass
    except DeadKernelError:
        return _after_death(state, current)
    except Exception:  # noqa: BLE001 - nbclient/zmq trouble: stop, the caller reports it
        if time.monotonic() < state.deadline - 0.5:
            raise
        execution.notebook_timed_out = True
    finally:
        timer.cancel()
        execution.timed_out_cells = sorted(set(execution.timed_out_cells) | set(kernel.client.timed_out_cells))
        state.skip.update(execution.timed_out_cells)  # in a fresh kernel it would only time out again
        kernel.kill()
    return True


def _make_workdir(limits: Limits, token: str) -> tuple[Path, Path | None]:
    """The submission's private folder (scratch, kernel spec, sockets, labkit link) and its pids cgroup."""
    workdir = Path(tempfile.mkdtemp(prefix="labkit-grade-"))
    os.chmod(workdir, 0o700)
    for name in ("scratch", "ipc"):
        (workdir / name).mkdir()
    _labkit_path(workdir)
    cgroup = processes.create_pids_cgroup(f"labkit-grade-{token}", limits.max_processes)
    _write_kernelspec(workdir / "kernels", limits, workdir, cgroup)
    return workdir, cgroup


def run_submission(cells: list[tuple[int, str]], jobs: list[Job], limits: Limits) -> Execution:
    """Run the learner's code cells (`(cell number, source)` in order), then every job.

    Learner code cannot make this raise; an error of the grading machinery itself (nbclient, zmq) can.
    """
    started = time.monotonic()
    token = uuid.uuid4().hex
    workdir, cgroup = _make_workdir(limits, token)
    state = _State(workdir, limits, token, started + limits.notebook_timeout, [], cgroup)
    try:
        state.pending = _prepare_jobs(workdir / "scratch", jobs)
        while (state.pending and state.execution.kernels_started < MAX_KERNELS
               and not state.execution.notebook_timed_out and _one_kernel(state, cells)):
            pass
        reason = ("the notebook ran out of time" if state.execution.notebook_timed_out
                  else "the kernel kept dying before this exercise ran")
        for job, _, _ in state.pending:
            state.execution.exercises[job.exercise_id] = ExerciseRun(not_run=reason)
    finally:
        kill_everything(None, token)
        processes.remove_pids_cgroup(cgroup)
        _remove_tree(workdir)
    state.execution.sandbox["cgroup"] = cgroup is not None
    state.execution.seconds = time.monotonic() - started
    return state.execution
