"""Linux namespaces for a learner's kernel: no network, and its own process tree.

`enter()` moves the calling (single-threaded) process into a new network namespace, where only a loopback
device of its own exists, and makes its next child the first process (pid 1) of a new PID namespace: when
that process ends, the kernel kills every process left in the namespace, however it was started. Root
unshares directly; any other user first creates a user namespace (unprivileged user namespaces must be
enabled, as on most distributions). `run_as_init()` forks that child and waits for it.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import signal
import socket
import struct
import sys

CLONE_NEWUSER, CLONE_NEWNET, CLONE_NEWPID = 0x10000000, 0x40000000, 0x20000000
_PR_SET_PDEATHSIG = 1
_SIOCGIFFLAGS, _SIOCSIFFLAGS, _IFF_UP = 0x8913, 0x8914, 0x1


def _unshare(flags: int) -> bool:
    libc = ctypes.CDLL(None, use_errno=True)
    return sys.platform.startswith("linux") and libc.unshare(ctypes.c_int(flags)) == 0


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as stream:
        stream.write(text)


def _loopback_up() -> None:
    """Bring up the new namespace's own `lo`, so the learner's processes can still talk to each other."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        request = struct.pack("16sH14x", b"lo", 0)
        flags = struct.unpack("16sH14x", fcntl.ioctl(sock, _SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(sock, _SIOCSIFFLAGS, struct.pack("16sH14x", b"lo", flags | _IFF_UP))


def enter() -> str:
    """Enter new network and PID namespaces; returns "" if impossible, else "net+pid" or "user+net+pid"."""
    uid, gid = os.geteuid(), os.getegid()
    if uid == 0 and _unshare(CLONE_NEWNET | CLONE_NEWPID):
        kind = "net+pid"
    elif _unshare(CLONE_NEWUSER | CLONE_NEWNET | CLONE_NEWPID):
        kind = "user+net+pid"
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/gid_map", f"0 {gid} 1")
        _write("/proc/self/uid_map", f"0 {uid} 1")
    else:
        return ""
    try:
        _loopback_up()
    except OSError:
        pass  # no loopback inside: the learner's processes cannot use sockets between themselves
    return kind


def _wait_for(child: int, *, reap_all: bool) -> None:
    """Wait for `child` (reaping every other child on the way if `reap_all`), then exit with its status."""
    while True:
        pid, status = os.waitpid(-1 if reap_all else child, 0)
        if pid == child:
            os._exit(os.waitstatus_to_exitcode(status) % 256)


def die_with_parent() -> None:
    """Be killed (SIGKILL) when the parent process ends."""
    if sys.platform.startswith("linux"):
        ctypes.CDLL(None).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def run_as_init() -> None:
    """Fork twice; the grandchild returns (to become the kernel), the others wait and exit with it.

    The child is pid 1 of the new PID namespace: it reaps the processes orphaned inside it (otherwise they
    would stay as zombies and count against the process limit), and when it exits every process left in
    the namespace is killed. Both waiting processes ignore SIGINT (the kernel's process group receives
    interrupts, so the kernel gets them directly); the outer one kills the rest on SIGTERM/SIGHUP, and
    each process dies with its parent (PR_SET_PDEATHSIG).
    """
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    init = os.fork()
    if init == 0:
        die_with_parent()
        kernel = os.fork()
        if kernel == 0:
            die_with_parent()
            signal.signal(signal.SIGINT, signal.default_int_handler)
            return
        _wait_for(kernel, reap_all=True)

    def stop(signum, _frame):
        os.kill(init, signal.SIGKILL)
        os._exit(128 + signum)

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGHUP, stop)
    _wait_for(init, reap_all=False)
