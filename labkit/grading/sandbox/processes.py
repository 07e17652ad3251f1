"""How many processes a learner's kernel may have, and making sure none of them outlives its turn.

A pids cgroup (`pids.max`: a fork bomb gets EAGAIN instead of the machine) is made per submission where the
grader may create one (root, or a delegated cgroup; v1 `pids` hierarchy or v2). `descendants` finds the
processes a kernel started, through parent links in /proc, so they can be killed after each cell.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

_CGROUP_ROOTS = ("/sys/fs/cgroup/pids", "/sys/fs/cgroup")


def create_pids_cgroup(name: str, max_processes: int) -> Path | None:
    """A fresh cgroup limited to `max_processes` tasks (threads count), or None where none can be made."""
    for root in map(Path, _CGROUP_ROOTS):
        if not (root / "cgroup.procs").is_file():
            continue
        group = root / name
        try:
            group.mkdir()
        except OSError:
            continue
        try:
            (group / "pids.max").write_text(str(max_processes))
            return group
        except OSError:
            group.rmdir()
    return None


def join(group: str) -> bool:
    """Move the calling process (and so its future children) into `group`."""
    try:
        Path(group, "cgroup.procs").write_text(str(os.getpid()))
        return True
    except OSError:
        return False


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass


def _cgroup_pids(group: Path) -> list[int]:
    try:
        return [int(line) for line in (group / "cgroup.procs").read_text().split()]
    except (OSError, ValueError):
        return []


def remove_pids_cgroup(group: Path | None) -> None:
    """Kill every process left in `group`, then remove it."""
    if group is None:
        return
    for _ in range(50):  # a fork bomb refills the group while it is being emptied: pids.max bounds it
        pids = _cgroup_pids(group)
        if not pids:
            break
        _kill_all(pids)
        time.sleep(0.05)
    try:
        group.rmdir()
    except OSError:
        pass


def _parents() -> dict[int, int]:
    """pid -> parent pid of every live, non-zombie process (from /proc/PID/stat)."""
    parents = {}
    for entry in Path("/proc").iterdir() if Path("/proc").is_dir() else []:
        if entry.name.isdigit():
            try:
                state, parent = (entry / "stat").read_text().rsplit(")", 1)[1].split()[:2]
                if state != "Z":  # a zombie is already dead; killing it again would never end
                    parents[int(entry.name)] = int(parent)
            except (OSError, ValueError, IndexError):
                continue
    return parents


def lineage(pid: int, root: int) -> set[int]:
    """`pid` and its ancestors up to `root`, both included; {pid, root} when `root` is not above it."""
    parents, chain = _parents(), [pid]
    while chain[-1] != root and chain[-1] in parents and len(chain) < 64:
        chain.append(parents[chain[-1]])
    return set(chain) if chain[-1] == root else {pid, root}


def descendants(root: int) -> list[int]:
    """Every live process below `root` in the process tree (children, their children, ...)."""
    parents = _parents()
    children: dict[int, list[int]] = {}
    for pid, parent in parents.items():
        children.setdefault(parent, []).append(pid)
    found, todo = [], list(children.get(root, []))
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo += children.get(pid, [])
    return found


def kill_descendants(root: int, keep: set[int] = frozenset()) -> int:
    """Kill every process below `root` except `keep`, repeating while new ones appear; how many were killed."""
    killed = 0
    for _ in range(50):
        pids = [pid for pid in descendants(root) if pid not in keep]
        if not pids:
            break
        _kill_all(pids)
        killed += len(pids)
        time.sleep(0.02)
    return killed


def _threads(pid: int) -> int:
    try:
        return len(os.listdir(f"/proc/{pid}/task"))
    except OSError:
        return 0


def wait_for_tasks(group: Path | None, keep: set[int], timeout: float) -> bool:
    """Wait until `group` counts no task beyond the threads of `keep` (killed processes are uncharged only
    once reaped); False if that did not happen within `timeout` seconds or there is no group."""
    if group is None:
        return False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            current = int((group / "pids.current").read_text())
        except (OSError, ValueError):
            return False
        if current <= sum(_threads(pid) for pid in keep):
            return True
        time.sleep(0.02)
    return False
