"""Start an IPython kernel for one submission inside limits: `python -m labkit.grading.sandbox.kernel ...`.

Batch grading (`labkit.grading.batch`) launches each learner's kernel through this module. Before the
kernel imports anything it

* starts a new session, so the grader can kill the kernel and every process it forked as one group, and
  joins the submission's pids cgroup where the grader made one (a cap on processes and threads);
* caps the address space (RLIMIT_AS: allocations beyond it raise MemoryError), core dumps and file sizes;
* enters new network and PID namespaces (`namespaces`): no network but a loopback of its own, and every
  process it starts dies with it; without a pids cgroup, a non-root grader caps processes with
  RLIMIT_NPROC inside its user namespace;
* on Linux >= 5.13, uses Landlock (`landlock`) so that it and everything it starts may write only in the
  submission's scratch directory and read only there, in the Python installation, labkit and the system
  libraries; without a network namespace, TCP connections are refused (Landlock ABI >= 4).

What was in place is published to the kernel as `LABKIT_GRADING_SANDBOX` (JSON), which the grader reads.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys

from labkit.grading.sandbox import landlock, namespaces, processes

FILE_SIZE_LIMIT = 1 << 30
SANDBOX_VARIABLE = "LABKIT_GRADING_SANDBOX"


def landlock_abi() -> int:
    """The kernel's Landlock ABI version, or 0 where Landlock is unavailable."""
    return landlock.abi()


def apply_limits(memory_bytes: int | None, writable: list[str], readable: list[str] | None = None,
                 pids_cgroup: str | None = None, max_processes: int = 0) -> dict:
    """Session, cgroup, rlimits, namespaces, Landlock, in that order; returns what is in place.

    Must run while the process is still single-threaded (user and PID namespaces require it). With a PID
    namespace this forks: only the innermost process returns, the others wait for it.
    """
    if os.getpid() != os.getpgrp():
        os.setsid()
    namespaces.die_with_parent()  # a grader that is killed takes its kernels with it
    report = {"processes": "cgroup" if pids_cgroup and processes.join(pids_cgroup) else ""}
    if memory_bytes:
        resource.setrlimit(resource.RLIMIT_AS, (memory_bytes, memory_bytes))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    resource.setrlimit(resource.RLIMIT_FSIZE, (FILE_SIZE_LIMIT, FILE_SIZE_LIMIT))
    report["namespaces"] = namespaces.enter()
    if not report["processes"] and max_processes and report["namespaces"].startswith("user"):
        # Counted per user namespace since Linux 5.14, and ignored for the host's root: only here it bites.
        resource.setrlimit(resource.RLIMIT_NPROC, (max_processes, max_processes))
        report["processes"] = "rlimit"
    report.update(landlock.restrict(writable, readable, block_tcp=not report["namespaces"]))
    if report["namespaces"]:
        namespaces.run_as_init()
    return report


def main(argv: list[str] | None = None) -> None:
    """Apply the limits, then run ipykernel with the remaining arguments (`-f CONNECTION_FILE`)."""
    parser = argparse.ArgumentParser(prog="python -m labkit.grading.sandbox.kernel")
    parser.add_argument("--memory", type=int, default=0, help="address-space limit in bytes (0: none)")
    parser.add_argument("--writable", action="append", default=[], help="directory the kernel may write in")
    parser.add_argument("--readable", action="append", help="path the kernel may read (default: all)")
    parser.add_argument("--pids-cgroup", help="cgroup directory to join (made by the grader)")
    parser.add_argument("--max-processes", type=int, default=0, help="process limit without a cgroup")
    args, rest = parser.parse_known_args(argv)
    report = apply_limits(args.memory or None, args.writable, args.readable, args.pids_cgroup, args.max_processes)
    os.environ[SANDBOX_VARIABLE] = json.dumps(report, sort_keys=True)
    if report["namespaces"]:
        # ipykernel would take its parent (pid 1 of the namespace) for init and quit; it dies with it anyway.
        os.environ.pop("JPY_PARENT_PID", None)
    from ipykernel import kernelapp

    sys.argv = [sys.argv[0], *rest]
    kernelapp.launch_new_instance()


if __name__ == "__main__":
    main()
